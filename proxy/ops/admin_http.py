"""A tiny HTTP/1.1 server on trio + h11, for the admin endpoint and the demo's sample backend.

It is not a general web server: one handler, request bodies ignored, small responses. But it listens on the
network (Prometheus scrapes the admin port, the kubelet probes it), so everything a client can make us hold is
bounded, and whatever goes wrong with one connection ends at most that connection:

- the header block: 16 KiB (h11's own default, chosen from node/tomcat/IIS/Apache) -> 431 and close;
- the request body: read and dropped up to 64 KiB -> 413 and close;
- time to receive one request, headers and body: 10 s -> close. The same deadline covers the wait for the next
  request on a keep-alive connection, so idle connections go away too. Sending the response gets the same budget;
- connections: 64 at once. At the limit we stop accepting and new clients wait in the kernel's listen backlog;
- a malformed request -> 400 and close; a handler that raises -> 500 (logged) and the connection carries on;
- a peer that resets -> the connection ends quietly;
- a graceful stop (the `stop` event of `serve_http_on`): accepting ends at once, a connection idle between
  requests closes, a request in progress gets its response (with `Connection: close`), and whatever is still
  open after one request timeout is cut. A reload that replaces the admin endpoint so never cuts a scrape;
- no file descriptor left for a new connection -> accepting backs off and retries.

Binding and the accept loop are the proxy's own (`proxy.net.accepting`): the same errno handling, back-off,
episode logging and accept batches as the data-plane listeners.

The h11 state machine does the parsing; this module only moves bytes and enforces the limits above, in the shape
of h11's examples/trio-server.py.
"""

from __future__ import annotations

import contextlib
import functools
import http
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import h11
import trio

from proxy.net.accepting import accept_loop, format_address, open_listeners
from proxy.net.sockstream import SocketListener, SocketStream

__all__ = ["Handler", "Request", "Response", "serve_http"]

LOGGER = logging.getLogger("proxy.ops.admin_http")

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10.0  # seconds
MAX_CONNECTIONS = 64

RECEIVE_SIZE = 16 * 1024

# After an error response the client may still be sending (the rest of an oversized body, say). Closing a socket
# with unread data makes the kernel answer with RST, which can destroy our response before the client reads it.
# So we half-close and drain for a moment first: the idea of nginx's lingering_close.
LINGER_TIMEOUT = 1.0  # seconds


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, exactly as sent
    headers: tuple[tuple[str, str], ...]  # names lowercased, in the order received
    client: str  # "host:port" of the peer

    def header(self, name: str) -> str | None:
        """The value of header `name` (lowercase), repeated fields joined with ", "; None when absent."""
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class _Limits:
    request_timeout: float
    max_header_bytes: int
    max_body_bytes: int


