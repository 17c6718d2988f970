"""One HTTP/2 stream over its own HTTP/1.1 backend connection: the translation both ways (sans-IO; no trio, no h2).

Why a translation, and where it can go wrong
--------------------------------------------
`backend.http_version: "1.1"` puts HTTP/2 clients in front of a backend that speaks only HTTP/1.1. Each client
stream gets a backend connection of its own (`proxy.protocol.http2.Http2Relay` opens and closes them), and an
`Http1Exchange` turns the stream's request into HTTP/1.1 bytes and the backend's HTTP/1.1 response into what the
relay sends on the stream. No h2 here: headers are (name, value) byte pairs in and out, bodies are bytes.

Downgrading HTTP/2 to HTTP/1.1 is where request smuggling lives: HTTP/2 frames a request by its frames, HTTP/1.1
by text the request itself carries. So the request is written again from checked parts and never copied:
  - the request line from `:method` (a token) and `:path` (visible ASCII, origin-form, or `*` for OPTIONS); `Host`
    from `:authority` (or the `host` field when there is no `:authority`; both and different is malformed,
    RFC 9113 section 8.3.1);
  - every field name a lowercase token and every value without control characters or surrounding whitespace, so
    nothing can end a line or the head early (h2 checks this too; this module does not rely on it);
  - the framing is the proxy's: a `content-length` the client sent (one value, digits) is the body's length and
    is held to it; with none, a body that is complete when the head is written gets the length it has, any other
    is sent chunked. Transfer-Encoding and the other connection-specific fields (RFC 9113 section 8.2.2) never
    pass, `te` is dropped (`te: trailers` is an HTTP/2 promise the backend cannot keep), and `Connection: close`
    is added: the connection carries this one request;
  - cookies sent as several `cookie` fields are joined with "; " into one (RFC 9113 section 8.2.3);
  - every identity header the `HeaderPolicy` owns is dropped in any spelling and the proxy's own are appended, as
    in HTTP/1.1 mode (`proxy.protocol.http1`).
The body's end is never sent before the client's END_STREAM: with a Content-Length the last byte waits for it.
So a request that ends in a way HTTP/1.1 cannot say (with trailers) is never complete on the backend, which then
cannot act on it as if it were; the stream gets a clear error instead.

Refused, with a `Refused` that carries the answer (RFC 9113 section 8.1.1 lets the proxy answer before it resets):
  - a malformed request: 400;
  - CONNECT and extended CONNECT (`:protocol`, RFC 8441): 405, there are no tunnels, as in HTTP/1.1 mode;
  - gRPC (`content-type: application/grpc*`): it needs trailers and full-duplex streams; the relay answers with
    a trailers-only response, `grpc-status: 12` UNIMPLEMENTED and a `grpc-message` that names the setting;
  - request trailers (`request_trailers()`): 501 with a short body.

The response is read with the strict reader of HTTP/1.1 mode (`proxy.protocol.http1_response`): anything it
does not accept is a `BadResponse`, which the relay answers with 502 (or a reset once the head has gone out). The
head becomes a `Response` with `:status` first and lowercase names, less the connection-specific fields and those
the `Connection` header names (RFC 9110 section 7.6.1); a 1xx other than 101 is an `Informational`; a 101 is a
`BadResponse` (a stream cannot switch protocols). The body arrives as `Data` and ends with `Ended`, which carries
the trailer section of a chunked response as fields.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from proxy.protocol.http1_response import (
    MAX_CHUNK_LINE,
    BadResponse,
    ChunkedReader,
    Framing,
    ResponseHead,
    connection_tokens,
    framing,
    read_head,
)
from proxy.protocol.identity_headers import HeaderPolicy

__all__ = [
    "GRPC_MESSAGE",
    "REFUSALS",
    "TRAILERS_MESSAGE",
    "BadResponse",
    "Data",
    "Ended",
    "Header",
    "Http1Exchange",
    "Informational",
    "Refused",
    "Response",
    "ResponseEvent",
]

Header = tuple[bytes, bytes]

# Fields that are about one connection (RFC 9113 section 8.2.2, RFC 9110 section 7.6.1), and `te`, which a
# response must not carry on HTTP/2 and a request to this backend has no use for.
_CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings", b"te"}
)
# Set by the proxy from the stream itself: a client's copy never passes as it is.
_FRAMING_FIELDS = frozenset({b"host", b"content-length"})

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a token in lowercase, as HTTP/2 requires
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_PATH = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII (h11 accepts no more in HTTP/1.1 mode)
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]+")  # host[:port]; no userinfo (RFC 9113 8.3.1)
_LAST_CHUNK = re.compile(rb"0{1,16}(?:[ \t]*;[\t \x21-\x7e\x80-\xff]*)?")
_MAX_LENGTH_DIGITS = 18  # a Content-Length that fits in 63 bits, as in HTTP/1.1 mode

# Methods whose requests are expected to carry content: an empty body is said with Content-Length: 0 (RFC 9110
# section 8.6 asks for no Content-Length on the others when they have none).
_CONTENT_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

GRPC_MESSAGE = 'the backend speaks HTTP/1.1 and gRPC needs HTTP/2: set backend.http_version to "2"'
TRAILERS_MESSAGE = "request trailers cannot be forwarded to an HTTP/1.1 backend"


class Refused(Exception):
    """The request cannot go to the HTTP/1.1 backend; the stream gets `status` and `message` (gRPC: 12).

    `reason` is one of REFUSALS, for logs and metrics.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# The closed set of Refused.reason values, with their status.
