"""HTTP/1.1 between a verified client and a plain backend: identity headers in, forged ones out (sans-IO).

Theory of operation
-------------------
One client connection maps to exactly one backend connection, and they live and die together (as in tcp mode).
An `HttpRelay` sits between them:

    client bytes --> h11 SERVER (parses requests)  --rewrite, serialise-->  backend bytes
    client bytes <-- head rewritten, body as is    <--proxy.protocol.http1_response--  backend bytes

The relay does no I/O. The driver feeds what it read (`from_client`, `from_backend`; b"" means EOF) and gets a
`Step` back: bytes to write to each peer, whether to close, whether to switch to a raw byte pump. Every piece is
passed on the moment it is parsed, so a body streams through in pieces as large as one read; no body is ever
buffered whole.

The common request, an HTTP/1.1 head with one Host and no body, is read by `proxy.protocol.http1_request`, which
accepts only a strict subset of what h11 accepts and reads it the same way (that cut the relay's CPU per request
from 37 to 14 us in ``bench/relay.py``). Every other request is parsed by h11, a fresh receive-only connection per
request (h11 only starts a connection's next cycle after our response went through it, and responses do not).
Either way the request is rewritten once, at the head
(`_request_headers`):
  1. every header the proxy owns is dropped, in any spelling (see "Stripping" in proxy.protocol.identity_headers);
  2. hop-by-hop headers are dropped and `Connection` is rebuilt with only `close` / `upgrade`, so a client cannot
     name one of our headers in `Connection` and have a later hop delete it;
  3. the proxy's own headers are appended: XFCC (verified clients only), X-Forwarded-For, X-Forwarded-Proto and
     the configured extras. They are computed once per connection, since the identity cannot change.
The head is then written out as HTTP/1.1 from h11's checked values; the body keeps its framing (Content-Length
bytes as they came, chunked re-chunked per piece). Trailers of chunked requests get step 1 too.

Responses are not parsed by h11: `proxy.protocol.http1_response` reads the head strictly and follows the body
framing, and the body goes to the client byte for byte (h11 parsing and re-serialising both directions cost more
than half of the relay's time per request). The head is written again unchanged except for what this client
needs: HTTP/1.1 in the status line, `Connection: close` when the connection is ending, and for an HTTP/1.0 client
a chunked body de-chunked (for an HTTP/1.1 client a body delimited by the backend's close is chunked, so the end
is explicit).

One request/response cycle runs at a time. A pipelined request waits in the request parser's buffer until the
response to the previous one is complete; then the next cycle starts and the waiting request is forwarded. That
happens inside `from_backend`, which is why one Step can carry bytes for both peers. While a request waits,
`client_paused` is True and the driver must stop reading from the client: that is what bounds the memory a
pipelining client can make us hold.

States
------
Where a cycle stands is one `State`, changed only by `HttpRelay._transition(event)` through the `TRANSITIONS` table
(the habit of h11's `_state.py`): a combination such as "a response body is flowing but no request was sent" has no
name, so it cannot be held. The relay checks what the peers did wrong (an unsolicited response, a 101 before the
request was complete) before it fires an event and answers those with 502; an event the table does not define
from the current state is a bug in the relay and raises `RelayStateError`.

    IDLE            --REQUEST_HEAD-->          REQUEST_BODY        (--CLIENT_CLOSED--> CLOSED)
    REQUEST_BODY    --REQUEST_END-->           AWAIT_RESPONSE
    REQUEST_BODY    --[LAST_]RESPONSE_HEAD-->  EARLY_RESPONSE      --REQUEST_END--> LAST_RESPONSE_BODY
    AWAIT_RESPONSE  --RESPONSE_HEAD-->         RESPONSE_BODY       --RESPONSE_END--> IDLE (the next cycle)
    AWAIT_RESPONSE  --LAST_RESPONSE_HEAD-->    LAST_RESPONSE_BODY  --RESPONSE_END--> CLOSED
    AWAIT_RESPONSE  --UPGRADE-->               SWITCHED
    EARLY_RESPONSE  --RESPONSE_END-->          CLOSED
    REQUEST_BODY and AWAIT_RESPONSE stay where they are on INFORMATIONAL (a 1xx); every state but CLOSED goes to
    CLOSED on ABORT (an error, or the driver's `fail`).

A response head that arrives before the whole request is always the last one (EARLY_RESPONSE): the rest of the
request body is still passed on, but the connection ends with the response. What is not a state stays a plain
field reset by `_new_cycle`: the request's method and version, its framing and `Connection: close`, the Upgrade
protocols offered, the response's framing and how much of its body is left.

Errors
------
Each error ends the connection; the Step carries an `error` label (one of `ERRORS`) and, if the client has no
response head for its current request yet, an error response (the status hint rides on the exception, as h11's
error_status_hint does):
- malformed request -> 400; header block over `max_header_bytes` -> 431; a transfer coding other than chunked
  -> 501; CONNECT -> 405; both Content-Length and Transfer-Encoding -> 400 (the request-smuggling shape, RFC 9112
  section 6.3, refused rather than repaired).
- framing that h11 accepts but a backend could read differently -> 400: Transfer-Encoding in an HTTP/1.0 request
  (RFC 9112 section 6.1: faulty framing), a Content-Length or a chunk size that does not fit in 64 bits (h11 reads
  any number of digits, a backend that wraps round would see another length and take the rest for a request of
  its own). Chunked request bodies are followed beside h11 by the response side's strict `ChunkedReader` for that.
- an HTTP/1.0 request without Host -> 400. HTTP/1.1 requires Host and h11 enforces it; 1.0 did not, and nginx
  would fill in its server_name. This proxy has no one authority to fill in (it may listen on several names, SNI
  is optional), and a made-up Host could route the request to a virtual host the client never named.
- malformed, truncated or unsolicited response -> 502.
- the driver reports backend failures with `fail(502)` (unreachable, reset, a failed write) or `fail(504)`
  (connect timeout); `render_error_response` renders the same responses for use without a relay.

Upgrade
-------
After a 101 the connection is a raw byte pump: the relay no longer reads what passes, so it can no longer strip
or add a header. That is fine for a protocol that carries no HTTP requests (WebSocket), and fatal for one that does:
after `Upgrade: h2c` the client's HTTP/2 streams would reach the backend with whatever identity headers the client
wrote. So only protocols on the policy's allow-list (`backend.upgrades`, default websocket; h2c is refused at
construction) may be upgraded to:
  - `Upgrade` counts only in HTTP/1.1 and when `Connection` names it (RFC 9110 section 7.8). Each protocol in it
    (`name` or `name/version`) is kept when its name, compared case-insensitively and without the version, is on
    the allow-list; the others are dropped. If none is left the request goes on as a plain request, without
    `Upgrade` and without `Connection: upgrade`. `HTTP2-Settings` never passes (it is hop-by-hop for h2c, RFC 7540
    section 3.2.1).
  - A `101 Switching Protocols` is accepted only after a complete request that offered an allowed protocol, and
    only if every protocol in the 101's `Upgrade` was offered. Any other 101 gets the client a 502 and the
    connection closes (`upgrade_refused`): no tunnel is opened that the proxy did not agree to.
On an accepted 101 the Step carries the 101 for the client and a `SwitchToRaw` with the bytes each side had
already sent past the HTTP part. The driver writes the 101, then the leftovers, then pumps raw bytes
(proxy.relay.tcp_forwarder). Bytes fed to the relay after the switch (a read already in flight) pass through untouched.

Driving it from two trio tasks
------------------------------
Connect to the backend first (`fail(502)` / `fail(504)` if that fails), then run two tasks. One reads the client
and calls `from_client`, the other reads the backend and calls `from_backend`; a read error from the backend is
`from_backend(b"")`, a write error to it is `fail(502)`, a broken client connection ends everything. Either call
can return bytes for either peer, and one Step can hold bytes for both, so hold one lock from the call until that
step's bytes are written: then each peer gets its bytes in the order the relay produced them. Before each client
read, wait while `relay.client_paused` (the backend task wakes the client task after each of its steps, e.g. with
a trio.Condition). After feeding b"" for a peer, stop reading that peer. Stop both tasks on `step.close`, after
writing that step's bytes. `proxy.relay.http1_forwarder` is that driver.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import h11

from proxy.policy.identity import PeerIdentity
from proxy.protocol.http1_request import read_plain_request
from proxy.protocol.http1_response import (
    BadResponse,
    ChunkedReader,
    Framing,
    ResponseHead,
    connection_tokens,
    framing,
    read_head,
)
from proxy.protocol.identity_headers import FRAMING_HEADERS, HOP_BY_HOP, protocol_name

# HeaderPolicy lived here before the identity headers had a module of their own; other modules import it from here.
from proxy.protocol.identity_headers import HeaderPolicy as HeaderPolicy

# Content-Length digits that always fit in 63 bits (a signed 64-bit off_t, as nginx and most servers read it).
_MAX_LENGTH_DIGITS = 18

_REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _upgrade_protocols(values: Iterable[bytes]) -> list[bytes]:
    """The protocols listed in Upgrade header values, stripped, in order (`b"websocket, foo/2"` -> two)."""
    return [token.strip() for value in values for token in value.split(b",") if token.strip()]


# ---- results -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwitchToRaw:
    """The backend accepted an Upgrade: from now on both sides speak raw bytes.

    Write the Step's `to_client` (the 101) first, then `backend_leftover` to the client and `client_leftover` to
    the backend, then pump. `*_eof` says that side had already closed its sending half.
    """

    client_leftover: bytes
    backend_leftover: bytes
    client_eof: bool = False
    backend_eof: bool = False


class Step(NamedTuple):
    """What one call produced. Write `to_backend` and `to_client` (either may be empty), then act on the flags.

    A NamedTuple, not a frozen dataclass: as immutable, and built in half the time (two per request).
    """

    to_backend: bytes = b""
    to_client: bytes = b""
    close: bool = False  # after writing this step's bytes, close both connections
    switch: SwitchToRaw | None = None
    requests: int = 0  # request heads forwarded to the backend in this step
    statuses: tuple[int, ...] = ()  # status of each final response (or 101) whose head went to the client
    error: str | None = None  # why the relay ended the connection: one of ERRORS, for logs and metrics labels
    detail: str = ""  # free text about the error (h11's message), for the log only


# The closed set of Step.error values.
ERRORS = (
    "bad_request",  # 400: malformed request (h11), ambiguous framing (see "Errors"), an HTTP/1.0 request without Host
    "headers_too_large",  # 431
    "not_implemented",  # 501: a transfer coding other than chunked
    "connect_not_allowed",  # 405: CONNECT is not proxied
    "bad_response",  # 502 (or close): malformed, truncated or unsolicited backend response
    "upgrade_refused",  # 502: a 101 to a protocol the client did not offer or the allow-list does not name
    "backend_closed",  # the backend closed while no request was in flight: close, no response
    "backend_unreachable",  # fail(502)
    "backend_timeout",  # fail(504)
)


class _Out:
    """What one call is producing. Pieces are joined once, in `step()`: a body read passes through uncopied."""

    __slots__ = ("_to_backend", "_to_client", "close", "detail", "error", "requests", "statuses", "switch")

    def __init__(self) -> None:
        self._to_backend: list[bytes] = []
        self._to_client: list[bytes] = []
        self.close = False
        self.switch: SwitchToRaw | None = None
        self.requests = 0
        self.statuses: list[int] = []
        self.error: str | None = None
        self.detail = ""

    def backend(self, data: bytes) -> None:
        self._to_backend.append(data)

    def client(self, data: bytes) -> None:
        self._to_client.append(data)

    def step(self) -> Step:
        return Step(
            to_backend=b"".join(self._to_backend),
            to_client=b"".join(self._to_client),
            close=self.close,
            switch=self.switch,
            requests=self.requests,
            statuses=tuple(self.statuses),
            error=self.error,
            detail=self.detail,
        )


class _Reject(Exception):
    """Ends the connection. `status`: the error response the client gets if it has no response head yet."""

    def __init__(self, status: int | None, error: str, detail: str = "") -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.status = status
        self.error = error
        self.detail = detail


# ---- the cycle's states (see "States" in the module docstring) --------------------------------------------------


class State(enum.Enum):
    """Where one request/response cycle stands; SWITCHED and CLOSED end the connection's cycles."""

    IDLE = "idle"  # no request in this cycle yet: a response now is unsolicited
    REQUEST_BODY = "request_body"  # request head forwarded, its body still arriving; no final response head yet
    AWAIT_RESPONSE = "await_response"  # request complete; the final response head is awaited (1xx pass on)
    EARLY_RESPONSE = "early_response"  # a final response head went out while the request body still arrives
    RESPONSE_BODY = "response_body"  # request complete, response body flowing; the connection stays open after it
    LAST_RESPONSE_BODY = "last_response_body"  # request complete, response body flowing; the connection ends with it
    SWITCHED = "switched"  # an accepted 101: bytes pass raw, the relay no longer reads them
    CLOSED = "closed"  # the connection is over

    # Members are singletons, so identity is equality. Enum's own __hash__ is a Python function; with object's, a
    # lookup in the table (several per request) takes half as long.
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What moves a cycle: something parsed from a peer, or an end the relay decided."""

    REQUEST_HEAD = "request_head"  # a request head went to the backend
    REQUEST_END = "request_end"  # the request body is complete (at once for a request without one)
    CLIENT_CLOSED = "client_closed"  # the client's EOF between requests
    INFORMATIONAL = "informational"  # a 1xx other than 101 (passed on, or dropped for an HTTP/1.0 client)
    RESPONSE_HEAD = "response_head"  # a final response head after which the connection may stay open
    LAST_RESPONSE_HEAD = "last_response_head"  # a final response head after which the connection ends
    RESPONSE_END = "response_end"  # the response body is complete (at once for a response without one)
    UPGRADE = "upgrade"  # a 101 the relay accepted: the connection becomes a raw pump
    ABORT = "abort"  # an error, or the driver's fail(): the connection ends now

    __hash__ = object.__hash__  # as State's


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.IDLE, Event.REQUEST_HEAD): State.REQUEST_BODY,
    (State.IDLE, Event.CLIENT_CLOSED): State.CLOSED,
    (State.REQUEST_BODY, Event.REQUEST_END): State.AWAIT_RESPONSE,
    (State.REQUEST_BODY, Event.INFORMATIONAL): State.REQUEST_BODY,  # e.g. 100 Continue
    # An answer before the whole request is the last one whatever its head says: the backend may not read the
    # rest of the body, so nothing after it could be framed.
    (State.REQUEST_BODY, Event.RESPONSE_HEAD): State.EARLY_RESPONSE,
    (State.REQUEST_BODY, Event.LAST_RESPONSE_HEAD): State.EARLY_RESPONSE,
    (State.AWAIT_RESPONSE, Event.INFORMATIONAL): State.AWAIT_RESPONSE,
    (State.AWAIT_RESPONSE, Event.RESPONSE_HEAD): State.RESPONSE_BODY,
    (State.AWAIT_RESPONSE, Event.LAST_RESPONSE_HEAD): State.LAST_RESPONSE_BODY,
    (State.AWAIT_RESPONSE, Event.UPGRADE): State.SWITCHED,  # only after a complete request
    (State.EARLY_RESPONSE, Event.REQUEST_END): State.LAST_RESPONSE_BODY,
    (State.EARLY_RESPONSE, Event.RESPONSE_END): State.CLOSED,
    (State.RESPONSE_BODY, Event.RESPONSE_END): State.IDLE,  # the next cycle
    (State.LAST_RESPONSE_BODY, Event.RESPONSE_END): State.CLOSED,
    **{(state, Event.ABORT): State.CLOSED for state in State if state is not State.CLOSED},
}

# Groups the relay branches on. Each is a set of states, so no flag can disagree with the state.
# Client bytes are parsed as they come (a request head, or the rest of a request body).
_READS_REQUEST = frozenset({State.IDLE, State.REQUEST_BODY, State.EARLY_RESPONSE})
# The request is complete: more client bytes wait in the parser until the next cycle.
_REQUEST_DONE = frozenset({State.AWAIT_RESPONSE, State.RESPONSE_BODY, State.LAST_RESPONSE_BODY})
# The client has a final response head for this cycle; backend bytes belong to its body.
_IN_RESPONSE_BODY = frozenset({State.EARLY_RESPONSE, State.RESPONSE_BODY, State.LAST_RESPONSE_BODY})


# Reading an Enum member through its class costs about 100 ns on Python 3.11, five times a plain class attribute,
# and the relay does it several times per request: the relay reads these module names instead.
_IDLE, _AWAIT_RESPONSE, _RESPONSE_BODY = State.IDLE, State.AWAIT_RESPONSE, State.RESPONSE_BODY
_SWITCHED, _CLOSED = State.SWITCHED, State.CLOSED
_REQUEST_HEAD, _REQUEST_END, _CLIENT_CLOSED = Event.REQUEST_HEAD, Event.REQUEST_END, Event.CLIENT_CLOSED
_INFORMATIONAL, _UPGRADE, _ABORT = Event.INFORMATIONAL, Event.UPGRADE, Event.ABORT
_RESPONSE_HEAD, _LAST_RESPONSE_HEAD, _RESPONSE_END = Event.RESPONSE_HEAD, Event.LAST_RESPONSE_HEAD, Event.RESPONSE_END
_ENDED = frozenset({_SWITCHED, _CLOSED})  # no more cycles: bytes pass raw, or nothing passes


class RelayStateError(Exception):
    """The relay fired an event its state does not allow: a bug in the relay, never something a peer did."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"internal error in HttpRelay: no transition from {state.name} on {event.name}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """Where `event` leads from `state`, by `TRANSITIONS`; RelayStateError if the table has no such step."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise RelayStateError(state, event) from None


# ---- the relay ---------------------------------------------------------------------------------------------------


class HttpRelay:
    """One client connection and its backend connection, HTTP/1.1 on both. See the module docstring."""

    def __init__(
        self,
        policy: HeaderPolicy,
        *,
        client_ip: str,
        identity: PeerIdentity | None,
        leaf_der: bytes | None = None,
    ) -> None:
        self._policy = policy
        self._added = policy.added_headers(client_ip=client_ip, identity=identity, leaf_der=leaf_der)
        self._limit = policy.max_header_bytes
        self._client = self._parser(b"", False)
        self._client_fresh = True  # self._client has been given no bytes: the fast path may read a request
        self._backend_head = bytearray()  # a response head still arriving
        self.requests = 0  # request heads forwarded on this connection
        self._state = _IDLE
        self._new_cycle()

    def _parser(self, data: bytes, eof: bool) -> h11.Connection:
        """A fresh h11 server connection that has read `data` (and the client's EOF if `eof`).

        Each request gets its own: h11 starts a connection's next cycle only after our response went through it,
        and responses go to the client as the backend sent them (`proxy.protocol.http1_response`), not through h11.
        """
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limit)
        if data:
            parser.receive_data(data)
        if eof:
            parser.receive_data(b"")
        return parser

    def _new_cycle(self) -> None:
        """The plain fields of a cycle, back to their start (the state is IDLE already)."""
        self._method = b""
        self._client_version = b"1.1"
        self._request_chunked = False
        self._request_chunks: ChunkedReader | None = None  # strict check of a chunked request body (see "Errors")
        self._request_closes = False  # the client asked for the connection to end after this exchange
        self._upgrades_offered: frozenset[str] = frozenset()  # allowed protocol names forwarded in Upgrade
        self._body = Framing.NONE  # the response body's framing, read in the states _IN_RESPONSE_BODY
        self._body_left = 0  # Framing.LENGTH: bytes still to come
        self._chunks: ChunkedReader | None = None  # Framing.CHUNKED
        self._dechunk = False  # chunked response to an HTTP/1.0 client: send the payload, close-delimited
        self._rechunk = False  # close-delimited response to an HTTP/1.1 client: chunk it, as h11 would

    def _transition(self, event: Event) -> None:
        # next_state, inlined: this runs four times per request.
        try:
            self._state = TRANSITIONS[self._state, event]
        except KeyError:
            raise RelayStateError(self._state, event) from None

    @property
    def state(self) -> State:
        """Where the current cycle stands (for tests and debugging; the driver needs only the properties below)."""
        return self._state

    @property
    def client_paused(self) -> bool:
        """True while a complete request waits for its response and more client bytes are buffered: stop reading."""
        return self._state in _REQUEST_DONE and bool(self._client.trailing_data[0])

    @property
    def closed(self) -> bool:
        return self._state is _CLOSED

    @property
    def switched(self) -> bool:
        return self._state is _SWITCHED

    # -- entry points --

    def from_client(self, data: bytes) -> Step:
        """Bytes read from the client; b"" = the client closed its sending half (stop reading it then)."""
        state = self._state
        if state in _READS_REQUEST:
            return self._run(lambda out: self._on_client_bytes(data, out))
        if state is _CLOSED:
            return Step(close=True)
        if state is _SWITCHED:
            return Step(to_backend=data) if data else Step(close=True)
        self._client_fresh = False
        self._client.receive_data(data)
        return Step()  # the next request waits for this response (client_paused tells the driver)

    def from_backend(self, data: bytes) -> Step:
        """Bytes read from the backend; b"" = the backend closed (also pass b"" when a read from it fails)."""
        if self._state in _ENDED:
            if self._state is _CLOSED:
                return Step(close=True)
            return Step(to_client=data) if data else Step(close=True)
        if data:
            return self._run(lambda out: self._on_backend_bytes(data, out))
        return self._run(self._on_backend_eof)

    def fail(self, status: int = 502) -> Step:
        """The driver could not reach the backend (502, also for a failed write to it) or timed out connecting (504).

        The client gets `status` if it has no response head for its current request yet; either way, close.
        """
        if self._state is _CLOSED:
            return Step(close=True)
        error = "backend_timeout" if status == 504 else "backend_unreachable"
        out = _Out()
        self._reject(out, _Reject(None if self._state is _SWITCHED else status, error))
        return out.step()

    def _run(self, handle: Callable[[_Out], None]) -> Step:
        out = _Out()
        try:
            handle(out)
        except BadResponse as exc:
            self._reject(out, _Reject(502, "bad_response", str(exc)))
        except _Reject as reject:
            self._reject(out, reject)
        return out.step()

    def _reject(self, out: _Out, reject: _Reject) -> None:
        if reject.status is not None and self._state not in _IN_RESPONSE_BODY:
            out.client(render_error_response(reject.status, head=self._method == b"HEAD"))
            out.statuses.append(reject.status)
        out.error = reject.error
        out.detail = reject.detail
        self._end(out, _ABORT)

    def _end(self, out: _Out, event: Event) -> None:
        """Fire an event that ends the connection, and tell the driver to close."""
        self._transition(event)
        assert self._state is _CLOSED, self._state
        out.close = True

    # -- requests: parsed by h11, written again with the identity headers --

    def _on_client_bytes(self, data: bytes, out: _Out) -> None:
        if self._state is _IDLE and self._client_fresh and data:
            plain = read_plain_request(data, self._limit)
            if plain is not None:
                # The common request (see proxy.protocol.http1_request): no h11, no body, so it is complete now.
                self._forward_head(plain.method, plain.target, b"1.1", plain.headers, out)
                self._transition(_REQUEST_END)
                data = data[plain.size:]
                if not data:
                    return
        if self._request_chunks is not None:
            self._check_request_chunks(data)  # before h11 sees them, so nothing of a bad chunk is forwarded
        self._client_fresh = False
        self._client.receive_data(data)
        self._drain_client(out)

    def _check_request_chunks(self, data: bytes) -> None:
        assert self._request_chunks is not None
        try:
            self._request_chunks.skip(data)
        except BadResponse as exc:
            raise _Reject(400, "bad_request", str(exc)) from exc

    def _drain_client(self, out: _Out) -> None:
        while self._state in _READS_REQUEST:
            try:
                event = self._client.next_event()
            except h11.RemoteProtocolError as exc:
                raise _client_error(exc) from exc
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._forward_request(event, out)
            elif isinstance(event, h11.Data):
                if event.data:  # (an empty chunk would be the last-chunk marker)
                    out.backend(_chunk(event.data) if self._request_chunked else event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._transition(_REQUEST_END)
                if self._request_chunked:
                    trailers = [(n, v) for n, v in event.headers.raw_items() if not self._policy.is_stripped(n)]
                    out.backend(_render_fields(b"0", trailers))
            elif isinstance(event, h11.ConnectionClosed):
                self._end(out, _CLIENT_CLOSED)  # between requests: the client is done (one parser a request)

    def _forward_request(self, request: h11.Request, out: _Out) -> None:
        self._forward_head(request.method, request.target, request.http_version, request.headers.raw_items(), out)

    def _forward_head(self, method: bytes, target: bytes, version: bytes, headers: Iterable[tuple[bytes, bytes]],
                      out: _Out) -> None:
        """A request head, checked and written to the backend with the identity headers: the state moves to
        REQUEST_BODY. `headers`: names as the client spelled them; values as the parser left them."""
        self._method = method
        self._client_version = version
        self._transition(_REQUEST_HEAD)
        fields = list(headers)
        if _head_size(method, target, fields) > self._limit:
            raise _Reject(431, "headers_too_large")
        if method == b"CONNECT":
            raise _Reject(405, "connect_not_allowed")
        names = {name.lower() for name, _ in fields}
        _check_framing(version, fields, names)
        self._request_chunked = b"transfer-encoding" in names
        if self._request_chunked:  # h11 accepts no coding but chunked
            self._request_chunks = ChunkedReader(self._limit)
            self._check_request_chunks(self._client.trailing_data[0])  # the body bytes that came with the head
        request_line = b"%s %s HTTP/1.1" % (method, target)
        out.backend(_render_fields(request_line, self._request_headers(version, fields)))
        out.requests += 1
        self.requests += 1

    def _request_headers(self, version: bytes, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        tokens = connection_tokens(fields)
        dropped = (tokens - FRAMING_HEADERS) | HOP_BY_HOP
        headers = [
            (raw, value)
            for raw, value in fields
            if raw.lower() not in dropped and not self._policy.is_stripped(raw)
        ]
        offered = self._offered_upgrades(version, fields, tokens)
        if offered:
            headers.append((b"Upgrade", b", ".join(offered)))
        self._upgrades_offered = frozenset(protocol_name(protocol) for protocol in offered)
        self._request_closes = b"close" in tokens or version < b"1.1"
        flags = ((b"upgrade", bool(offered)), (b"close", self._request_closes))
        connection = [token for token, on in flags if on]
        if connection:
            headers.append((b"Connection", b", ".join(connection)))
        return headers + self._added

    def _offered_upgrades(self, version: bytes, fields: list[tuple[bytes, bytes]],
                          connection_tokens: frozenset[bytes]) -> list[bytes]:
        """The Upgrade protocols that go on to the backend: only allowed ones (see "Upgrade" in the docstring)."""
        # Upgrade counts only in HTTP/1.1 and when Connection names it (RFC 9110 section 7.8).
        if version < b"1.1" or b"upgrade" not in connection_tokens:
            return []
        protocols = _upgrade_protocols(value for name, value in fields if name.lower() == b"upgrade")
        return self._policy.allowed_upgrades(protocols)

    # -- responses: framed by proxy.protocol.http1_response, passed on as they came --

    def _on_backend_bytes(self, data: bytes, out: _Out) -> None:
        while data:
            if self._state in _IN_RESPONSE_BODY:
                data = self._relay_body(data, out)
                continue
            if self._state in _ENDED:
                return
            self._backend_head += data
            parsed = read_head(self._backend_head, self._limit)
            if parsed is None:
                return
            head, size = parsed
            data = bytes(self._backend_head[size:])
            self._backend_head.clear()
            self._on_head(head, data, out)

    def _on_head(self, head: ResponseHead, rest: bytes, out: _Out) -> None:
        if self._state is _IDLE:
            raise BadResponse("a response without a request")
        status_line = b"HTTP/1.1 %d %s" % (head.status, head.reason)
        if head.status == 101:
            self._switch(status_line, head, rest, out)
            return
        if head.status < 200:
            self._transition(_INFORMATIONAL)
            if self._client_version >= b"1.1":  # no 1xx to an HTTP/1.0 client (RFC 9110 section 15.2)
                out.client(_render_fields(status_line, head.headers))
            return
        body, length = framing(head, self._method)
        headers = head.headers
        self._dechunk = body is Framing.CHUNKED and self._client_version < b"1.1"
        self._rechunk = body is Framing.CLOSE and self._client_version >= b"1.1"
        if self._dechunk:
            headers = [(raw, value) for raw, value in headers if raw.lower() != b"transfer-encoding"]
        if self._rechunk:
            headers = [*headers, (b"Transfer-Encoding", b"chunked")]
        # The connections end together: if the backend or the client is closing, this response is the last one; so
        # is an answer that came before the whole request (the table sends that to EARLY_RESPONSE either way).
        last = self._request_closes or not head.keeps_alive() or body is Framing.CLOSE
        self._transition(_LAST_RESPONSE_HEAD if last else _RESPONSE_HEAD)
        if self._state is not _RESPONSE_BODY:
            headers = _with_close(headers)
        out.client(_render_fields(status_line, headers))
        out.statuses.append(head.status)
        self._body, self._body_left = body, length
        self._chunks = ChunkedReader(self._limit) if body is Framing.CHUNKED else None
        if body is Framing.NONE:
            self._finish_cycle(out)

    def _relay_body(self, data: bytes, out: _Out) -> bytes:
        """Pass on the part of `data` that belongs to the current body; return the rest (the next response)."""
        if self._body is Framing.LENGTH:
            used = min(len(data), self._body_left)
            out.client(data if used == len(data) else data[:used])
            self._body_left -= used
            ended = not self._body_left
        elif self._body is Framing.CHUNKED:
            assert self._chunks is not None
            used, payload = self._chunks.feed(data)
            out.client(b"".join(payload) if self._dechunk else data if used == len(data) else data[:used])
            ended = self._chunks.done
        else:  # Framing.CLOSE: it all belongs to the body
            out.client(_chunk(data) if self._rechunk else data)
            return b""
        if not ended:
            return b""
        self._finish_cycle(out)
        return data[used:]

    def _on_backend_eof(self, out: _Out) -> None:
        if self._state in _IN_RESPONSE_BODY and self._body is Framing.CLOSE:
            if self._rechunk:
                out.client(b"0\r\n\r\n")
            self._finish_cycle(out)  # always the last response: a close-delimited head is LAST_RESPONSE_HEAD
        elif self._state in _IN_RESPONSE_BODY:
            raise BadResponse("the backend closed in the middle of a response body")
        elif self._backend_head:
            raise BadResponse("the backend closed in the middle of a response head")
        elif self._state is not _IDLE:
            raise BadResponse("the backend closed without responding")
        else:
            # No request in flight: the client has asked nothing, so it gets no 502, just the close.
            raise _Reject(None, "backend_closed")

    def _finish_cycle(self, out: _Out) -> None:
        self._transition(_RESPONSE_END)
        if self._state is _CLOSED:
            out.close = True
            return
        leftover, eof = self._client.trailing_data
        self._new_cycle()
        if not self._client_fresh:  # (a fresh parser, one the last request did not go through, serves again)
            self._client = self._parser(leftover, eof)
            self._client_fresh = not (leftover or eof)
        if leftover or eof:
            self._drain_client(out)  # a pipelined request (or the client's EOF) was waiting

    def _switch(self, status_line: bytes, head: ResponseHead, rest: bytes, out: _Out) -> None:
        switched_to = {protocol_name(protocol) for protocol in _upgrade_protocols(head.values(b"upgrade"))}
        if not self._upgrades_offered or not switched_to or not switched_to <= self._upgrades_offered:
            offered = ", ".join(sorted(self._upgrades_offered)) or "none"
            raise _Reject(502, "upgrade_refused", f"101 to {sorted(switched_to)} (allowed and offered: {offered})")
        if self._state is not _AWAIT_RESPONSE:
            raise BadResponse("101 before the upgrade request was complete")
        out.client(_render_fields(status_line, head.headers))
        out.statuses.append(101)
        client_leftover, client_eof = self._client.trailing_data
        out.switch = SwitchToRaw(client_leftover, rest, client_eof)
        self._transition(_UPGRADE)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _check_framing(version: bytes, fields: list[tuple[bytes, bytes]], names: set[bytes]) -> None:
    """Refuse what h11 lets through but a backend might frame differently (see "Errors" in the module docstring).

    `names`: the request's header names, lowercase.
    """
    if b"content-length" in names and b"transfer-encoding" in names:
        raise _Reject(400, "bad_request", "both Content-Length and Transfer-Encoding")
    if version < b"1.1":
        if b"transfer-encoding" in names:
            raise _Reject(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if b"host" not in names:
            raise _Reject(400, "bad_request", "an HTTP/1.0 request without Host")
    if b"content-length" in names:
        # h11 has checked that it is digits and merged identical copies into one.
        length = next(value for name, value in fields if name.lower() == b"content-length")
        if len(length) > _MAX_LENGTH_DIGITS:
            raise _Reject(400, "bad_request", f"Content-Length {length[:40]!r} is too large")


def _client_error(exc: h11.RemoteProtocolError) -> _Reject:
    status = exc.error_status_hint
    error = {431: "headers_too_large", 501: "not_implemented"}.get(status, "bad_request")
    return _Reject(status, error, str(exc))


def _head_size(first: bytes, second: bytes, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of a request line (or status line) and header block, give or take obs-fold: what the limit measures.

    h11 enforces max_incomplete_event_size only while a head is still incomplete; a whole head that arrives in one
    read is checked here.
    """
    return len(first) + len(second) + 12 + sum(len(name) + len(value) + 4 for name, value in headers) + 2


def _with_close(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with `close` among the Connection tokens (and no `keep-alive`), in a single Connection header."""
    tokens = connection_tokens(headers)
    if b"close" in tokens:
        return headers
    kept = [*sorted(tokens - {b"keep-alive"}), b"close"]
    others = [(raw, value) for raw, value in headers if raw.lower() != b"connection"]
    return [*others, (b"Connection", b", ".join(kept))]


def _render_fields(first_line: bytes, fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A request or status line (or a last-chunk line) and its fields, up to and including the blank line.

    Every name and value here was either checked by a parser (h11 for requests, `proxy.protocol.http1_response` for
    responses) or built by `HeaderPolicy` from header-safe text, so nothing needs escaping.
    """
    return b"".join([first_line, b"\r\n", *(b"%s: %s\r\n" % field for field in fields), b"\r\n"])


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def render_error_response(status: int, *, head: bool = False) -> bytes:
    """A complete error response the proxy itself sends: short text/plain body, then the connection closes.

    For 400, 405, 431, 501 (client errors found here) and 502, 504 (the driver's backend failures). `head`: the
    request was HEAD, so the body is left out (the headers still say how long it would be).
    """
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason}\n".encode("ascii")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head_bytes if head else head_bytes + body
