"""proxy.relay.http2_forwarder over loopback sockets, cleartext: real gRPC and HTTP/2 clients and backends.

The backend is a real grpcio server on h2c with generic handlers (bytes in, bytes out: no protoc step); the client
is a real grpcio channel to the driver (`grpc.insecure_channel` speaks HTTP/2 with prior knowledge). httpx with
`http1=False, http2=True` speaks h2c with prior knowledge too, against Hypercorn as a plain HTTP/2 backend. TLS and
ALPN belong to the connection object, so they are left to its tests.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio

from proxy.policy.identity import PeerIdentity
from proxy.protocol.http1 import HeaderPolicy
from proxy.protocol.http2 import Http2Event, Http2Relay, Http2Settings, StreamClosed, StreamOpened
from proxy.relay.http2_forwarder import relay_http2
from proxy.relay.tcp_forwarder import PumpResult
from tests.conftest import free_port

IDENTITY = PeerIdentity(
    subject="CN=alice,OU=payments,O=Acme",
    issuer="CN=Acme Clients CA,O=Acme",
    serial="1d2c3b4a",
    sha256="cd" * 32,
    not_before=datetime(2024, 1, 1, tzinfo=UTC),
    not_after=datetime(2034, 1, 1, tzinfo=UTC),
    common_names=("alice",),
    organizational_units=("payments",),
    organizations=("Acme",),
    dns_sans=(),
    uri_sans=("spiffe://acme/ns/prod/sa/alice",),
    ip_sans=(),
    email_sans=(),
    chain_issuers=("CN=Acme Clients CA,O=Acme",),
)
POLICY = HeaderPolicy()
XFCC = dict(POLICY.added_headers(client_ip="127.0.0.1", identity=IDENTITY))[b"X-Forwarded-Client-Cert"].decode()
BIG = 64 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]


# ---- the gRPC backend ------------------------------------------------------------------------------------------


@dataclass
class Backend:
    port: int
    cancelled: threading.Event = field(default_factory=threading.Event)


def _metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
    return json.dumps([[key, value] for key, value in context.invocation_metadata()]).encode()


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i


def _total(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(len(r) for r in requests)


def _shout(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    threading.Event().wait(float(request))
    return b"slept"


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-detail", "from-backend"),))
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")


@pytest.fixture
def grpc_backend() -> Iterator[Backend]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    backend = Backend(0)

    def ticker(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(backend.cancelled.set)  # runs when the call ends, a client cancel included
        while context.is_active():
            yield b"tick"
            threading.Event().wait(0.05)

    handlers = {
        "Metadata": grpc.unary_unary_rpc_method_handler(_metadata),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Total": grpc.stream_unary_rpc_method_handler(_total),
        "Shout": grpc.stream_stream_rpc_method_handler(_shout),
        "Ticker": grpc.unary_stream_rpc_method_handler(ticker),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    backend.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield backend
    finally:
        server.stop(grace=None)


# ---- the driver on a loopback listener -------------------------------------------------------------------------


class WatchedRelay(Http2Relay):
    """The real relay, noting the most DATA it held at once."""

    peak = 0

    def client_bytes(self, data: bytes | bytearray) -> Any:
        step = super().client_bytes(data)
        self.peak = max(self.peak, self.buffered)
        return step

    def backend_bytes(self, data: bytes | bytearray) -> Any:
        step = super().backend_bytes(data)
        self.peak = max(self.peak, self.buffered)
        return step


@dataclass
class Proxy:
    port: int
    relays: list[WatchedRelay] = field(default_factory=list)
    results: list[PumpResult] = field(default_factory=list)
    drain: trio.Event | None = None  # given to the connections accepted from now on
    events: list[Http2Event] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_proxy(
    nursery: trio.Nursery,
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    *,
    connect_timeout: float = 5.0,
    idle_timeout: float = 30.0,
    settings: Http2Settings | None = None,
) -> Proxy:
    proxy = Proxy(0)

    async def handler(stream: trio.SocketStream) -> None:
        relay = WatchedRelay(POLICY, client_ip="127.0.0.1", identity=IDENTITY, settings=settings)
        proxy.relays.append(relay)
        try:
            result = await relay_http2(
                stream,
                connect,
                relay,
                connect_timeout=connect_timeout,
                idle_timeout=idle_timeout,
                drain=proxy.drain,
                on_event=proxy.events.append,
            )
            proxy.results.append(result)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    proxy.port = listeners[0].socket.getsockname()[1]
    return proxy


def tcp(port: int) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    return connect


@pytest.fixture
async def proxy(nursery: trio.Nursery, grpc_backend: Backend) -> Proxy:
    return await start_proxy(nursery, tcp(grpc_backend.port))


@pytest.fixture
def channel(proxy: Proxy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(proxy.address, options=GRPC_OPTIONS) as chan:
        yield chan


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ---- gRPC through the driver -----------------------------------------------------------------------------------


async def test_unary_carries_the_proxys_identity_and_not_a_forged_one(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/test.Svc/Metadata")
    forged = (("x-forwarded-client-cert", "Hash=forged"), ("x-real-ip", "10.9.9.9"), ("x-app", "kept"))
    metadata = dict(map(tuple, json.loads(await in_thread(lambda: call(b"", metadata=forged, timeout=10)))))
    assert metadata["x-forwarded-client-cert"] == XFCC
    assert metadata["x-forwarded-for"] == "127.0.0.1"
    assert metadata["x-forwarded-proto"] == "https"
    assert metadata["x-app"] == "kept"
    assert "x-real-ip" not in metadata


async def test_server_streaming(channel: grpc.Channel) -> None:
    call = channel.unary_stream("/test.Svc/Count")
    assert await in_thread(lambda: list(call(b"500", timeout=10))) == [b"%d" % i for i in range(500)]


async def test_client_streaming(channel: grpc.Channel) -> None:
    call = channel.stream_unary("/test.Svc/Total")
    assert await in_thread(lambda: call(iter([b"a" * 1000] * 300), timeout=10)) == b"300000"


async def test_bidirectional_streaming(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/test.Svc/Shout")
    words = [b"alpha", b"beta", b"gamma"] * 50
    assert await in_thread(lambda: list(call(iter(words), timeout=10))) == [w.upper() for w in words]


async def test_the_status_and_trailers_arrive(channel: grpc.Channel, proxy: Proxy) -> None:
    call = channel.unary_unary("/test.Svc/Fail")

    def run() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10)
        return caught.value

    error = await in_thread(run)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "not you"
    assert ("x-detail", "from-backend") in error.trailing_metadata()
    assert [e.grpc_status for e in proxy.events if isinstance(e, StreamClosed)] == ["7"]


async def test_a_client_cancel_resets_the_backend_stream(channel: grpc.Channel, grpc_backend: Backend) -> None:
    call = channel.unary_stream("/test.Svc/Ticker")

    def cancel_after_two() -> None:
        responses = call(b"", timeout=30)
        assert next(responses) == b"tick" and next(responses) == b"tick"
        responses.cancel()

    await in_thread(cancel_after_two)
    assert await in_thread(lambda: grpc_backend.cancelled.wait(5))


async def test_a_16_mib_message_streams_through_within_the_windows(channel: grpc.Channel, proxy: Proxy) -> None:
    message = bytes(range(256)) * (16 * 4096)  # 16 MiB
    call = channel.unary_unary("/test.Svc/Echo")
    assert await in_thread(lambda: call(message, timeout=60)) == message
    settings = proxy.relays[0].settings
    assert proxy.relays[0].peak <= 2 * settings.connection_window_size  # one window per direction at most


async def test_drain_lets_the_call_in_flight_finish_and_the_channel_moves_on(
    nursery: trio.Nursery, grpc_backend: Backend
) -> None:
    drain = trio.Event()
    proxy = await start_proxy(nursery, tcp(grpc_backend.port))
    proxy.drain = drain
    with grpc.insecure_channel(proxy.address) as chan:
        slow = chan.unary_unary("/test.Svc/Slow")
        assert await in_thread(lambda: slow(b"0", timeout=10)) == b"slept"  # the connection is up
        in_flight = slow.future(b"0.5", timeout=10)
        await trio.sleep(0.2)
        drain.set()
        assert await in_thread(in_flight.result) == b"slept"
        await wait_until(lambda: len(proxy.results) == 1)
        assert proxy.results[0].ended_by == "drained"
        proxy.drain = None  # connections from now on are not draining
        assert await in_thread(lambda: slow(b"0", timeout=10)) == b"slept"  # on a new connection
    assert len(proxy.relays) == 2


async def test_an_idle_connection_ends(nursery: trio.Nursery, grpc_backend: Backend) -> None:
    proxy = await start_proxy(nursery, tcp(grpc_backend.port), idle_timeout=0.5)
    with grpc.insecure_channel(proxy.address) as chan:
        assert await in_thread(lambda: chan.unary_unary("/test.Svc/Echo")(b"x", timeout=10)) == b"x"
        await wait_until(lambda: len(proxy.results) == 1, timeout=5)
    assert proxy.results[0].ended_by == "idle_timeout"
    opened = sorted(e.stream_id for e in proxy.events if isinstance(e, StreamOpened))
    assert opened and opened == sorted(e.stream_id for e in proxy.events if isinstance(e, StreamClosed))


async def test_a_cancelled_driver_closes_the_books_on_its_streams(nursery: trio.Nursery, grpc_backend: Backend) -> None:
    """A drain's deadline cancels the driver from outside: the streams still open get their StreamClosed."""
    proxy = await start_proxy(nursery, tcp(grpc_backend.port))
    with grpc.insecure_channel(proxy.address) as chan:
        future = chan.unary_unary("/test.Svc/Slow").future(b"5", timeout=10)
        await wait_until(lambda: any(isinstance(e, StreamOpened) for e in proxy.events))
        nursery.cancel_scope.cancel()
        with pytest.raises(grpc.RpcError):
            await trio.to_thread.run_sync(future.result, abandon_on_cancel=False)
    closed = [e for e in proxy.events if isinstance(e, StreamClosed)]
    assert [(e.reset, e.reset_by) for e in closed] == [(8, "connection")]  # 8: CANCEL


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# ---- failures --------------------------------------------------------------------------------------------------


