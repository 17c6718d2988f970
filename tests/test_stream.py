"""proxy.tls.stream.TLSStream in memory: trio's generic stream contract, big
writes, record batching, EOF semantics, first bytes.

Both ends are our TLSStream: the server end uses the proxy's own server Context
(client certificate required), the client end a pyOpenSSL client Context with
alice's certificate. The transports are trio's in-memory pairs, so nothing here
touches a socket.

One deliberate difference from ``trio.SSLStream``: the handshake is explicit
(``do_handshake()`` must complete before data flows; the proxy classifies a
failed handshake before it forwards anything). trio's generic checks assume a
stream that is ready to use, so the stream makers below complete both
handshakes before handing the pair over; ``test_data_before_handshake_is_refused``
pins the deliberate part.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from proxy.net.sockstream import SocketStream
from proxy.tls import stream as stream_module
from proxy.tls.stream import TLSStream
from tests.tlskit import (
    MODE_RELEASE_BUFFERS,
    RecordingStream,
    client_connection,
    handshake_both,
    malloc_in_use,
    openssl_client_context,
    receive_exactly,
    server_tls,
    tls_pair,
)

VERSIONS = ["1.2", "1.3"]
TRANSPORTS = {
    "memory": trio.testing.memory_stream_pair,
    "lockstep": trio.testing.lockstep_stream_pair,
}
# A generic check that hangs is a failure, not a stuck test run.
CHECK_DEADLINE = 20


@pytest.fixture(params=VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture
def tls(test_pki, version):
    return server_tls(test_pki, version)


@pytest.fixture
def client_ctx(test_pki, version):
    return openssl_client_context(test_pki, test_pki.alice, version=version)


@pytest.fixture
def make_pair(tls, client_ctx):
    """make_pair(transport="memory") -> (server, client), both handshaken."""

    async def make(transport: str = "memory"):
        return await tls_pair(TRANSPORTS[transport], tls, client_ctx)

    return make


async def _lockstep_pair(make_pair):
    return await make_pair("lockstep")


# trio's generic checks take two makers. The plain one is over the memory
# pair (buffered); the "clogged" one over the lockstep pair (no buffer at all:
# send_all blocks until the peer receives), which is how trio checks its own
# SSLStream. A lockstep pair cannot be the plain maker for any TLS stream: in
# "closing the r side breaks the s side", r.aclose() must write close_notify
# while s only ever writes, so both block forever on an unbuffered transport.


@pytest.mark.parametrize("check", ["check_two_way_stream", "check_half_closeable_stream"])
async def test_trio_generic_stream_checks(make_pair, check, version):
    # check_half_closeable_stream runs check_two_way_stream first, then the
    # send_eof checks; both are run so that a failure says which layer broke.
    run_check = getattr(trio.testing, check)
    with trio.fail_after(CHECK_DEADLINE):
        await run_check(functools.partial(make_pair, "memory"), functools.partial(_lockstep_pair, make_pair))


# The generic checks stop at their first failure; these pin parts of the
# contract they exercise one test each, so that a failure names the part.


async def test_bad_max_bytes_does_not_break_the_session(make_pair):
    server, client = await make_pair()
    with pytest.raises(ValueError):
        await server.receive_some(0)
    with pytest.raises(TypeError):
        await server.receive_some(1.5)
    # A caller's mistake is not a TLS failure: the session still works.
    await client.send_all(b"still here")
    assert await receive_exactly(server, 10) == b"still here"
    await client.aclose()
    await server.aclose()


async def test_cancelled_receive_some_leaves_the_stream_usable(make_pair):
    # trio streams promise that a cancelled receive_some loses nothing; the
    # proxy's pump cancels a blocked receive_some whenever the other
    # direction fails or the idle timeout fires, and then closes the stream.
    server, client = await make_pair()
    with trio.move_on_after(0.05) as scope:
        await server.receive_some(10)  # nothing was sent: blocks on the transport
    assert scope.cancelled_caught
    await client.send_all(b"after the cancel")
    assert await receive_exactly(server, 16) == b"after the cancel"
    # ...and closing still says goodbye with close_notify, not a bare EOF.
    await server.aclose()
    assert await client.receive_some(10) == b""
    await client.aclose()


async def test_concurrent_send_side_calls_are_busy(make_pair):
    # wait_send_all_might_not_block conflicts with itself, send_all and
    # send_eof (trio.abc.SendStream): a second caller gets BusyResourceError
    # instead of queueing behind the first. Over a lockstep transport the
    # first caller blocks until the peer reads, which it never does here.
    for second in ("wait_send_all_might_not_block", "send_all", "send_eof"):
        server, client = await make_pair("lockstep")
        busy = False
        with trio.move_on_after(1) as hung:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.wait_send_all_might_not_block)
                    await trio.testing.wait_all_tasks_blocked()
                    args = (b"x",) if second == "send_all" else ()
                    nursery.start_soon(getattr(client, second), *args)
            except* trio.BusyResourceError:
                busy = True
        assert not hung.cancelled_caught, f"{second} queued behind wait_send_all_might_not_block: no BusyResourceError"
        assert busy
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_handshake_completes_with_the_client_certificate(make_pair, version):
    server, client = await make_pair()
    expected = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[version]
    assert server.version == client.version == expected
    assert server.cipher == client.cipher
    assert server.cipher
    peer = server.connection.get_peer_certificate(as_cryptography=True)
    assert peer is not None and "CN=alice" in peer.subject.rfc4514_string()
    assert server.resumed is False
    await server.aclose()
    await client.aclose()


async def test_data_before_handshake_is_refused(tls, client_ctx):
    # Deliberate contract: the handshake is explicit, never implicit.
    a, b = trio.testing.memory_stream_pair()
    conn, _ = tls.new_connection()
    server = TLSStream(a, conn)
    client = TLSStream(b, client_connection(client_ctx), server_side=False)
    with pytest.raises(RuntimeError, match="do_handshake"):
        await server.receive_some(10)
    with pytest.raises(RuntimeError, match="do_handshake"):
        await client.send_all(b"x")
    with pytest.raises(RuntimeError, match="do_handshake"):
        await client.send_eof()
    # ...and after it, both ways work.
    await handshake_both(server, client)
    await client.send_all(b"hello")
    assert await receive_exactly(server, 5) == b"hello"
    await server.send_all(b"world")
    assert await receive_exactly(client, 5) == b"world"
    await client.aclose()
    await server.aclose()


# ---- large writes and receive batching ----------------------------------------


def _pattern(n: int) -> bytes:
    block = bytes(range(251))  # a prime period: misplaced chunks do not line up
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("sender_side", ["client", "server"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_five_mebibyte_send_all_arrives_intact(tls, client_ctx, transport, sender_side, version):
    a, b = TRANSPORTS[transport]()
    if sender_side == "server":
        a = recorder = RecordingStream(a)
    else:
        b = recorder = RecordingStream(b)
    conn, _ = tls.new_connection()
    server = TLSStream(a, conn)
    client = TLSStream(b, client_connection(client_ctx), server_side=False)
    await handshake_both(server, client)
    sender, receiver = (server, client) if sender_side == "server" else (client, server)

    payload = _pattern(5 * 1024 * 1024)
    handshake_sends = len(recorder.sends)
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(payload):
            data = await receiver.receive_some(1 << 20)
            assert data, "EOF before the whole payload"
            got.extend(data)

    # If SSL_write wrote less than it was given (partial-write mode left on),
    # bytes would silently go missing and the receiver would wait forever.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await sender.send_all(payload)  # one call: the stream splits it
    assert len(got) == len(payload)
    assert got == payload

    # Each transport write carries one piece's ciphertext (at least one
    # write per piece, none over one piece plus its records' overhead of at
    # most 29 bytes each, and the TLS 1.3 session tickets that ride on the
    # first write).
    piece = stream_module.SEND_PIECE_SIZE
    data_sends = recorder.sends[handshake_sends:]
    assert len(data_sends) >= len(payload) // piece
    assert max(data_sends) <= piece + -(-piece // 16384) * 29 + 2048
    # (not aclose(): over lockstep, close_notify would wait for a reader)
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_receive_some_batches_records(make_pair):
    server, client = await make_pair("memory")
    queued = _pattern(1024 * 1024)
    await client.send_all(queued)  # the memory transport buffers all of it
    first = await server.receive_some(65536)
    # SSL_read alone returns one record (16 KiB); the stream keeps decrypting
    # the records already received, up to max_bytes.
    assert 16384 < len(first) <= 65536
    rest = await receive_exactly(server, len(queued) - len(first))
    assert first + rest == queued
    await client.aclose()
    await server.aclose()


async def test_receive_some_respects_small_max_bytes(make_pair):
    server, client = await make_pair("memory")
    sent = _pattern(100_000)
    await client.send_all(sent)
    got = bytearray()
    for _ in range(10):
        data = await server.receive_some(3)
        assert 1 <= len(data) <= 3
        got += data
    data = await server.receive_some(20_000)  # crosses a record boundary
    assert 1 <= len(data) <= 20_000
    got += data
    got += await receive_exactly(server, len(sent) - len(got))
    assert got == sent
    await client.aclose()
    await server.aclose()


# ---- EOF semantics -------------------------------------------------------------


async def test_close_notify_is_a_clean_eof(make_pair):
    server, client = await make_pair()
    await client.send_all(b"last words")
    await client.aclose()  # close_notify, then the transport closes
    assert await receive_exactly(server, 10) == b"last words"
    assert await server.receive_some(10) == b""
    assert await server.receive_some(10) == b""  # and it stays at EOF
    await server.aclose()


async def test_transport_eof_without_close_notify_is_broken(make_pair):
    # The stream's own semantics, seen from the client end (a Context without
    # OP_IGNORE_UNEXPECTED_EOF): a transport EOF with no close_notify may be
    # a truncation, and is reported as a broken stream, not as EOF.
    server, client = await make_pair()
    await server.send_all(b"partial")
    await server.transport_stream.aclose()  # a FIN with no close_notify
    assert await receive_exactly(client, 7) == b"partial"
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.receive_some(10)
    assert isinstance(info.value.__cause__, SSL.SysCallError)
    # once broken, it stays broken
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some(10)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    await client.aclose()
    await server.aclose()


async def test_proxy_context_reads_a_bare_fin_as_end_of_data(make_pair):
    # Deliberate (proxy/tls/context.py, OP_IGNORE_UNEXPECTED_EOF): many
    # clients end with a FIN and no close_notify; the proxy's server Context
    # reads that as the end of the client's data so the backend's reply can
    # still flow back. The stream then reports a clean b"".
    server, client = await make_pair()
    await client.send_all(b"partial")
    await client.transport_stream.send_eof()  # FIN, no close_notify, still reading
    assert await receive_exactly(server, 7) == b"partial"
    assert await server.receive_some(10) == b""
    await server.send_all(b"reply")
    assert await receive_exactly(client, 5) == b"reply"
    await server.aclose()
    await client.aclose()


async def test_send_all_after_send_eof_is_closed(make_pair):
    server, client = await make_pair()
    await client.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"too late")
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"")
    await client.send_eof()  # idempotent
    assert await server.receive_some(10) == b""
    await server.aclose()
    await client.aclose()


@pytest.mark.parametrize("first", ["client", "server"])
async def test_data_flows_back_after_peer_send_eof(make_pair, first):
    server, client = await make_pair()
    closer, other = (client, server) if first == "client" else (server, client)
    request = _pattern(300_000)
    await closer.send_all(request)
    await closer.send_eof()
    got = await receive_exactly(other, len(request))
    assert got == request
    assert await other.receive_some(10) == b""
    # The half-closed side still receives: a whole answer, then EOF.
    answer = _pattern(200_000)[::-1]
    await other.send_all(answer)
    await other.send_eof()
    assert await receive_exactly(closer, len(answer)) == answer
    assert await closer.receive_some(10) == b""
    await server.aclose()
    await client.aclose()


# ---- first bytes ---------------------------------------------------------------


async def test_first_bytes_are_the_peers_first_bytes(tls, client_ctx):
    a, b = trio.testing.memory_stream_pair()
    recorder = RecordingStream(b)
    conn, _ = tls.new_connection()
    server = TLSStream(a, conn)
    client = TLSStream(recorder, client_connection(client_ctx), server_side=False)
    await handshake_both(server, client)
    assert len(server.first_bytes) == stream_module.FIRST_BYTES_KEPT
    assert server.first_bytes == bytes(recorder.sent[: stream_module.FIRST_BYTES_KEPT])
    assert server.first_bytes[:2] == b"\x16\x03"  # a TLS handshake record: the ClientHello
    # ...and the client side records what the server sent first (ServerHello).
    assert client.first_bytes[:1] == b"\x16"
    # More traffic does not change it.
    await client.send_all(b"after")
    assert await receive_exactly(server, 5) == b"after"
    assert server.first_bytes == bytes(recorder.sent[: stream_module.FIRST_BYTES_KEPT])
    await client.aclose()
    await server.aclose()


async def test_first_bytes_of_a_plain_http_client(tls):
    a, b = trio.testing.memory_stream_pair()
    conn, _ = tls.new_connection()
    server = TLSStream(a, conn)
    await b.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(SSL.Error):
        await server.do_handshake()
    assert server.first_bytes == b"GET / HT"
    # The handshake failure broke the stream for good.
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(10)
    await server.aclose()


# ---- memory while idle -----------------------------------------------------------


async def test_idle_connections_keep_no_ciphertext_buffers_after_bulk(tls, client_ctx):
    # A memory BIO's buffer grows to the most it ever held and never shrinks:
    # without the stream giving them back, every connection that moved 256 KiB
    # each way and went idle would keep about 580 KiB per end.
    client_ctx.set_mode(MODE_RELEASE_BUFFERS)  # as the server's: OpenSSL's own record buffers are not measured here
    pairs = []
    for _ in range(20):
        a, b = socket.socketpair()
        pairs.append(await tls_pair(lambda a=a, b=b: (SocketStream(a), SocketStream(b)), tls, client_ctx))
    up, down = _pattern(256 * 1024), _pattern(256 * 1024)[::-1]

    async def exchange(server: TLSStream, client: TLSStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, up)
            assert await receive_exactly(server, len(up)) == up
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, down)
            assert await receive_exactly(client, len(down)) == down

    async def wait_idle(stream: TLSStream, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        assert await stream.receive_some() == b""

    with trio.fail_after(20):
        for server, client in pairs:
            # A small exchange first: the TLS 1.3 client stores its session
            # tickets as it reads them, which is not what is measured here.
            await server.send_all(b"hello")
            assert await receive_exactly(client, 5) == b"hello"
        async with trio.open_nursery() as nursery:
            before = malloc_in_use()
            for server, client in pairs:
                await exchange(server, client)
            for server, client in pairs:
                # Every end blocked on a read, as an idle proxied connection is.
                await nursery.start(wait_idle, server)
                await nursery.start(wait_idle, client)
            await trio.testing.wait_all_tasks_blocked()
            grown = (malloc_in_use() - before) / len(pairs)
            for server, client in pairs:
                await client.send_eof()
                await server.send_eof()
    for server, client in pairs:
        await server.aclose()
        await client.aclose()
    assert grown < 8 * 1024, f"{grown / 1024:.1f} KiB more per idle pair of ends after bulk"


async def test_buffers_given_back_mid_record_lose_nothing(tls, client_ctx):
    # The server's buffers are given back when its read must wait, which can
    # be in the middle of a record: the part already read sits in OpenSSL's
    # record layer, not in the BIO, and must survive the swap.
    a, b = socket.socketpair()
    conn, _ = tls.new_connection()
    server = TLSStream(SocketStream(a), conn)
    client = TLSStream(SocketStream(b), client_connection(client_ctx), server_side=False)
    await handshake_both(server, client)
    big = _pattern(200_000)
    await client.send_all(big)  # the server's buffers grow past the keep limit
    assert await receive_exactly(server, len(big)) == big

    # One 16 KiB record, sent in two halves with a pause: the server's read
    # waits after the first half.
    record = _pattern(16 * 1024)[::-1]
    client.connection.send(record)
    ciphertext = client.connection.bio_read(65536)
    original_bio = server.connection._into_ssl

    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            assert await receive_exactly(server, len(record)) == record

        nursery.start_soon(receive)
        await client.transport_stream.send_all(ciphertext[:5000])
        await trio.testing.wait_all_tasks_blocked()
        # Otherwise this test would prove nothing: the swap happened mid-record.
        assert server.connection._into_ssl != original_bio
        await client.transport_stream.send_all(ciphertext[5000:])
    await client.send_all(b"and after")
    assert await receive_exactly(server, 9) == b"and after"
    await client.aclose()
    await server.aclose()


# ---- the close after a fatal alert -------------------------------------------------


def tcp_socketpair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection: the lingering close reads TCP's acknowledgements."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


async def refused_pair(test_pki) -> tuple[TLSStream, TLSStream]:
    """(server, client) over loopback TCP: a TLS 1.3 client without a certificate, whose own handshake completed,
    refused by the proxy's context (certificate_required written and sent)."""
    server_sock, client_sock = tcp_socketpair()
    conn, _ = server_tls(test_pki, "1.3").new_connection()
    server = TLSStream(SocketStream(server_sock), conn)
    client_ctx = openssl_client_context(test_pki, None, version="1.3")
    client = TLSStream(SocketStream(client_sock), client_connection(client_ctx), server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)  # TLS 1.3: the client is done before the server has judged it
        with pytest.raises(SSL.Error, match="peer did not return a certificate"):
            await server.do_handshake()
    return server, client


