"""The admin endpoint, the demo backend, and the HTTP server under both, over real sockets on 127.0.0.1."""

from __future__ import annotations

import datetime
import functools
import json
import logging
import urllib.request
from dataclasses import dataclass

import h11
import prometheus_client
import pytest
import trio

from proxy.dev.demo_backend import demo_handler
from proxy.ops.admin import admin_handler
from proxy.ops.admin_http import Request, Response, serve_http

Address = tuple[str, int]


# --- helpers -----------------------------------------------------------------------------------------------------


async def start(nursery: trio.Nursery, handler, **options) -> Address:
    return await nursery.start(functools.partial(serve_http, handler, "127.0.0.1", 0, **options))


async def start_admin(nursery: trio.Nursery, registry=None, ready=lambda: True, status=None) -> Address:
    registry = registry or prometheus_client.CollectorRegistry()
    return await start(nursery, admin_handler(registry, ready=ready, status=status))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """Requests on one kept-alive connection, framed and parsed by h11's client side."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, address: Address) -> Client:
        return cls(await trio.open_tcp_stream(*address))

    async def request(self, method="GET", target="/", headers=(), body=b"") -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", "test"), ("content-length", str(len(body))), *headers]
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self._receive_reply()

    async def _receive_reply(self) -> Reply:
        reply = None
        with trio.fail_after(2):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    headers = {name.decode(): value.decode() for name, value in event.headers}
                    reply = Reply(event.status_code, headers, b"")
                elif isinstance(event, h11.Data):
                    reply.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return reply


async def fetch(address: Address, target: str, method="GET", headers=()) -> Reply:
    client = await Client.connect(address)
    async with client.stream:
        return await client.request(method, target, headers)


async def send_raw(address: Address, data: bytes) -> bytes:
    """Send `data` on a fresh connection; return everything received until the server closes it."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(data)
        return await read_until_closed(stream)


async def read_until_closed(stream: trio.SocketStream, timeout: float = 2) -> bytes:
    chunks = []
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


# --- admin routes ------------------------------------------------------------------------------------------------


async def test_metrics_serves_the_registry_in_text_format(nursery):
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("demo_requests", "Requests seen.", registry=registry).inc(3)
    host, port = await start_admin(nursery, registry)

    def scrape():  # the stdlib client, as a plain scraper would
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            return response.status, response.headers["content-type"], response.read()

    status, content_type, body = await trio.to_thread.run_sync(scrape)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE demo_requests_total counter\ndemo_requests_total 3.0\n" in body


async def test_metrics_speaks_openmetrics_when_asked(nursery):
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("demo_requests", "Requests seen.", registry=registry).inc()
    address = await start_admin(nursery, registry)
    reply = await fetch(address, "/metrics", headers=[("accept", "application/openmetrics-text;version=1.0.0")])
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert b"demo_requests_total 1.0\n" in reply.body
    assert reply.body.endswith(b"# EOF\n")


async def test_healthz_answers_ok_and_ignores_the_query(nursery):
    address = await start_admin(nursery)
    for target in ("/healthz", "/healthz?verbose=1"):
        reply = await fetch(address, target)
        assert (reply.status, reply.body) == (200, b"ok\n")


async def test_readyz_follows_the_ready_callable(nursery):
    is_ready = False
    address = await start_admin(nursery, ready=lambda: is_ready)
    reply = await fetch(address, "/readyz")
    assert (reply.status, reply.body) == (503, b"not ready\n")
    is_ready = True
    reply = await fetch(address, "/readyz")
    assert (reply.status, reply.body) == (200, b"ready\n")


async def test_status_is_json_of_the_status_callable(nursery):
    since = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    address = await start_admin(nursery, status=lambda: {"listeners": ["api"], "since": since})
    reply = await fetch(address, "/status")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == {"listeners": ["api"], "since": "2030-01-02 03:04:05+00:00"}


async def test_status_without_a_status_callable_is_404(nursery):
    address = await start_admin(nursery)
    assert (await fetch(address, "/status")).status == 404