async def test_a_backend_that_is_down_gives_unavailable(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, tcp(free_port()))
    with grpc.insecure_channel(proxy.address) as chan:
        call = chan.unary_unary("/test.Svc/Echo")

        def run() -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                call(b"x", timeout=10, wait_for_ready=False)
            return caught.value

        error = await in_thread(run)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "backend unavailable"
    response = await in_thread(lambda: httpx_get(proxy.address))
    assert response.status_code == 502 and response.http_version == "HTTP/2"


async def test_a_connect_timeout_gives_deadline_exceeded(nursery: trio.Nursery) -> None:
    async def blackhole() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    proxy = await start_proxy(nursery, blackhole, connect_timeout=0.3)
    with grpc.insecure_channel(proxy.address) as chan:
        call = chan.unary_unary("/test.Svc/Echo")

        def run() -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                call(b"x", timeout=10)
            return caught.value

        error = await in_thread(run)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == "backend connect timed out"
    assert (await in_thread(lambda: httpx_get(proxy.address))).status_code == 504


# ---- httpx and a plain HTTP/2 backend ----------------------------------------------------------------------------


def httpx_get(address: str, path: str = "/", **kwargs: Any) -> httpx.Response:
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        return client.request(kwargs.pop("method", "GET"), f"http://{address}{path}", **kwargs)