REFUSALS = {
    "malformed_request": 400,
    "connect_not_allowed": 405,
    "grpc_needs_http2": 501,
    "request_trailers": 501,
}


def _malformed(detail: str) -> Refused:
    return Refused(400, "malformed_request", detail)


# ---- what the response becomes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Informational:
    """A 1xx response other than 101: HEADERS on the stream before the final response."""

    headers: list[Header]


@dataclass(frozen=True, slots=True)
class Response:
    """The final response head; `ended`: it has no body (HEAD, 204, 304, Content-Length: 0) and nothing follows."""

    status: int
    headers: list[Header]
    ended: bool


@dataclass(frozen=True, slots=True)
class Data:
    """Response payload (de-chunked)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ended:
    """The response is complete; `trailers` are a chunked response's trailer fields (often none)."""

    trailers: list[Header] = field(default_factory=list)


ResponseEvent = Informational | Response | Data | Ended


class _Body(enum.Enum):
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"


# ---- one exchange ----------------------------------------------------------------------------------------------


class Http1Exchange:
    """One HTTP/2 request and its HTTP/1.1 response, on a backend connection of its own.

    Construction checks the request head (`Refused` if it cannot go). Then, in order: `request_head()` once the
    backend connection is up, `request_data()` for each piece of the body, `request_end()` at the client's
    END_STREAM (or `request_trailers()`, which refuses); beside them, `response_data()` with what the backend sent
    and `response_eof()` at its EOF, until `response_done`.
    """

    def __init__(self, headers: Iterable[Header], *, policy: HeaderPolicy, added: Sequence[Header]) -> None:
        self._limit = policy.max_header_bytes
        self.method = b""
        self._path = b""
        self._authority: bytes | None = None
        self._host: bytes | None = None
        self._protocol: bytes | None = None
        self._content_type = b""
        self._declared: int | None = None  # the client's content-length
        self._fields: list[Header] = []
        self._read_head(headers, policy)
        self._added = list(added)
        # request body
        self._body: _Body | None = None  # until the head is written
        self._length = 0  # LENGTH: the body's length
        self._sent = 0  # LENGTH: body bytes given out so far
        self._held = b""  # LENGTH: the last byte, until the client's END_STREAM
        self._request_ended = False
        # response
        self._head_buf = bytearray()
        self._response: Framing | None = None  # until the final head
        self._left = 0  # LENGTH: response body bytes still to come
        self._chunks: ChunkedReader | None = None
        self._tail = bytearray()  # CHUNKED: the last raw bytes, where the trailer section will be
        self.response_done = False

    # -- the request --

    def _read_head(self, headers: Iterable[Header], policy: HeaderPolicy) -> None:
        seen: set[bytes] = set()
        cookies: list[bytes] = []
        cookie_at: int | None = None
        lengths: list[bytes] = []
        for name, value in headers:
            if name.startswith(b":"):
                self._pseudo(name, value, seen)
                continue
            if _NAME.fullmatch(name) is None:
                raise _malformed(f"field name {name[:40]!r} is not a lowercase token")
            if _VALUE.fullmatch(value) is None:
                raise _malformed(f"the value of {name.decode('ascii')} has control characters or edge whitespace")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"host":
                if self._host is not None:
                    raise _malformed("more than one host field")
                self._host = value
            elif name in _CONNECTION_FIELDS or policy.is_stripped(name):
                continue  # the policy cannot own host or content-length: its config refuses them
            elif name == b"cookie":
                cookie_at = len(self._fields) if cookie_at is None else cookie_at
                cookies.append(value)
            else:
                if name == b"content-type":
                    self._content_type = value
                self._fields.append((name, value))
        if cookie_at is not None:
            self._fields.insert(cookie_at, (b"cookie", b"; ".join(cookies)))
        self._check_head(lengths)

    def _pseudo(self, name: bytes, value: bytes, seen: set[bytes]) -> None:
        if name in seen:
            raise _malformed(f"{name.decode('latin-1')} twice")
        seen.add(name)
        if name == b":method":
            self.method = value
        elif name == b":path":
            self._path = value
        elif name == b":authority":
            self._authority = value
        elif name == b":protocol":
            self._protocol = value
        elif name != b":scheme":  # the scheme is the client's to the proxy: X-Forwarded-Proto says it
            raise _malformed(f"unknown pseudo-header {name[:40]!r}")

    def _check_head(self, lengths: list[bytes]) -> None:
        if self.method == b"CONNECT" or self._protocol is not None:
            raise Refused(405, "connect_not_allowed", "CONNECT is not proxied")
        if self._content_type.lower().startswith(b"application/grpc"):
            raise Refused(501, "grpc_needs_http2", GRPC_MESSAGE)
        if _METHOD.fullmatch(self.method) is None:
            raise _malformed("no :method, or not a token")
        if not (_PATH.fullmatch(self._path) or (self._path == b"*" and self.method == b"OPTIONS")):
            raise _malformed("no :path, or not an origin-form path in visible ASCII")
        if self._authority is not None and self._host is not None and self._authority != self._host:
            raise _malformed(":authority and host differ")
        authority = self._authority if self._authority is not None else self._host
        if authority is None or _AUTHORITY.fullmatch(authority) is None:
            raise _malformed("no :authority or host, or one that is not host[:port]")
        self._authority = authority
        if lengths:
            if any(value != lengths[0] for value in lengths):
                raise _malformed("content-length fields that differ")
            if not lengths[0].isdigit() or len(lengths[0]) > _MAX_LENGTH_DIGITS:
                raise _malformed(f"content-length {lengths[0][:40]!r}")
            self._declared = int(lengths[0])

    def request_head(self, *, complete_body: int | None = None) -> bytes:
        """The request line and header block, once, when the backend connection is up.

        `complete_body`: the size of the whole body if the client's END_STREAM has already arrived (it then gets a
        Content-Length even if the client sent none), else None (a body of unknown length goes chunked).
        """
        if self._body is not None:
            raise RuntimeError("request_head() twice")
        fields = [(b"Host", self._authority or b""), *self._fields]
        length = self._declared if self._declared is not None else complete_body
        if length is None:
            self._body = _Body.CHUNKED
            fields.append((b"Transfer-Encoding", b"chunked"))
        else:
            self._body, self._length = _Body.LENGTH, length
            if length or self._declared is not None or self.method in _CONTENT_METHODS:
                fields.append((b"Content-Length", b"%d" % length))
        fields.append((b"Connection", b"close"))
        fields += self._added
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self._path)]
        lines += [b"%s: %s\r\n" % pair for pair in fields]
        lines.append(b"\r\n")
        return b"".join(lines)

    def request_data(self, data: bytes) -> bytes:
        """The bytes that carry `data` to the backend (after `request_head`)."""
        if self._body is None or self._request_ended:
            raise RuntimeError("request_data() before request_head() or after request_end()")
        if not data:
            return b""
        if self._body is _Body.CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if self._sent + len(self._held) + len(data) > self._length:
            raise _malformed(f"a body longer than its content-length ({self._length})")
        data = self._held + data
        if self._sent + len(data) == self._length:
            # The last byte waits for END_STREAM: until then the backend has no complete request (see the docstring).
            data, self._held = data[:-1], data[-1:]
        else:
            self._held = b""
        self._sent += len(data)
        return data

    def request_end(self) -> bytes:
        """The client's END_STREAM: what completes the request on the backend."""
        if self._body is None or self._request_ended:
            raise RuntimeError("request_end() before request_head() or twice")
        self._request_ended = True
        if self._body is _Body.CHUNKED:
            return b"0\r\n\r\n"
        if self._sent + len(self._held) != self._length:
            raise _malformed(f"a body of {self._sent + len(self._held)} bytes, not its content-length {self._length}")
        held, self._held = self._held, b""
        self._sent += len(held)
        return held

    def request_trailers(self) -> NoReturn:
        """Trailers ended the client's request: HTTP/1.1 cannot carry them to this backend. Always raises Refused;
        the body's end was held back, so the backend never had a complete request."""
        raise Refused(501, "request_trailers", TRAILERS_MESSAGE)

    @property
    def head_written(self) -> bool:
        return self._body is not None

    @property
    def request_ended(self) -> bool:
        return self._request_ended

    # -- the response --

    def response_data(self, data: bytes) -> list[ResponseEvent]:
        """What `data` from the backend makes of the response. Raises BadResponse; bytes after its end are ignored
        (the request said `Connection: close`, and nothing else is read from this connection)."""
        events: list[ResponseEvent] = []
        while data and not self.response_done:
            if self._response is None:
                self._head_buf += data
                parsed = read_head(self._head_buf, self._limit)
                if parsed is None:
                    break
                head, size = parsed
                data = bytes(self._head_buf[size:])
                self._head_buf.clear()
                self._on_head(head, events)
            else:
                data = self._on_body(data, events)
        return events

    def response_eof(self) -> list[ResponseEvent]:
        """The backend closed its side: the end of a body delimited by the close, or a BadResponse."""
        if self.response_done:
            return []
        if self._response is Framing.CLOSE:
            self.response_done = True
            return [Ended()]
        if self._response is None:
            raise BadResponse(
                "the backend closed in the middle of a response head"
                if self._head_buf
                else "the backend closed without responding"
            )
        raise BadResponse("the backend closed in the middle of a response body")

    def _on_head(self, head: ResponseHead, events: list[ResponseEvent]) -> None:
        if head.status == 101:
            raise BadResponse("101 Switching Protocols: an HTTP/2 stream cannot switch protocols")
        if head.status < 200:
            events.append(Informational(_response_fields(head)))
            return
        body, length = framing(head, self.method)
        self._response = body
        if body is Framing.NONE:
            self.response_done = True
        elif body is Framing.LENGTH:
            self._left = length
        elif body is Framing.CHUNKED:
            self._chunks = ChunkedReader(self._limit)
        events.append(Response(head.status, _response_fields(head), ended=self.response_done))

    def _on_body(self, data: bytes, events: list[ResponseEvent]) -> bytes:
        """Take the part of `data` that belongs to the body; return the rest (ignored)."""
        if self._response is Framing.LENGTH:
            used = min(len(data), self._left)
            events.append(Data(data if used == len(data) else data[:used]))
            self._left -= used
            if not self._left:
                self.response_done = True
                events.append(Ended())
            return data[used:]
        if self._response is Framing.CHUNKED:
            assert self._chunks is not None
            used, payload = self._chunks.feed(data)
            if payload:
                events.append(Data(b"".join(payload)))
            self._keep_tail(data, used)
            if self._chunks.done:
                self.response_done = True
                events.append(Ended(_trailer_fields(bytes(self._tail))))
            return data[used:]
        events.append(Data(data))  # Framing.CLOSE: all of it, until the backend closes
        return b""

    def _keep_tail(self, data: bytes, used: int) -> None:
        """Keep the last raw bytes of a chunked body: enough to hold the last-chunk line and the trailer section
        (the reader bounds both), so they can be read once the reader says the body is done."""
        keep = self._limit + MAX_CHUNK_LINE + 8
        self._tail += data[max(0, used - keep) : used]
        if len(self._tail) > keep:
            del self._tail[:-keep]


def _response_fields(head: ResponseHead) -> list[Header]:
    """The head as HTTP/2 fields: `:status` first, lowercase names, no connection-specific fields."""
    dropped = _CONNECTION_FIELDS | connection_tokens(head.headers)
    fields = [(b":status", b"%d" % head.status)]
    fields += [(name.lower(), value) for name, value in head.headers if name.lower() not in dropped]
    return fields


def _trailer_fields(tail: bytes) -> list[Header]:
    """The trailer section at the end of a complete chunked body (`tail` ends with its blank line).

    Read backwards from the end: trailer lines are fields (a token, then a colon), the last-chunk line is not one,
    so the first line that is not a field is the last chunk's. The reader has checked every line already.
    """
    lines = tail.split(b"\r\n")[:-2]  # the body ends with CRLF CRLF: two empty pieces
    fields: list[Header] = []
    for line in reversed(lines):
        if _LAST_CHUNK.fullmatch(line):
            break
        name, _, value = line.partition(b":")
        name = name.lower()
        if name not in _CONNECTION_FIELDS and name not in _FRAMING_FIELDS:
            fields.append((name, value.strip(b" \t")))
    else:
        raise BadResponse("no last-chunk line before the trailer section")
    fields.reverse()
    return fields