async def test_unknown_path_is_404(nursery):
    address = await start_admin(nursery)
    reply = await fetch(address, "/admin/secret")
    assert (reply.status, reply.body) == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_with_allow(nursery, method):
    address = await start_admin(nursery)
    reply = await fetch(address, "/metrics", method=method)
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


async def test_head_has_content_length_but_no_body(nursery):
    address = await start_admin(nursery)
    raw = await send_raw(address, b"HEAD /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ncontent-length: 3\r\n" in head  # len(b"ok\n"), as a GET would have
    assert rest == b""


# --- the HTTP server ---------------------------------------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection(nursery):
    address = await start_admin(nursery)
    client = await Client.connect(address)
    async with client.stream:
        first = await client.request("GET", "/healthz")
        second = await client.request("GET", "/readyz")
    assert (first.status, first.body) == (200, b"ok\n")
    assert (second.status, second.body) == (200, b"ready\n")


async def test_request_body_is_discarded_and_the_connection_reused(nursery):
    address = await start(nursery, demo_handler())
    client = await Client.connect(address)
    async with client.stream:
        posted = await client.request("POST", "/upload", body=b"x" * 5000)
        after = await client.request("GET", "/next")
    assert posted.status == 200
    assert b"x" * 10 not in posted.body  # the echo shows headers, never the body
    assert b"\nGET /next\n" in after.body


async def test_expect_100_continue_is_answered_before_the_body(nursery):
    address = await start(nursery, demo_handler())
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        with trio.fail_after(1):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        await stream.send_all(b"hello")
        assert (interim + await read_until_closed(stream)).count(b"HTTP/1.1 200 OK\r\n") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # typical start of a TLS ClientHello
    ],
)
async def test_malformed_request_gets_400_and_close(nursery, caplog, garbage):
    address = await start_admin(nursery)
    raw = await send_raw(address, garbage)  # returns only once the server has closed
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nconnection: close\r\n" in raw
    assert errors_logged(caplog) == []  # a bad client is an outcome, not an error of ours


@pytest.mark.parametrize(
    ("header_size", "status"),
    [(15 * 1024, b"200"), (20 * 1024, b"431"), (100 * 1024, b"431")],
    ids=["under-the-limit", "over-in-one-read", "over-while-incomplete"],
)
async def test_oversized_header_block_gets_431_and_close(nursery, header_size, status):
    address = await start_admin(nursery)
    request = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Big: " + b"a" * header_size + b"\r\n\r\n"
    raw = await send_raw(address, request)
    assert raw.startswith(b"HTTP/1.1 " + status + b" ")


async def test_oversized_body_gets_413_and_close(nursery):
    address = await start(nursery, demo_handler(), max_body_bytes=1000)
    request = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 50000\r\n\r\n" + b"x" * 50000
    raw = await send_raw(address, request)
    assert raw.startswith(b"HTTP/1.1 413 ")  # the reason phrase differs between Python versions


async def test_handler_exception_is_logged_answered_500_and_serving_goes_on(nursery, caplog):
    async def handler(request: Request) -> Response:
        if request.target == "/boom":
            raise RuntimeError("kaboom")
        return Response(body=b"fine\n")

    address = await start(nursery, handler)
    with caplog.at_level(logging.ERROR, logger="proxy.ops.admin_http"):
        failed = await fetch(address, "/boom")
    assert (failed.status, failed.body) == (500, b"internal server error\n")
    [record] = errors_logged(caplog)
    assert record.name == "proxy.ops.admin_http"
    assert "GET /boom" in record.getMessage()
    assert isinstance(record.exc_info[1], RuntimeError)
    assert (await fetch(address, "/")).body == b"fine\n"