async def echo_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            await send({"type": event["type"] + ".complete"})  # lifespan.startup / lifespan.shutdown
            if event["type"] == "lifespan.shutdown":
                return
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [[name.decode(), value.decode()] for name, value in scope["headers"]]
    answer = json.dumps({"headers": headers, "length": len(body), "version": scope["http_version"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def hypercorn_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    binds = await nursery.start(hypercorn.trio.serve, echo_app, config)
    yield int(binds[0].rsplit(":", 1)[1])


async def test_httpx_over_h2c_with_a_plain_http2_backend(nursery: trio.Nursery, hypercorn_port: int) -> None:
    proxy = await start_proxy(nursery, tcp(hypercorn_port))
    body = b"b" * (3 * 1024 * 1024)
    forged = {"X-Forwarded-Client-Cert": "Hash=forged", "x_forwarded_for": "10.0.0.9"}
    response = await in_thread(lambda: httpx_get(proxy.address, "/up", method="POST", content=body, headers=forged))
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    seen = response.json()
    assert seen["version"] == "2" and seen["length"] == len(body)
    headers = seen["headers"]
    assert [v for n, v in headers if n == "x-forwarded-client-cert"] == [XFCC]
    assert [v for n, v in headers if n.replace("_", "-") == "x-forwarded-for"] == ["127.0.0.1"]