async def test_after_an_alert_the_close_waits_for_the_peer_to_read_it(test_pki, autojump_clock):
    # The server half-closes and waits: the client reads the alert, then the
    # end of data, and only its own close ends the server's.
    server, client = await refused_pair(test_pki)
    await client.transport_stream.send_all(b"a request the client wrote before it knew")
    closed_at = None

    async def close_server() -> None:
        nonlocal closed_at
        await server.aclose()
        closed_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_server)
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some(10)
        assert "certificate required" in str(info.value.__cause__)
        await trio.testing.wait_all_tasks_blocked()
        assert closed_at is None  # still lingering: the unread request did not reset the connection
        started = trio.current_time()
        await client.aclose()
    assert closed_at - started < stream_module.LINGER_TIMEOUT


async def test_a_peer_that_neither_reads_nor_closes_holds_the_close_for_the_linger_timeout(test_pki, autojump_clock):
    server, client = await refused_pair(test_pki)
    started = trio.current_time()
    await server.aclose()
    assert trio.current_time() - started == pytest.approx(stream_module.LINGER_TIMEOUT, abs=0.01)
    await client.aclose()


async def test_a_peer_that_never_stops_sending_cannot_hold_the_close(test_pki, monkeypatch):
    # The time bound out of the way, only the byte bound can end the linger:
    # without it this test runs into its deadline.
    monkeypatch.setattr(stream_module, "LINGER_TIMEOUT", 3600)
    server, client = await refused_pair(test_pki)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        try:
            while True:
                await client.transport_stream.send_all(b"z" * 65536)
                sent += 65536
        except trio.BrokenResourceError:
            pass  # the server's close reset it

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await server.aclose()
    assert sent > stream_module.LINGER_MAX_BYTES  # it was still sending when the server closed
    await client.aclose()