@pytest.mark.parametrize(
    "bad", [Response(status=99), Response(headers=(("x-split", "a\r\nInjected: yes"),))], ids=["status", "header"]
)
async def test_a_response_h11_refuses_becomes_500(nursery, bad):
    async def handler(request: Request) -> Response:
        return bad

    address = await start(nursery, handler)
    reply = await fetch(address, "/")
    assert reply.status == 500
    assert "injected" not in reply.headers


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /healthz HTTP/1.1\r\nHost: te"],
    ids=["nothing", "half-a-request"],
)
async def test_stalled_client_is_closed_after_the_request_timeout(nursery, sent):
    address = await start(nursery, demo_handler(), request_timeout=0.2)
    async with await trio.open_tcp_stream(*address) as stream:
        started = trio.current_time()
        await stream.send_all(sent)
        assert await read_until_closed(stream, timeout=1) == b""
        assert trio.current_time() - started >= 0.15


async def test_idle_keep_alive_connection_is_closed_after_the_request_timeout(nursery):
    address = await start(nursery, demo_handler(), request_timeout=0.2)
    client = await Client.connect(address)
    async with client.stream:
        assert (await client.request()).status == 200
        assert await read_until_closed(client.stream, timeout=1) == b""


async def test_accepting_waits_at_the_connection_limit(nursery):
    address = await start(nursery, demo_handler(), max_connections=2)
    holders = [await trio.open_tcp_stream(*address) for _ in range(2)]  # idle: each holds a slot
    waiting = await Client.connect(address)  # the kernel completes the TCP handshake; we do not accept
    async with waiting.stream:
        with trio.move_on_after(0.2) as scope:
            await waiting.request()
        assert scope.cancelled_caught, "a third connection was served past the limit of 2"

        await holders[0].aclose()  # frees a slot: the waiting connection is accepted and served
        reply = await waiting._receive_reply()
        assert reply.status == 200
    await holders[1].aclose()


async def test_stopping_the_server_closes_its_listener_and_connections(nursery):
    async with trio.open_nursery() as server_nursery:
        address = await start(server_nursery, demo_handler())
        stream = await trio.open_tcp_stream(*address)
        server_nursery.cancel_scope.cancel()
    async with stream:
        assert await read_until_closed(stream) == b""
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*address)


async def test_a_graceful_stop_answers_the_request_in_progress_and_closes_the_idle(nursery):
    """The admin child a reload replaces stops this way: no scrape is cut, no new one is taken."""
    entered, release = trio.Event(), trio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(body=b"late but whole\n" * 100)

    stop, stopped = trio.Event(), trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_http(slow, "127.0.0.1", 0, stop=stop, task_status=task_status)
        stopped.set()

    address = await nursery.start(serve)
    idle = await trio.open_tcp_stream(*address)
    busy = await Client.connect(address)
    async with idle, busy.stream:
        async with trio.open_nursery() as asking:
            replies: list[Reply] = []

            async def ask() -> None:
                replies.append(await busy.request(target="/slow"))

            asking.start_soon(ask)
            await entered.wait()
            stop.set()
            assert await read_until_closed(idle) == b"", "an idle connection is owed nothing and closes"
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*address)  # the listener is closed
            assert not stopped.is_set(), "the request in progress holds the stop"
            release.set()
        [reply] = replies
        assert (reply.status, reply.body) == (200, b"late but whole\n" * 100)
        assert reply.headers["connection"] == "close"
        assert await read_until_closed(busy.stream) == b""
    with trio.fail_after(2):
        await stopped.wait()


async def test_a_graceful_stop_cuts_what_is_left_after_one_request_timeout(nursery):
    async def never(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    stop = trio.Event()
    address = await start(nursery, never, request_timeout=0.3, stop=stop)
    client = await Client.connect(address)
    async with client.stream:
        await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        await trio.sleep(0.05)
        started = trio.current_time()
        stop.set()
        assert await read_until_closed(client.stream) == b""
        assert 0.25 <= trio.current_time() - started < 1.5


async def test_port_zero_reports_the_bound_address(nursery):
    host, port = await start(nursery, demo_handler())
    assert host == "127.0.0.1"
    assert port > 0


# --- the demo backend and Request --------------------------------------------------------------------------------


def test_request_header_joins_repeated_fields():
    request = Request("GET", "/", (("accept", "a/b"), ("x", "1"), ("accept", "c/d")), "127.0.0.1:1")
    assert request.header("accept") == "a/b, c/d"
    assert request.header("missing") is None
