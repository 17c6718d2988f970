"""Backend responses, read for their framing and passed on as they came (sans-IO; no trio, no h11).

Why not h11 on this side
------------------------
The relay used to parse every response with an h11 client connection and write it again with the client's h11
server connection. For a small response that was half of the relay's cost per request (h11 builds, validates and
re-serialises each event, and its state machines need our own requests to go through them too). The backend is the
service this proxy fronts, and what the relay needs from its response is little: where the head ends, the status,
and where the body ends. So this module reads exactly that, and the body goes to the client byte for byte.

Because those bytes reach the client, the reader is strict, in the RFC 9112 sense a recipient may be: CRLF line
ends only, no obs-fold, field names that are tokens and values without control characters, one Content-Length,
a Transfer-Encoding that is exactly ``chunked``, and not both. Anything else is a `BadResponse`, which the relay
answers with a 502 (or a close, once a head has gone out). Whatever passes is unambiguous, so the client frames
the response exactly as we did.

The head is parsed into a `ResponseHead` and the relay writes it again (it may have to add ``Connection: close``
or drop ``Transfer-Encoding``). Bodies are followed with `Framing`: a length, chunked (`ChunkedReader` checks every
chunk line and trailer and also yields the payload, for HTTP/1.0 clients), or until the backend closes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

# The field grammar of RFC 9112 section 5, shared with the request reader (proxy.protocol.http1_request).
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"  # visible characters and obs-text
_FIELD_VALUE = rb"(?:" + _VCHAR + rb"(?:[\t \x21-\x7e\x80-\xff]*" + _VCHAR + rb")?)?"
HEADER_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
# chunk-size [ chunk-ext ]: the extensions are passed on, so they may hold no control characters. At most 16 hex
# digits: every size fits in 64 bits, so no reader further on can wrap it round into another size (RFC 9112
# section 7.1 asks recipients to guard against exactly that overflow).
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t \x21-\x7e\x80-\xff]*)?")
# A chunk line is a size and optional extensions: nobody needs more than this.
MAX_CHUNK_LINE = 4096


class BadResponse(Exception):
    """The backend's bytes are not a response this proxy can frame without doubt."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    http_version: bytes  # b"1.0" or b"1.1"
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names as the backend spelled them, in its order

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the header `name` (lowercase), in order."""
        return [value for raw, value in self.headers if raw.lower() == name]

    def keeps_alive(self) -> bool:
        return self.http_version == b"1.1" and b"close" not in connection_tokens(self.headers)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The tokens of every Connection header among `headers` (names in any case), lowercased."""
    tokens = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    tokens.discard(b"")
    return frozenset(tokens)