class _Stopping:
    """The graceful stop as the connections see it: whether it has begun, and the waits it interrupts."""

    def __init__(self) -> None:
        self.begun = False
        self._idle_waits: set[trio.CancelScope] = set()

    def begin(self) -> None:
        self.begun = True
        for scope in self._idle_waits:
            scope.cancel()

    @contextlib.contextmanager
    def idle_wait(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for a wait between requests: the stop cancels it, as nobody is owed an answer yet."""
        with trio.CancelScope() as scope:
            if self.begun:
                scope.cancel()
            self._idle_waits.add(scope)
            try:
                yield scope
            finally:
                self._idle_waits.discard(scope)


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    name: str = "http",
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` over HTTP/1.1 on host:port until cancelled, or until `stop` is set.

    Args:
      handler: called once per request; its exceptions become 500 responses.
      host, port: bound with `proxy.net.accepting.open_listeners`; port 0 picks a free port.
      name: starts this server's log lines, and the message of a failure to bind.
      request_timeout, max_connections, max_header_bytes, max_body_bytes: the limits in the module docstring.
      stop: once set, the server stops gracefully (see the module docstring) and returns.

    Without `stop`, returns only by an exception: cancellation, a `ListenError` (an `OSError`) when the
    address cannot be bound, or a failure to accept. Reports `(host, port)` of the first listening socket through
    `task_status`, so that `await nursery.start(serve_http, ...)` returns once the server accepts connections,
    with the real port.

    Resource handling: the listeners and every connection are closed before this returns.
    """
    listeners = await open_listeners(host, port, what=name)
    await serve_http_on(
        handler, listeners, name=name, request_timeout=request_timeout, max_connections=max_connections,
        max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes, stop=stop, task_status=task_status,
    )


async def serve_http_on(
    handler: Handler,
    listeners: Sequence[SocketListener | trio.SocketListener],
    *,
    name: str = "http",
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_http` on listening sockets bound already (by the proxy, or inherited from a parent process).

    A trio ``SocketListener`` is taken over (it is left detached), so every connection is the proxy's own
    ``SocketStream`` and comes from the shared accept loop. Once ``stop`` is set, the server stops gracefully
    (see the module docstring) and returns, its listeners closed.
    """
    ours = [SocketListener.take_over(s) if isinstance(s, trio.SocketListener) else s for s in listeners]
    if request_timeout <= 0 or max_connections < 1 or max_header_bytes < 1 or max_body_bytes < 0:
        for listener in ours:
            await trio.aclose_forcefully(listener)
        raise ValueError("serve_http limits must be positive (max_body_bytes may be 0)")
    limits = _Limits(request_timeout, max_header_bytes, max_body_bytes)
    # Taken *before* accepting (by the accept loop): at the limit, new clients wait in the kernel's backlog rather
    # than in our memory.
    slots = (trio.Semaphore(max_connections),)
    bound: tuple[str, int] = ours[0].socket.getsockname()[:2]
    LOGGER.info("%s: listening on %s", name, format_address(bound))
    stopping = _Stopping()
    run = functools.partial(_run_connection, handler, limits, stopping, name)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            for listener in ours:
                accepting.start_soon(functools.partial(
                    _serve_listener, listener, run, connections, slots=slots, name=name,
                ))
            task_status.started(bound)
            if stop is None:
                return  # until cancelled: the accept loops never end on their own
            await stop.wait()
            accepting.cancel_scope.cancel()  # each loop closes its listener as it ends
        stopping.begin()
        connections.cancel_scope.deadline = trio.current_time() + request_timeout


async def _serve_listener(listener: SocketListener, run: Callable[[SocketStream], Awaitable[None]],
                          nursery: trio.Nursery, *, slots: tuple[trio.Semaphore], name: str) -> None:
    async with listener:
        await accept_loop(listener, run, nursery, slots=slots, name=name, logger=LOGGER)


async def _run_connection(handler: Handler, limits: _Limits, stopping: _Stopping, name: str,
                          stream: SocketStream) -> None:
    try:
        await _Connection(stream, handler, limits, stopping, name).serve()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer reset or vanished: routine network noise, not an error of ours
    except Exception:
        # A bug in this module must cost one connection, not the server (and not the daemon around it).
        LOGGER.error("%s: connection failed", name, exc_info=True)
    finally:
        # A plain socket has nothing graceful to do on close (no TLS close_notify), so the forceful close is
        # the same close, and it cannot block even when we are being cancelled.
        await trio.aclose_forcefully(stream)


class _Connection:
    """One client connection: an h11 state machine fed from a socket, one request and response at a time."""

    def __init__(self, stream: SocketStream, handler: Handler, limits: _Limits, stopping: _Stopping,
                 name: str) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._stopping = stopping
        self._name = name
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._client = _peer_name(stream)

    async def serve(self) -> None:
        """Answer requests until the client closes, misbehaves or stalls, or either side asks to close."""
        while True:
            try:
                with trio.fail_after(self._limits.request_timeout):
                    if not await self._await_request():
                        return  # the server stops and this connection is idle: nobody is owed an answer
                    request = await self._receive_request()
            except trio.TooSlowError:
                return  # slow or idle: just close; such a client may not be reading either
            except h11.RemoteProtocolError as exc:
                await self._reject(exc.error_status_hint)
                return
            if request is None:
                return  # the client closed between requests
            head, body = await self._respond(request)
            with trio.move_on_after(self._limits.request_timeout) as send_scope:
                await self._send_response(head, b"" if request.method == "HEAD" else body)
            if send_scope.cancelled_caught or self._h11.our_state is h11.MUST_CLOSE:
                return
            self._h11.start_next_cycle()

    async def _await_request(self) -> bool:
        """Wait for the first bytes of the next request (or the client's EOF); False if the server stops first."""
        buffered, closed = self._h11.trailing_data
        if buffered or closed:
            return True  # pipelined bytes, or the EOF, are here already
        with self._stopping.idle_wait() as idle:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        if idle.cancelled_caught:
            return False
        self._h11.receive_data(data)
        return True

    async def _receive_request(self) -> Request | None:
        """The next request with its body consumed, or None if the client closed the connection cleanly."""
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event  # h11 yields nothing else at the start of a cycle
        if _head_size(event) > self._limits.max_header_bytes:
            # h11 bounds only a head still incomplete; one completed by the last read can be up to RECEIVE_SIZE
            # bigger. Measure it, so the limit is the same however the bytes happened to arrive.
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        await self._discard_body()
        return Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
            headers=tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers),
            client=self._client,
        )

    async def _discard_body(self) -> None:
        # Our handlers take no bodies, but h11 must see the whole message before the next one can start.
        if self._h11.they_are_waiting_for_100_continue:
            # Otherwise curl waits a second before sending any body over 1 KiB.
            await self._send(h11.InformationalResponse(status_code=100, headers=[], reason=_reason(100)))
        received = 0
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event  # EOF mid-body raises RemoteProtocolError instead
            received += len(event.data)
            if received > self._limits.max_body_bytes:
                # The client broke *our* protocol limit; treat it like any other malformed request.
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """h11's next event, reading as needed: never NEED_DATA, though the type (h11's) cannot say so."""
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            # b"" at EOF is exactly how h11 wants to hear about EOF.
            self._h11.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
        return event

    async def _respond(self, request: Request) -> tuple[h11.Response, bytes]:
        """The handler's answer as an h11 head and a body; a handler that raises, or whose response h11 refuses
        (a bad status or header), is logged and becomes a 500."""
        try:
            response = await self._handler(request)
            return _h11_head(response, close=self._stopping.begun), response.body
        except Exception:
            LOGGER.error(
                "%s: handler failed on %s %s from %s",
                self._name, request.method, request.target, request.client,
                exc_info=True,
            )
            return _h11_head(_INTERNAL_ERROR, close=self._stopping.begun), _INTERNAL_ERROR.body

    async def _reject(self, status: int) -> None:
        """Answer a request we will not process with a bodiless error, then close gracefully."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # we are already mid-response: nothing sensible left to say
        # No body: it would be wrong after a HEAD request, and the status says it all.
        head = _h11_head(Response(status=status), close=True)
        with trio.move_on_after(self._limits.request_timeout):
            await self._send_response(head, b"")
            await self._linger()

    async def _linger(self) -> None:
        await self._stream.send_eof()
        with trio.move_on_after(LINGER_TIMEOUT):
            while await self._stream.receive_some(RECEIVE_SIZE):
                pass

    async def _send_response(self, head: h11.Response, body: bytes) -> None:
        await self._send(head)
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            await self._stream.send_all(data)


_INTERNAL_ERROR = Response(status=500, body=b"internal server error\n")


def _h11_head(response: Response, *, close: bool = False) -> h11.Response:
    # Content-Length is always the full body's, also when a HEAD response then leaves the body out.
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    return h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))


def _head_size(request: h11.Request) -> int:
    """The size of the request line and header fields, as sent but for optional whitespace."""
    request_line = len(request.method) + 1 + len(request.target) + len(b" HTTP/1.1\r\n")
    return request_line + sum(len(name) + len(b": \r\n") + len(value) for name, value in request.headers)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""  # an unregistered code: the reason phrase is optional


def _peer_name(stream: SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"  # the peer is already gone
    return format_address(address)
