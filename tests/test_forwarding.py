"""Forwarding through a running proxy on loopback: half-close both ways, backend
down, Unix socket backends, idle timeout, many clients, the connection limit,
backpressure, and the byte/connection metrics after each.

Clients are in-process trio clients on our own TLSStream (server_side=False)
over real TCP: unlike a stdlib ``ssl`` socket they can send close_notify with
``send_eof()`` and keep reading.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy.tls.stream import TLSStream
from tests.conftest import (
    Backend,
    echo_handler,
    free_port,
    serve_listeners_as_backend,
    start_backend,
    start_proxy,
    wait_for,
)
from tests.tlskit import (
    client_connection,
    open_tls_client,
    openssl_client_context,
    receive_all,
    receive_exactly,
)

M = "mtls_proxy_"


def _pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


@pytest.fixture
def ctx(test_pki):
    return openssl_client_context(test_pki, test_pki.alice)


@pytest.fixture(params=["1.2", "1.3"])
def versioned_ctx(request, test_pki):
    return request.param, openssl_client_context(test_pki, test_pki.alice, version=request.param)


async def settled(p, *, connections: int, up: int | None = None, down: int | None = None) -> None:
    """Wait until every connection has closed, then check the per-connection metrics."""
    await wait_for(lambda: p.metric(M + "connection_duration_seconds_count") >= connections
                   and p.metric(M + "active_connections") == 0)
    assert p.metric(M + "connections_total") == connections
    assert p.metric(M + "connection_duration_seconds_count") == connections
    assert p.metric(M + "active_connections") == 0
    if up is not None:
        assert p.metric(M + "bytes_total", direction="client_to_backend") == up
    if down is not None:
        assert p.metric(M + "bytes_total", direction="backend_to_client") == down


async def echo_roundtrip(stream: TLSStream, payload: bytes) -> bytes:
    got = b""

    async def receive() -> None:
        nonlocal got
        got = await receive_exactly(stream, len(payload))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await stream.send_all(payload)
    return got


async def closed_within(stream: TLSStream, seconds: float) -> tuple[str, float]:
    """Wait for the proxy to close ``stream``: ("eof" | "broken", elapsed)."""
    started = trio.current_time()
    with trio.fail_after(seconds):
        try:
            data = await stream.receive_some(1024)
        except trio.BrokenResourceError:
            return "broken", trio.current_time() - started
    assert data == b"", f"expected the connection to close, got {data!r}"
    return "eof", trio.current_time() - started


# ---- half-close -------------------------------------------------------------------


async def test_half_close_client_first(nursery, test_pki, versioned_ctx, access_log):
    """The client sends its request then close_notify; the backend reads to EOF
    and only then answers; the whole answer comes back."""
    version, ctx = versioned_ctx
    request = _pattern(300_000)
    answer = hashlib.sha256(request).hexdigest().encode() * 5000  # 320,000 bytes

    async def answer_after_eof(stream, backend: Backend) -> None:
        backend.received += await receive_all(stream)  # returns only on EOF
        await stream.send_all(hashlib.sha256(bytes(backend.received)).hexdigest().encode() * 5000)

    backend = await start_backend(nursery, answer_after_eof)
    p = await start_proxy(nursery, test_pki, backend.address)
    client = await open_tls_client(p.port, ctx)
    assert client.version == {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[version]
    await client.send_all(request)
    await client.send_eof()
    with trio.fail_after(5):
        got = await receive_all(client)  # the answer, then close_notify (b"")
    assert bytes(backend.received) == request
    assert got == answer
    await client.aclose()

    await settled(p, connections=1, up=len(request), down=len(answer))
    assert p.metric(M + "handshakes_total", result="success") == 1
    (line,) = await access_log.wait(1)
    assert line["ended_by"] == "eof"
    assert line["bytes_up"] == len(request)
    assert line["bytes_down"] == len(answer)


async def test_half_close_backend_first(nursery, test_pki, versioned_ctx):
    """The backend sends its reply and half-closes, still reading: the client
    sees the reply then close_notify, and what it sends afterwards still
    reaches the backend."""
    _, ctx = versioned_ctx
    greeting = _pattern(150_000, seed=7)
    later = _pattern(250_000, seed=3)
    backend_done = trio.Event()

    async def greet_then_listen(stream, backend: Backend) -> None:
        await stream.send_all(greeting)
        await stream.send_eof()
        backend.received += await receive_all(stream)
        backend_done.set()

    backend = await start_backend(nursery, greet_then_listen)
    p = await start_proxy(nursery, test_pki, backend.address)
    client = await open_tls_client(p.port, ctx)
    with trio.fail_after(5):
        assert await receive_exactly(client, len(greeting)) == greeting
        assert await client.receive_some(1024) == b""  # close_notify: a clean EOF
        await client.send_all(later)
        await client.send_eof()
        await backend_done.wait()
    assert bytes(backend.received) == later
    await client.aclose()
    await settled(p, connections=1, up=len(later), down=len(greeting))


# ---- backend problems -------------------------------------------------------------


async def test_backend_down_closes_the_client_promptly_and_the_proxy_keeps_serving(nursery, test_pki, ctx):
    port = free_port()  # nothing listens here (yet)
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{port}", backend={"connect_timeout": 5})
    client = await open_tls_client(p.port, ctx)  # the handshake itself succeeds
    how, elapsed = await closed_within(client, 5)
    assert elapsed < 1.0, f"closed after {elapsed:.2f}s; a refused connect should not wait for connect_timeout"
    assert how == "eof", "the proxy closes with close_notify when it gives up on the backend"
    await client.aclose()
    await settled(p, connections=1, up=0, down=0)
    assert p.metric(M + "backend_connect_failures_total") == 1
    assert p.metric(M + "handshakes_total", result="success") == 1
    assert p.metric(M + "handshakes_total", result="failure") == 0

    # The backend comes up on that port: the next client goes through.
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    backend = await serve_listeners_as_backend(nursery, listeners, echo_handler)
    client = await open_tls_client(p.port, ctx)
    payload = _pattern(10_000)
    assert await echo_roundtrip(client, payload) == payload
    await client.send_eof()
    assert await receive_all(client) == b""
    await client.aclose()
    await settled(p, connections=2, up=len(payload), down=len(payload))
    assert backend.accepted == 1
    assert p.metric(M + "backend_connect_failures_total") == 1
    assert p.metric(M + "handshakes_total", result="success") == 2


@pytest.fixture
def short_tmp():
    # A Unix socket path must fit in sun_path (108 bytes): stay short.
    d = Path(tempfile.mkdtemp(prefix="mtls-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_unix_socket_backend(nursery, test_pki, ctx, short_tmp):
    path = short_tmp / "b.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    backend = await serve_listeners_as_backend(nursery, [trio.SocketListener(sock)], echo_handler)

    p = await start_proxy(nursery, test_pki, "127.0.0.1:1", backend={"address": f"unix:{path}"})
    client = await open_tls_client(p.port, ctx)
    payload = _pattern(200_000)
    with trio.fail_after(5):
        assert await echo_roundtrip(client, payload) == payload
        await client.send_eof()
        assert await receive_all(client) == b""  # the echo backend half-closed back
    await client.aclose()
    assert backend.accepted == 1
    assert bytes(backend.received) == payload
    await settled(p, connections=1, up=len(payload), down=len(payload))


@pytest.mark.parametrize(("bind", "address"), [("127.0.0.1", "127.0.0.1:{}"), ("::1", "[::1]:{}"),
                                             ("127.0.0.1", "localhost:{}")])
async def test_tcp_backend_by_ipv4_ipv6_literal_and_name(nursery, test_pki, ctx, bind, address):
    # IP literals are connected to directly, names go through trio's resolver.
    family = trio.socket.AF_INET6 if ":" in bind else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    await sock.bind((bind, 0))
    sock.listen()
    backend = await serve_listeners_as_backend(nursery, [trio.SocketListener(sock)], echo_handler)

    p = await start_proxy(nursery, test_pki, address.format(sock.getsockname()[1]))
    client = await open_tls_client(p.port, ctx)
    with trio.fail_after(5):
        assert await echo_roundtrip(client, b"ping") == b"ping"
    await client.aclose()
    assert backend.accepted == 1


# ---- idle timeout -------------------------------------------------------------------


async def test_idle_timeout_closes_a_silent_client(nursery, test_pki, echo_backend, ctx, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address, timeouts={"idle": 0.3})
    client = await open_tls_client(p.port, ctx)
    _how, elapsed = await closed_within(client, 5)
    assert 0.2 <= elapsed <= 2.0, f"closed after {elapsed:.2f}s with idle = 0.3s"
    await client.aclose()
    await settled(p, connections=1, up=0, down=0)
    (line,) = await access_log.wait(1)
    assert line["ended_by"] == "idle_timeout"


async def test_idle_timeout_closes_with_close_notify(nursery, test_pki, echo_backend, ctx):
    # An idle close is an orderly close by the proxy: the client must be told
    # with close_notify, not left to read a bare FIN as a possible truncation.
    p = await start_proxy(nursery, test_pki, echo_backend.address, timeouts={"idle": 0.3})
    client = await open_tls_client(p.port, ctx)
    how, _elapsed = await closed_within(client, 5)
    await client.aclose()
    assert how == "eof", "the proxy closed an idle connection without close_notify"


async def test_traffic_keeps_a_connection_past_the_idle_timeout(nursery, test_pki, echo_backend, ctx):
    p = await start_proxy(nursery, test_pki, echo_backend.address, timeouts={"idle": 0.3})
    client = await open_tls_client(p.port, ctx)
    started = trio.current_time()
    for i in range(8):  # 0.8 s of traffic, a message every 0.1 s
        assert await echo_roundtrip(client, b"tick%d" % i) == b"tick%d" % i
        await trio.sleep(0.1)
    assert trio.current_time() - started > 0.6
    _how, elapsed = await closed_within(client, 5)  # then silence: closed
    assert elapsed <= 2.0
    await client.aclose()
    await settled(p, connections=1, up=8 * 5, down=8 * 5)


# ---- many clients, the connection limit ----------------------------------------------


async def test_two_hundred_concurrent_clients(nursery, test_pki, echo_backend, ctx):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    n = 200
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        client = await open_tls_client(p.port, ctx)
        payload = b"client %03d " % i + _pattern(100, seed=i)
        await client.send_all(payload)
        await client.send_eof()
        assert await receive_all(client) == payload
        await client.aclose()
        ok += 1

    started = time.monotonic()
    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for i in range(n):
                clients.start_soon(one, i)
    assert ok == n
    size = n * (len(b"client 000 ") + 100)
    await settled(p, connections=n, up=size, down=size)
    assert p.metric(M + "handshakes_total", result="success") == n
    assert p.metric(M + "handshakes_total", result="failure") == 0
    assert p.metric(M + "handshake_duration_seconds_count", result="success") == n
    assert time.monotonic() - started < 15


async def test_max_connections_holds_the_third_client_in_the_backlog(nursery, test_pki, echo_backend, ctx):
    p = await start_proxy(nursery, test_pki, echo_backend.address, max_connections=2)
    first = await open_tls_client(p.port, ctx)
    second = await open_tls_client(p.port, ctx)
    assert await echo_roundtrip(first, b"one") == b"one"
    assert await echo_roundtrip(second, b"two") == b"two"

    # The kernel completes the TCP connect (the listen backlog)...
    tcp = await trio.open_tcp_stream("127.0.0.1", p.port)
    third = TLSStream(tcp, client_connection(ctx), server_side=False)
    handshaken = trio.Event()

    async def handshake() -> None:
        await third.do_handshake()
        handshaken.set()

    nursery.start_soon(handshake)
    # ...but the proxy does not accept it, so no TLS handshake happens.
    await trio.sleep(0.5)
    assert not handshaken.is_set()
    assert p.metric(M + "connections_total") == 2
    assert p.metric(M + "active_connections") == 2

    await first.send_eof()
    assert await receive_all(first) == b""
    await first.aclose()
    with trio.fail_after(3):
        await handshaken.wait()
    assert await echo_roundtrip(third, b"three") == b"three"
    assert p.metric(M + "connections_total") == 3

    for s in (second, third):
        await s.send_eof()
        assert await receive_all(s) == b""
        await s.aclose()
    await settled(p, connections=3, up=3 + 3 + 5, down=3 + 3 + 5)


# ---- backpressure ---------------------------------------------------------------------


async def test_backpressure_when_the_backend_does_not_read(nursery, test_pki, ctx):
    """A backend that stops reading stalls the client after a bounded amount,
    and what was sent is then delivered in full once the backend reads."""
    cap = 96 * 1024 * 1024  # the client gives up here: "unbounded"
    chunk = _pattern(64 * 1024)
    release = trio.Event()
    received = 0
    digest = hashlib.sha256()
    backend_done = trio.Event()

    async def stall_then_read(stream, backend: Backend) -> None:
        nonlocal received
        await release.wait()
        while data := await stream.receive_some(1 << 20):
            received += len(data)
            digest.update(data)
        backend_done.set()

    backend = await start_backend(nursery, stall_then_read)
    p = await start_proxy(nursery, test_pki, backend.address)
    client = await open_tls_client(p.port, ctx)
    sent = 0
    stop = False
    sender_done = trio.Event()
    expected = hashlib.sha256()

    async def sender() -> None:
        nonlocal sent
        while not stop and sent < cap:
            await client.send_all(chunk)
            sent += len(chunk)
            expected.update(chunk)
        await client.send_eof()
        sender_done.set()

    tracemalloc.start()
    try:
        nursery.start_soon(sender)
        with trio.fail_after(15):
            # Stalled = no progress for 0.5 s.
            last, last_change = -1, trio.current_time()
            while trio.current_time() - last_change < 0.5:
                assert not sender_done.is_set(), f"the client sent {sent} bytes without ever stalling"
                if sent != last:
                    last, last_change = sent, trio.current_time()
                await trio.sleep(0.05)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stalled_at = sent
    forwarded = p.metric(M + "bytes_total", direction="client_to_backend")
    assert stalled_at < 32 * 1024 * 1024, f"stalled only after {stalled_at / 2**20:.1f} MiB"
    assert forwarded <= stalled_at
    # What the proxy holds itself is a chunk or two, not the backlog (the
    # kernel's socket buffers are not Python allocations).
    assert peak < 8 * 1024 * 1024, f"Python allocations peaked at {peak / 2**20:.1f} MiB"

    stop = True
    release.set()
    with trio.fail_after(10):
        await sender_done.wait()
        await backend_done.wait()
    assert received == sent
    assert digest.digest() == expected.digest()
    assert await receive_all(client) == b""  # the backend closed after our EOF
    await client.aclose()
    await settled(p, connections=1, up=sent, down=0)
    assert backend.accepted == 1
