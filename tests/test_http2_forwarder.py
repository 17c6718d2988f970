"""proxy.relay.http2_forwarder over loopback sockets, cleartext: real gRPC and HTTP/2 clients and backends.

The backend is a real grpcio server on h2c with generic handlers (bytes in, bytes out: no protoc step); the client
is a real grpcio channel to the driver (`grpc.insecure_channel` speaks HTTP/2 with prior knowledge). httpx with
`http1=False, http2=True` speaks h2c with prior knowledge too, against Hypercorn as a plain HTTP/2 backend. TLS and
ALPN belong to the connection object, so they are left to its tests.

With `backend_http_version="1.1"` the backend is an h11 server on trio that records what it read (and Hypercorn,
which answers an HTTP/1.1 request in HTTP/1.1); httpx does not report trailers, so they are read with a plain h2
client connection over a socket.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h11
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio

from proxy.protocol.http1 import HeaderPolicy
from proxy.protocol.http2 import Http2Event, Http2Relay, Http2Settings, StreamClosed, StreamError, StreamOpened
from proxy.protocol.http2_to_http1 import GRPC_MESSAGE
from proxy.relay.http2_forwarder import relay_http2
from proxy.relay.tcp_forwarder import PumpResult
from tests.conftest import ALICE_IDENTITY, free_port

IDENTITY = dataclasses.replace(ALICE_IDENTITY, sha256="cd" * 32, dns_sans=())
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
    backend_http_version: str = "2",
) -> Proxy:
    proxy = Proxy(0)

    async def handler(stream: trio.SocketStream) -> None:
        relay = WatchedRelay(
            POLICY,
            client_ip="127.0.0.1",
            identity=IDENTITY,
            settings=settings,
            backend_http_version=backend_http_version,
        )
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


# ---- HTTP/2 clients, an HTTP/1.1 backend -------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the HTTP/1.1 backend read it."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Http11Backend:
    port: int = 0
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)


async def serve_http11(backend: Http11Backend, stream: trio.SocketStream) -> None:
    """One request a connection, as the proxy asks (Connection: close). Routes:
    /echo (what it read, as JSON), /slow?delay=S (the same, S seconds later), /stream?n=N (N chunks, paced),
    /trailers (a chunked body and trailers)."""
    backend.connections += 1
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = bytearray()
    with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return  # closed before a whole request: the proxy gave up on it
        assert request is not None
        seen = Seen(
            request.method, request.target, request.http_version, list(request.headers.raw_items()), bytes(body)
        )
        backend.seen.append(seen)
        path, _, query = request.target.decode().partition("?")
        params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}

        async def send(*events: Any) -> None:
            for event in events:
                await stream.send_all(conn.send(event) or b"")

        if path == "/stream":
            await send(h11.Response(status_code=200, headers=[("content-type", "text/plain")]))
            for i in range(int(params["n"])):
                await send(h11.Data(data=b"chunk %d\n" % i))
                await trio.sleep(0.005)
            await send(h11.EndOfMessage())
        elif path == "/trailers":
            await send(
                h11.Response(status_code=200, headers=[("trailer", "x-checksum")]),
                h11.Data(data=b"body "),
                h11.Data(data=b"and more"),
                h11.EndOfMessage(headers=[("x-checksum", "1234"), ("x-count", "2")]),
            )
        else:
            await trio.sleep(float(params.get("delay", 0)))
            answer = json.dumps(
                {
                    "method": seen.method.decode(),
                    "target": seen.target.decode(),
                    "version": seen.http_version.decode(),
                    "headers": [[n.decode(), v.decode()] for n, v in seen.headers],
                    "length": len(seen.body),
                }
            ).encode()
            fields = [("content-type", "application/json"), ("content-length", str(len(answer)))]
            await send(h11.Response(status_code=200, headers=fields), h11.Data(data=answer), h11.EndOfMessage())


@pytest.fixture
async def http11_backend(nursery: trio.Nursery) -> Http11Backend:
    backend = Http11Backend()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, functools.partial(serve_http11, backend), 0))
    backend.port = listeners[0].socket.getsockname()[1]
    return backend


@pytest.fixture
async def proxy11(nursery: trio.Nursery, http11_backend: Http11Backend) -> Proxy:
    return await start_proxy(nursery, tcp(http11_backend.port), backend_http_version="1.1")


def h2_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=False, http2=True, timeout=10)


def fields_of(seen: Seen, name: bytes) -> list[bytes]:
    return [value for raw, value in seen.headers if raw.lower() == name]


async def test_an_http11_backend_gets_the_get_as_http11_with_the_identity_and_no_forged_copy(
    proxy11: Proxy, http11_backend: Http11Backend
) -> None:
    forged = [
        ("X-Forwarded-Client-Cert", "Hash=forged"),
        ("x_forwarded_client_cert", "Hash=forged2"),
        ("x-real-ip", "10.9.9.9"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-app", "kept"),
    ]
    async with h2_client() as client:
        response = await client.get(f"http://{proxy11.address}/echo?q=1", headers=forged)
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    assert response.json()["version"] == "1.1"
    [seen] = http11_backend.seen
    assert (seen.method, seen.target, seen.http_version) == (b"GET", b"/echo?q=1", b"1.1")
    assert fields_of(seen, b"host") == [proxy11.address.encode()]
    assert fields_of(seen, b"x-forwarded-client-cert") == [XFCC.encode()]
    assert fields_of(seen, b"x-forwarded-for") == [b"127.0.0.1"]
    assert fields_of(seen, b"x-forwarded-proto") == [b"https"]
    assert not fields_of(seen, b"x_forwarded_client_cert") and not fields_of(seen, b"x-real-ip")
    assert fields_of(seen, b"cookie") == [b"a=1; b=2"] and fields_of(seen, b"x-app") == [b"kept"]
    assert fields_of(seen, b"connection") == [b"close"] and not fields_of(seen, b"te")
    assert [e.stream_id for e in proxy11.events if isinstance(e, StreamClosed)] == [1]


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await trio.sleep(0.01)


async def test_a_post_body_reaches_an_http11_backend_with_its_length(
    proxy11: Proxy, http11_backend: Http11Backend
) -> None:
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB: many windows' worth
    async with h2_client() as client:
        response = await client.post(f"http://{proxy11.address}/echo", content=body)
        streamed = await client.post(f"http://{proxy11.address}/echo", content=pieces(b"a" * 70_000, b"b" * 10))
    assert response.status_code == 200 and response.json()["length"] == len(body)
    assert streamed.status_code == 200 and streamed.json()["length"] == 70_010
    first, second = http11_backend.seen
    assert first.body == body and fields_of(first, b"content-length") == [str(len(body)).encode()]
    assert second.body == b"a" * 70_000 + b"b" * 10
    assert fields_of(second, b"transfer-encoding") == [b"chunked"]  # no length from the client: chunked
    assert proxy11.relays[0].peak <= 2 * proxy11.relays[0].settings.connection_window_size


async def test_a_chunked_streaming_response_arrives_as_data_frames(proxy11: Proxy) -> None:
    async with h2_client() as client, client.stream("GET", f"http://{proxy11.address}/stream?n=200") as response:
        assert response.status_code == 200
        assert "transfer-encoding" not in response.headers and "connection" not in response.headers
        pieces = [piece async for piece in response.aiter_raw()]
    assert b"".join(pieces) == b"".join(b"chunk %d\n" % i for i in range(200))
    assert len(pieces) > 1  # it streamed


class H2Client:
    """A plain h2 client connection over a socket, for what httpx does not show (trailers) or does not do: its
    HTTP/2 connection is read by one waiting request at a time, so a response can sit unread behind a slow one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: dict[int, list[h2.events.Event]] = collections.defaultdict(list)
        self.ended_at: dict[int, float] = {}
        self._send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.conn.data_to_send())

    async def request(self, path: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc.test"), (b":path", path)]
        self.conn.send_headers(stream_id, headers, end_stream=True)
        await self.flush()
        return stream_id

    async def read(self) -> None:
        while data := await self.stream.receive_some(65536):
            for event in self.conn.receive_data(data):
                stream_id = getattr(event, "stream_id", 0)
                if not stream_id:
                    continue
                self.events[stream_id].append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended_at[stream_id] = trio.current_time()
            await self.flush()

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.events[stream_id] if isinstance(e, h2.events.DataReceived))


