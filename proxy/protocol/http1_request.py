"""The common request head, read without h11 (sans-IO; no trio, no h11).

Why
---
Nearly every request a service behind this proxy gets is the same shape: an HTTP/1.1 request line, a Host, a few
fields, no body. h11 parses it correctly and slowly: a fresh `h11.Connection` per request, events built and
validated, its state machines moved. Measured with ``bench/relay.py``, h11 was about half of the HTTP relay's CPU
per request. This module reads exactly that common shape, and only that.

The rule that keeps it safe
---------------------------
`read_plain_request` accepts a strict subset of what h11 accepts, and reads it the way h11 does; anything else,
including everything merely unusual, returns None and the relay hands the bytes to h11 as before. So there is still
one parser's opinion per request, and a request cannot be read one way here and another way there. What it
accepts:

- one complete head at the start of the bytes, CRLF line ends only (a bare CR or LF anywhere means None);
- the request line ``method SP request-target SP HTTP/1.1``: a token (not CONNECT), visible ASCII characters;
- field lines as RFC 9112 and h11 define them (token, colon, optional whitespace, a value of visible characters,
  obs-text and inner blanks), no obs-fold;
- exactly one Host field, and no Content-Length or Transfer-Encoding: the request has no body, so its framing
  cannot be read two ways;
- the whole head within the relay's size limit.

``tests/test_http1_request.py`` checks the subset against h11 itself: whatever this accepts, h11 accepts with the
same method, target, fields and length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.protocol.http1_response import HEADER_LINE, TOKEN

_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
# Names whose presence sends the request to h11: a body, and its framing, is h11's to read.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class PlainRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names as the client spelled them, values without surrounding whitespace
    size: int  # bytes of the head, the blank line included: what follows belongs to the next request


def read_plain_request(data: bytes, limit: int) -> PlainRequest | None:
    """The bodiless HTTP/1.1 request head at the start of `data`, if it is of the common shape; else None.

    None says nothing about validity: the head may be incomplete, unusual or wrong, and h11 will tell which.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > limit:
        return None
    lines = data[:end].split(b"\r\n")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None or request_line[1] == b"CONNECT":
        return None
    headers = []
    hosts = 0
    for line in lines[1:]:
        field = HEADER_LINE.fullmatch(line)
        if field is None:
            return None
        name = field[1].lower()
        if name in _NOT_PLAIN:
            return None
        hosts += name == b"host"
        headers.append((field[1], field[2]))
    if hosts != 1:
        return None
    return PlainRequest(request_line[1], request_line[2], headers, end + 4)
