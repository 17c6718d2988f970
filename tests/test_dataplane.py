"""proxy.relay.dataplane: TCP-mode connections relayed on readiness events, with OpenSSL on the client's socket.

Real TLS clients (Python's ssl, in threads) against the real proxy in this trio run, so the tests can look at the
process's one DataPlane: that the connection was relayed there, and that nothing stays registered afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl

import trio

from proxy.net.sockstream import SocketStream
from proxy.relay.dataplane import DataPlane
from proxy.tls.established import EstablishedTLS
from tests.conftest import client_context, exchange, start_backend, start_proxy, wait_for
from tests.daemonkit import connect_tls
from tests.memclient import MemoryBIOClient
from tests.tlskit import openssl_client_context, server_tls, tls_pair


def _plane() -> DataPlane:
    return DataPlane.current()


async def test_echo_goes_through_the_data_plane_and_leaves_nothing_registered(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    before = _plane().relayed
    results = [await exchange(p.port, client_context(test_pki, test_pki.alice, version=v), b"hello " * 100)
               for v in ("1.2", "1.3")]
    assert [r.ok for r in results] == [True, True], results
    assert all(r.data == b"hello " * 100 for r in results)
    assert _plane().relayed == before + 2
    await wait_for(lambda: _plane().connections == 0)
    assert _plane().registered_fds == 0


async def test_a_request_sent_right_behind_the_finished_arrives_first_and_whole(nursery, test_pki, echo_backend):
    # TLS 1.3: the client's first records often arrive with its Finished, in the same read; the hand-over
    # decrypts them and forwards them before anything else.
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    payload = b"".join(i.to_bytes(4, "big") for i in range(50_000))  # 200 KB, ordered

    def run() -> bytes:
        with connect_tls(p.port, client_context(test_pki, test_pki.alice, version="1.3")) as tls:
            tls.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
            return bytes(got)

    assert await trio.to_thread.run_sync(run) == payload


async def test_bulk_both_ways_with_a_slow_reader_keeps_every_byte(nursery, test_pki, access_log):
    # 16 MiB each way, the client reading slowly: backpressure on both directions, no byte lost or reordered.
    size = 16 * 1024 * 1024
    block = bytes(range(256)) * 256
    down = hashlib.sha256()

    async def source_and_sink(stream: trio.SocketStream, backend) -> None:
        uploaded = 0

        async def sink() -> None:
            nonlocal uploaded
            while data := await stream.receive_some(1 << 16):
                uploaded += len(data)

        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(sink)
                for _ in range(size // len(block)):
                    await stream.send_all(block)
                await stream.send_eof()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            backend.received += b"broken "
        backend.received += str(uploaded).encode()

    backend = await start_backend(nursery, source_and_sink)
    p = await start_proxy(nursery, test_pki, backend.address)
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()

    # A stdlib TLS client over memory BIOs, so one task can write while another reads (an ssl.SSLSocket shared by
    # two threads is not safe); the reader is slow: a pause every 64 reads.
    client = await MemoryBIOClient.connect(p.port, client_context(test_pki, test_pki.alice))
    await client.handshake()

    async def upload() -> None:
        for _ in range(size // len(block)):
            await client.send(block)

    async def download() -> int:
        received = reads = 0
        while chunk := await client.receive():
            down.update(chunk)
            received += len(chunk)
            reads += 1
            if reads % 64 == 0:
                await trio.sleep(0.001)
        return received

    async with trio.open_nursery() as both:
        both.start_soon(upload)
        received = await download()
    await client.aclose()
    (fields,) = await access_log.wait(1)
    assert received == size, (fields["ended_by"], fields.get("detail"), fields["bytes_up"], fields["bytes_down"])
    assert down.hexdigest() == expected
    await wait_for(lambda: backend.received.endswith(str(size).encode()), timeout=20)


async def test_half_close_from_the_client_still_gets_the_whole_answer(nursery, test_pki):
    async def answer_after_eof(stream: trio.SocketStream, backend) -> None:
        request = b""
        while data := await stream.receive_some(65536):
            request += data
        await stream.send_all(request[::-1] * 1000)

    backend = await start_backend(nursery, answer_after_eof)
    p = await start_proxy(nursery, test_pki, backend.address)

    def run() -> bytes:
        with connect_tls(p.port, client_context(test_pki, test_pki.alice, version="1.3")) as tls:
            tls.sendall(b"abc")
            socket.socket.shutdown(tls, socket.SHUT_WR)  # a FIN without close_notify (SSLSocket.shutdown drops TLS)
            got = bytearray()
            while chunk := tls.recv(65536):
                got += chunk
            return bytes(got)

    assert await trio.to_thread.run_sync(run) == b"cba" * 1000


async def test_an_idle_connection_is_closed_and_unregistered(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address, timeouts={"idle": 0.3})

    def run() -> bytes:
        with connect_tls(p.port, client_context(test_pki, test_pki.alice)) as tls:
            tls.sendall(b"x")
            assert tls.recv(1) == b"x"
            return tls.recv(1)  # nothing more comes: the proxy closes after 0.3-0.33 s

    assert await trio.to_thread.run_sync(run) == b""
    (fields,) = await access_log.wait(1)
    assert fields["ended_by"] == "idle_timeout", fields
    await wait_for(lambda: _plane().connections == 0)


async def test_many_connections_at_once_each_get_their_own_bytes(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    ctx = client_context(test_pki, test_pki.alice)
    results = []

    async def one(i: int) -> None:
        results.append(await exchange(p.port, ctx, f"client {i} ".encode() * 500))

    async with trio.open_nursery() as clients:
        for i in range(60):
            clients.start_soon(one, i)
    assert len(results) == 60 and all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert sorted(r.data for r in results) == sorted(f"client {i} ".encode() * 500 for i in range(60))
    await wait_for(lambda: _plane().connections == 0)
    assert _plane().registered_fds == 0


# ---- HTTP mode ---------------------------------------------------------------------------------------------------


async def test_http_mode_runs_on_the_data_plane_with_keep_alive_pipelining_and_the_identity(nursery, test_pki):
    async def http_backend(stream: trio.SocketStream, backend) -> None:
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffered += data
            head, buffered = buffered.split(b"\r\n\r\n", 1)
            backend.received += head + b"\r\n\r\n"
            xfcc = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-forwarded-client-cert:")]
            body = xfcc[0].split(b":", 1)[1].strip() if xfcc else b"none"
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    backend = await start_backend(nursery, http_backend)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http"})
    before = _plane().relayed
    request = b"GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-client-cert: forged\r\n\r\n"

    def responses(tls: ssl.SSLSocket, count: int) -> bytes:
        """Read until ``count`` whole responses (each framed by its Content-Length) have arrived."""
        got = b""
        while True:
            rest, complete = got, 0
            while b"\r\n\r\n" in rest:
                head, rest = rest.split(b"\r\n\r\n", 1)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) < length:
                    break
                rest, complete = rest[length:], complete + 1
            if complete >= count:
                return got
            chunk = tls.recv(65536)
            if not chunk:
                return got
            got += chunk

    def run() -> bytes:
        with connect_tls(p.port, client_context(test_pki, test_pki.alice)) as tls:
            tls.sendall(request * 3)  # pipelined: answered in order, one at a time
            got = responses(tls, 3)
            tls.sendall(request)  # and kept alive
            return got + responses(tls, 1)

    answers = await trio.to_thread.run_sync(run)
    assert answers.count(b"HTTP/1.1 200 OK") == 4, answers
    assert b"forged" not in answers and answers.count(b'Subject="CN=alice') == 4, answers
    assert _plane().relayed == before + 1
    await wait_for(lambda: _plane().connections == 0)


async def test_a_record_that_straddles_the_end_of_a_read_is_delivered(test_pki):
    # All the records wait in the socket before the data plane reads, and the last one starts 100 bytes before its
    # 256 KiB read buffer is full. Reading that record into those 100 bytes would leave the rest decrypted inside
    # OpenSSL, with no readiness event ever asking for it: the upload's tail would wait for the idle timeout.
    sizes = [16 * 1024] * 15 + [16 * 1024 - 100, 1000]
    server_sock, client_sock = socket.socketpair()
    backend_sock, backend_peer = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server, client = await tls_pair(lambda: (SocketStream(server_sock), SocketStream(client_sock)),
                                    server_tls(test_pki), openssl_client_context(test_pki, test_pki.alice))
    established = await EstablishedTLS.take_over(server)
    assert established is not None
    for n in sizes:
        await client.send_all(b"u" * n)
    await trio.sleep(0.05)  # every record is in the server's socket now
    backend_sock.setblocking(False)
    received = 0

    async def backend_reads() -> None:
        nonlocal received
        peer = SocketStream(backend_peer)
        while received < sum(sizes):
            received += len(await peer.receive_some(1 << 20))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend_reads)
            nursery.start_soon(functools.partial(_plane().relay, established, backend_sock, idle_timeout=60,
                                                 on_up=lambda n: None, on_down=lambda n: None))
            while received < sum(sizes):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert received == sum(sizes)
    await established.aclose(close_notify=False)
    backend_sock.close()
    backend_peer.close()
    await client.aclose()