def read_head(buf: bytes | bytearray, limit: int) -> tuple[ResponseHead, int] | None:
    """The response head at the start of `buf` and its length in bytes; None while it is incomplete.

    `limit` bounds the head (status line, fields and the blank line) whether or not it is complete yet.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if b"\n\n" in buf or b"\n\r\n" in buf:
            # A head that ended with a bare LF somewhere: it will never end the way we accept.
            raise BadResponse("bare LF line ends in the response head")
        if len(buf) > limit:
            raise BadResponse("header block too large")
        return None
    if end + 4 > limit:
        raise BadResponse("header block too large")
    lines = bytes(buf[:end]).split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise BadResponse(f"malformed status line {lines[0][:80]!r}")
    if status[2] < b"100":
        raise BadResponse(f"status code {status[2]!r} below 100")
    headers = []
    for line in lines[1:]:
        field = HEADER_LINE.fullmatch(line)
        if field is None:
            raise BadResponse(f"malformed header line {line[:80]!r}")
        headers.append((field[1], field[2]))
    head = ResponseHead(status[1], int(status[2]), status[3] or b"", headers)
    return head, end + 4


class Framing(enum.Enum):
    NONE = "none"  # no body: HEAD, 1xx, 204, 304
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"
    CLOSE = "close"  # everything until the backend closes


def framing(head: ResponseHead, request_method: bytes) -> tuple[Framing, int]:
    """How the body of this response is delimited (RFC 9112 section 6.3), and its length for LENGTH."""
    if request_method == b"HEAD" or head.status < 200 or head.status in (204, 304):
        return Framing.NONE, 0
    codings = head.values(b"transfer-encoding")
    lengths = head.values(b"content-length")
    if codings:
        if lengths:
            raise BadResponse("both Content-Length and Transfer-Encoding")
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise BadResponse(f"unsupported Transfer-Encoding {b', '.join(codings)[:80]!r}")
        return Framing.CHUNKED, 0
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise BadResponse(f"bad Content-Length {b', '.join(lengths)[:80]!r}")
        length = int(lengths[0])
        return (Framing.LENGTH, length) if length else (Framing.NONE, 0)
    return Framing.CLOSE, 0


class _Chunk(enum.Enum):
    SIZE = "size"  # reading a chunk line
    DATA = "data"  # inside a chunk's data
    DATA_END = "data_end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"  # after the last chunk: trailer lines up to the blank line


class ChunkedReader:
    """Follows a chunked body as it arrives (RFC 9112 section 7.1).

    `feed` says how much of its input belongs to the body (all of it until the body ends) and returns the payload
    found in it; `done` turns True at the blank line after the trailers. Lines are checked as the head's are, and
    the trailer section is bounded by `limit` like a head. The relay also runs one over chunked request bodies,
    beside h11, for the checks h11 does not make (`proxy.protocol.http1`); there a `BadResponse` is the client's fault.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._state = _Chunk.SIZE
        self._line = bytearray()
        self._left = 0
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes) -> tuple[int, list[bytes]]:
        """Returns (bytes of `data` that belong to the body, payload pieces)."""
        payload: list[bytes] = []
        return self._follow(data, payload), payload

    def skip(self, data: bytes) -> int:
        """`feed` for a caller that only needs the framing checked: the bytes of `data` that belong to the body.

        No payload is cut out of `data` (that would copy every chunk once more).
        """
        return self._follow(data, None)

    def _follow(self, data: bytes, payload: list[bytes] | None) -> int:
        pos, size = 0, len(data)
        while pos < size and not self.done:
            if self._state is _Chunk.DATA:
                take = min(self._left, size - pos)
                if payload is not None:
                    payload.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _Chunk.DATA_END
            elif self._state is _Chunk.DATA_END:
                take = min(2 - len(self._line), size - pos)
                self._line += data[pos : pos + take]
                pos += take
                if not b"\r\n".startswith(self._line):
                    raise BadResponse("chunk data longer than its size")
                if len(self._line) == 2:
                    self._line.clear()
                    self._state = _Chunk.SIZE
            else:
                pos = self._read_line(data, pos)
        return pos

    def _read_line(self, data: bytes, pos: int) -> int:
        end = data.find(b"\n", pos)
        stop = len(data) if end < 0 else end + 1
        self._line += data[pos:stop]
        limit = MAX_CHUNK_LINE if self._state is _Chunk.SIZE else self._limit - self._trailer_bytes
        if len(self._line) > limit:
            raise BadResponse("chunk line too long" if self._state is _Chunk.SIZE else "trailers too large")
        if end < 0:
            return stop
        if not self._line.endswith(b"\r\n"):
            raise BadResponse("bare LF in a chunked body")
        line = bytes(self._line[:-2])
        self._line.clear()
        if self._state is _Chunk.SIZE:
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise BadResponse(f"malformed chunk line {line[:80]!r}")
            self._left = int(match[1], 16)
            self._state = _Chunk.DATA if self._left else _Chunk.TRAILERS
        elif not line:
            self.done = True
        elif HEADER_LINE.fullmatch(line) is None:
            raise BadResponse(f"malformed trailer line {line[:80]!r}")
        else:
            self._trailer_bytes += len(line) + 2
        return stop