@contextlib.asynccontextmanager
async def h2_connection(proxy: Proxy) -> AsyncIterator[H2Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream, trio.open_nursery() as nursery:
        client = H2Client(stream)
        await client.flush()
        nursery.start_soon(client.read)
        yield client
        nursery.cancel_scope.cancel()


async def test_the_trailers_of_a_chunked_response_arrive_as_trailers(proxy11: Proxy) -> None:
    async with h2_connection(proxy11) as client:
        stream_id = await client.request(b"/trailers")
        await wait_until(lambda: stream_id in client.ended_at)
    events = client.events[stream_id]
    [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(response.headers)[b":status"] == b"200"
    assert client.body(stream_id) == b"body and more"
    [trailers] = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert trailers.headers == [(b"x-checksum", b"1234"), (b"x-count", b"2")]


async def test_concurrent_streams_each_get_a_connection_and_a_slow_one_holds_up_no_other(
    proxy11: Proxy, http11_backend: Http11Backend
) -> None:
    async with h2_connection(proxy11) as client:
        slow = await client.request(b"/slow?delay=1.5")
        await wait_until(lambda: len(http11_backend.seen) == 1)
        fast = [await client.request(b"/echo?i=%d" % i) for i in range(8)]
        await wait_until(lambda: all(stream_id in client.ended_at for stream_id in fast))
        assert slow not in client.ended_at  # every fast one is done while the slow one is still at the backend
        await wait_until(lambda: slow in client.ended_at)
    for stream_id in fast:
        assert json.loads(client.body(stream_id))["version"] == "1.1"
    assert json.loads(client.body(slow))["target"] == "/slow?delay=1.5"
    assert len(proxy11.relays) == 1 and http11_backend.connections == 9


def flaky(port: int, failing: set[int]) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """Connects to `port`, except on the attempts numbered in `failing` (from 1), which find nothing listening."""
    attempts = 0

    async def connect() -> trio.abc.Stream:
        nonlocal attempts
        attempts += 1
        return await trio.open_tcp_stream("127.0.0.1", free_port() if attempts in failing else port)

    return connect


async def test_a_backend_that_is_down_fails_that_stream_only(
    nursery: trio.Nursery, http11_backend: Http11Backend
) -> None:
    proxy = await start_proxy(nursery, flaky(http11_backend.port, {3}), backend_http_version="1.1")
    async with h2_client() as client:
        url = f"http://{proxy.address}"
        assert (await client.get(f"{url}/echo")).status_code == 200
        async with trio.open_nursery() as streams:
            slow: list[httpx.Response] = []

            async def fetch_slow() -> None:
                slow.append(await client.get(f"{url}/slow?delay=0.5"))

            streams.start_soon(fetch_slow)
            await wait_until(lambda: len(http11_backend.seen) == 2)
            down = await client.get(f"{url}/echo")  # its connect fails
            assert (down.status_code, down.text) == (502, "502 Bad Gateway\n")
        assert slow[0].status_code == 200  # in flight while the other failed, and unharmed
        assert (await client.get(f"{url}/echo")).status_code == 200
        assert len(proxy.relays) == 1 and not proxy.results  # one connection all along, still open
    assert [e.reason for e in proxy.events if isinstance(e, StreamError)] == ["backend_unreachable"]


async def test_a_connect_timeout_is_a_504_on_the_stream(nursery: trio.Nursery) -> None:
    async def blackhole() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    proxy = await start_proxy(nursery, blackhole, connect_timeout=0.3, backend_http_version="1.1")
    async with h2_client() as client:
        response = await client.get(f"http://{proxy.address}/echo")
    assert (response.status_code, response.text) == (504, "504 Gateway Timeout\n")


async def test_grpc_against_an_http11_backend_is_unimplemented_with_a_clear_message(
    proxy11: Proxy, http11_backend: Http11Backend
) -> None:
    with grpc.insecure_channel(proxy11.address) as chan:
        call = chan.unary_unary("/test.Svc/Echo")

        def run() -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                call(b"x", timeout=10)
            return caught.value

        error = await in_thread(run)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == GRPC_MESSAGE
    assert http11_backend.connections == 0
    assert [e.reason for e in proxy11.events if isinstance(e, StreamError)] == ["grpc_needs_http2"]


async def test_hypercorn_as_an_http11_backend(nursery: trio.Nursery, hypercorn_port: int) -> None:
    proxy = await start_proxy(nursery, tcp(hypercorn_port), backend_http_version="1.1")
    body = b"h" * 200_000
    forged = {"X-Forwarded-Client-Cert": "Hash=forged"}
    async with h2_client() as client:
        response = await client.post(f"http://{proxy.address}/up", content=body, headers=forged)
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    seen = response.json()
    assert seen["version"] == "1.1" and seen["length"] == len(body)
    assert [v for n, v in seen["headers"] if n == "x-forwarded-client-cert"] == [XFCC]
