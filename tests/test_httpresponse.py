"""proxy.protocol.http1_response: the backend-response reader, alone and behind HttpRelay. Pure: no sockets.

- `read_head`, `framing` and `ChunkedReader` on hand-written bytes: what they parse, what they return, what they
  refuse (`BadResponse`).
- Differential properties: seeded random valid responses, cut into random pieces, go through an `HttpRelay`; an
  independent h11 client must read the relay's output exactly as it reads the backend's original bytes (status,
  reason, headers, body, trailers), and the relay closes exactly when the response says it must. Pipelined pairs
  are split at every single boundary and must arrive in order, the second request leaving only after the first
  response is complete.
"""

from __future__ import annotations

import random
import string
from typing import NamedTuple

import h11
import pytest

from proxy.protocol.http1 import HeaderPolicy, HttpRelay, Step
from proxy.protocol.http1_response import MAX_CHUNK_LINE, BadResponse, ChunkedReader, Framing, framing, read_head

LIMIT = 1024


def framing_of(fields: bytes, method: bytes = b"GET", status: bytes = b"200 OK") -> tuple[Framing, int]:
    parsed = read_head(b"HTTP/1.1 " + status + b"\r\n" + fields + b"\r\n", LIMIT)
    assert parsed is not None
    return framing(parsed[0], method)


# ---- read_head -------------------------------------------------------------------------------------------------

OK_LINE = b"HTTP/1.1 200 OK\r\n"
FULL_HEAD = OK_LINE + b"Content-Length: 2\r\n\r\n"


def test_read_head_returns_none_until_the_blank_line_has_arrived() -> None:
    for end in range(len(FULL_HEAD)):
        assert read_head(FULL_HEAD[:end], LIMIT) is None, FULL_HEAD[:end]
    assert read_head(FULL_HEAD, LIMIT) is not None


def test_read_head_parses_the_head_and_says_where_it_ends() -> None:
    raw = (
        b"HTTP/1.0 404 Not  Found\there\r\nX-B: 2\r\ncontent-TYPE:text/plain\r\nX-B: 1\r\nEmpty:\r\n"
        b"Blank: \t \r\nSp: \t a \t b\t \r\nObs: caf\xe9\r\n\r\nBODY\r\n\r\nmore"
    )
    parsed = read_head(raw, LIMIT)
    assert parsed is not None
    head, size = parsed
    assert (head.http_version, head.status, head.reason) == (b"1.0", 404, b"Not  Found\there")
    assert head.headers == [
        (b"X-B", b"2"), (b"content-TYPE", b"text/plain"), (b"X-B", b"1"), (b"Empty", b""), (b"Blank", b""),
        (b"Sp", b"a \t b"), (b"Obs", b"caf\xe9"),
    ]
    assert head.values(b"x-b") == [b"2", b"1"]
    assert raw[size:] == b"BODY\r\n\r\nmore"
    assert not head.keeps_alive()  # HTTP/1.0


@pytest.mark.parametrize(
    ("raw", "version", "status", "reason"),
    [
        (b"HTTP/1.1 204 \r\n\r\n", b"1.1", 204, b""), (b"HTTP/1.1 204\r\n\r\n", b"1.1", 204, b""),  # empty, none
        (b"HTTP/1.0 200 OK\r\n\r\n", b"1.0", 200, b"OK"), (b"HTTP/1.1 100 Continue\r\n\r\n", b"1.1", 100, b"Continue"),
        (b"HTTP/1.1 599 Who Knows \r\n\r\n", b"1.1", 599, b"Who Knows "),
    ],
)
def test_read_head_status_line_variants(raw: bytes, version: bytes, status: int, reason: bytes) -> None:
    parsed = read_head(raw + b"rest", LIMIT)
    assert parsed is not None
    head, size = parsed
    assert (head.http_version, head.status, head.reason, head.headers) == (version, status, reason, [])
    assert size == len(raw)


def test_read_head_limit_bounds_a_complete_head_including_its_blank_line() -> None:
    assert read_head(FULL_HEAD + b"ok", len(FULL_HEAD)) is not None  # body bytes do not count
    with pytest.raises(BadResponse):
        read_head(FULL_HEAD, len(FULL_HEAD) - 1)


def test_read_head_limit_bounds_an_incomplete_head() -> None:
    partial = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100
    assert read_head(partial, len(partial)) is None
    with pytest.raises(BadResponse):
        read_head(partial, len(partial) - 1)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",  # bare LF after the status line
        OK_LINE + b"A: b\nC: d\r\n\r\n",  # bare LF between fields
        OK_LINE + b"A: b\rc\r\n\r\n",  # bare CR inside a value
        OK_LINE + b"A: b\r\n c\r\n\r\n", OK_LINE + b"A: b\r\n\tc\r\n\r\n",  # obs-fold
        OK_LINE + b" Content-Length: 0\r\n\r\n",  # first field line starting with a space
        OK_LINE + b"Content Length: 0\r\n\r\n", OK_LINE + b"Content-Length : 0\r\n\r\n",  # spaces in a name
        OK_LINE + b"X(y): 0\r\n\r\n", OK_LINE + b": 0\r\n\r\n", OK_LINE + b"No colon\r\n\r\n",  # not a token
        OK_LINE + b"A: b\x00c\r\n\r\n", OK_LINE + b"A: \x01\r\n\r\n", OK_LINE + b"A: b\x7f\r\n\r\n",  # NUL, CTL, DEL
        b"HTTP/1.1 200 O\x00K\r\n\r\n",  # control character in the reason
        b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.2 200 OK\r\n\r\n", b"http/1.1 200 OK\r\n\r\n", b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 099 X\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n", b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",  # CRLF before the status line
    ],
)
def test_read_head_rejects(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        read_head(raw, LIMIT)


# ---- framing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"HEAD", b"200 OK"), (b"HEAD", b"404 Gone"), (b"GET", b"100 Continue"), (b"GET", b"103 Early Hints"),
     (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified"), (b"POST", b"304 Not Modified")],
)
def test_framing_none_without_a_body_whatever_content_length_says(method: bytes, status: bytes) -> None:
    assert framing_of(b"Content-Length: 5\r\n", method, status) == (Framing.NONE, 0)
    assert framing_of(b"Transfer-Encoding: chunked\r\n", method, status) == (Framing.NONE, 0)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (b"Content-Length: 0\r\n", (Framing.NONE, 0)), (b"content-length: 00\r\n", (Framing.NONE, 0)),
        (b"Content-Length: 5\r\n", (Framing.LENGTH, 5)),
        (b"CONTENT-LENGTH:  123456789012345678 \r\n", (Framing.LENGTH, 123456789012345678)),  # 18 digits
        (b"Transfer-Encoding: chunked\r\n", (Framing.CHUNKED, 0)),
        (b"transfer-encoding: ChUnKeD\r\n", (Framing.CHUNKED, 0)),
        (b"X-Other: 1\r\n", (Framing.CLOSE, 0)), (b"", (Framing.CLOSE, 0)),
    ],
)
def test_framing_of_a_response_with_a_body(fields: bytes, expected: tuple[Framing, int]) -> None:
    assert framing_of(fields) == expected


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 1,1\r\n", b"Content-Length: -1\r\n", b"Content-Length: +5\r\n",
        b"Content-Length: 0x5\r\n", b"Content-Length: 5 5\r\n", b"Content-Length: \r\n",
        b"Content-Length: 1234567890123456789\r\n",  # 19 digits
        b"Content-Length: " + b"9" * 40 + b"\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: \r\n",
    ],
)
def test_framing_rejects_ambiguous_or_unsupported_bodies(fields: bytes) -> None:
    with pytest.raises(BadResponse):
        framing_of(fields)


# ---- ChunkedReader -----------------------------------------------------------------------------------------------

CHUNKED = (
    b"5;name=val\r\nhello\r\nA ; x ; y=\"q\"\r\n0123456789\r\n1F\r\n" + b"z" * 31 + b"\r\n"
    b"0\r\nX-Sum: 1\r\nB:  two \r\n\r\n"
)
PAYLOAD = b"hello0123456789" + b"z" * 31


def feed(reader: ChunkedReader, pieces: list[bytes]) -> tuple[int, bytes, list[bool]]:
    """Total consumed, the joined payload, and `done` after each piece."""
    consumed, payload, done = 0, b"", []
    for piece in pieces:
        used, parts = reader.feed(piece)
        consumed += used
        payload += b"".join(parts)
        done.append(reader.done)
    return consumed, payload, done


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_chunked_body_in_one_piece_or_byte_by_byte_gives_the_same_payload() -> None:
    assert feed(ChunkedReader(LIMIT), [CHUNKED]) == (len(CHUNKED), PAYLOAD, [True])
    consumed, payload, done = feed(ChunkedReader(LIMIT), bytewise(CHUNKED))
    assert (consumed, payload) == (len(CHUNKED), PAYLOAD)
    assert done == [False] * (len(CHUNKED) - 1) + [True]  # done only at the final blank line


def test_chunked_reader_leaves_the_bytes_after_the_body() -> None:
    after = b"HTTP/1.1 200 OK\r\n\r\n"
    reader = ChunkedReader(LIMIT)
    consumed, payload, _ = feed(reader, [CHUNKED + after])
    assert consumed == len(CHUNKED) < len(CHUNKED + after) and payload == PAYLOAD
    assert reader.feed(b"more") == (0, [])
    split = len(CHUNKED) - 3  # the end of the body inside the second piece
    consumed, _, done = feed(ChunkedReader(LIMIT), [CHUNKED[:split], CHUNKED[split:] + after])
    assert consumed == len(CHUNKED) and done == [False, True]


@pytest.mark.parametrize(
    "body",
    [b"0\r\n\r\n", b"0;last\r\n\r\n", b"00\r\n\r\n", b"aB\r\n" + b"x" * 0xAB + b"\r\n0\r\n\r\n",
     b"1;a=b;c\r\nx\r\n0\r\nX-A: 1\r\nX-B:\r\n\r\n", b"1\t;\text\r\nx\r\n0\r\n\r\n"],
)
def test_chunked_reader_accepts(body: bytes) -> None:
    assert feed(ChunkedReader(LIMIT), [body])[::2] == (len(body), [True])
    assert feed(ChunkedReader(LIMIT), bytewise(body))[0] == len(body)


def test_trailer_section_is_bounded_by_the_limit_including_its_blank_line() -> None:
    trailers = b"X-A: 1\r\nX-B: 22\r\n\r\n"
    assert feed(ChunkedReader(len(trailers)), [b"0\r\n" + trailers])[2] == [True]
    for body in (b"0\r\n" + trailers, b"0\r\nX-A: " + b"a" * 100, b"0\r\n" + b"X-A: 1\r\n" * 10):
        for pieces in ([body], bytewise(body)):
            with pytest.raises(BadResponse):
                feed(ChunkedReader(len(trailers) - 1), pieces)


@pytest.mark.parametrize(
    "body",
    [
        b"3\r\nabcd\r\n0\r\n\r\n",  # chunk data longer than its size
        b"1\r\naxy0\r\n\r\n",  # ... two bytes where its CRLF belongs
        b"3\r\nabc\n0\r\n\r\n",  # bare LF after the data
        b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size line
        b"3\r\nabc\r\n0\n\r\n",  # bare LF after the last chunk's size line
        b"3\r\nabc\r\n0\r\n\n",  # bare LF as the final blank line
        b"xyz\r\n", b"-3\r\n", b"0x3\r\n", b"\r\n", b" 3\r\n", b"3 \r\n",  # not a hex size (+ extensions)
        b"1" * 17 + b"\r\n",  # more hex digits than fit in 64 bits
        b"3;" + b"a" * MAX_CHUNK_LINE + b"\r\nabc\r\n0\r\n\r\n",  # size line too long
        b"1" * (MAX_CHUNK_LINE + 1),  # ... even before its end arrives
        b"3;a=\x01\r\nabc\r\n0\r\n\r\n",  # control character in an extension
        b"3;a=b\rc\r\nabc\r\n0\r\n\r\n",  # bare CR in an extension
        b"0\r\nno colon\r\n\r\n", b"0\r\nX : a\r\n\r\n", b"0\r\n: a\r\n\r\n",  # malformed trailer lines
        b"0\r\nX-A: 1\r\n folded\r\n\r\n", b"0\r\nX-A: a\x00b\r\n\r\n",
    ],
)
def test_chunked_reader_rejects_in_one_piece_and_byte_by_byte(body: bytes) -> None:
    with pytest.raises(BadResponse):
        feed(ChunkedReader(LIMIT), [body])
    with pytest.raises(BadResponse):
        feed(ChunkedReader(LIMIT), bytewise(body))


# ---- differential properties: HttpRelay vs an independent h11 client ----------------------------------------

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VALUE = bytes(range(0x21, 0x7F)) + b"  \t" + bytes([0x80, 0xE9, 0xFF])
OWS = [b"", b"", b" ", b"\t", b" \t "]


class Case(NamedTuple):
    method: bytes
    wire: bytes  # the backend's bytes
    closes: bool  # the relay must close after this response
    needs_eof: bool  # close-delimited body: it ends when the backend closes


class Seen(NamedTuple):
    informational: list[tuple[int, list[tuple[bytes, bytes]]]]
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]


def spelled(rng: random.Random, name: str) -> bytes:
    return "".join(ch.upper() if rng.random() < 0.3 else ch for ch in name).encode()


def random_fields(rng: random.Random, count: int) -> list[tuple[bytes, bytes]]:
    fields = []
    for _ in range(count):
        name = "X-" + "".join(rng.choice(TOKEN) for _ in range(rng.randint(1, 10)))
        value = bytes(rng.choice(VALUE) for _ in range(rng.randint(0, 20))).strip(b" \t")
        fields.append((name.encode(), value))
    return fields


def render(rng: random.Random, first: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    lines = [name + b":" + rng.choice(OWS) + value + rng.choice(OWS) for name, value in fields]
    return b"\r\n".join([first, *lines]) + b"\r\n\r\n"


def random_case(rng: random.Random, max_body: int = 300) -> Case:
    method = b"HEAD" if rng.random() < 0.15 else b"GET"
    version = b"1.0" if rng.random() < 0.1 else b"1.1"
    status = rng.choice([200, 201, 204, 304, 404, 500])
    reason = rng.choice([b"", b"OK", b"Some Reason", b"x\ty \xe9"])
    payload = rng.randbytes(rng.choice([0, 1, rng.randint(2, 40), rng.randint(2, max_body)]))
    kind, closing = rng.choice(["length", "chunked", "close"]), rng.random() < 0.2
    fields, framing_fields = random_fields(rng, rng.randint(0, 6)), []
    if kind == "length":
        framing_fields.append((spelled(rng, "content-length"), b"%d" % len(payload)))
    if kind == "chunked":
        framing_fields.append((spelled(rng, "transfer-encoding"), spelled(rng, "chunked")))
    if closing:
        framing_fields.append((spelled(rng, "connection"), spelled(rng, "close")))
    for field in framing_fields:
        fields.insert(rng.randint(0, len(fields)), field)
    bodyless = method == b"HEAD" or status in (204, 304)
    body = b"" if bodyless else random_chunks(rng, payload) if kind == "chunked" else payload
    wire = b""
    if version == b"1.1" and rng.random() < 0.15:
        wire += render(rng, b"HTTP/1.1 103 Early Hints", random_fields(rng, rng.randint(0, 2)))
    wire += render(rng, b"HTTP/%s %d %s" % (version, status, reason), fields) + body
    needs_eof = kind == "close" and not bodyless
    return Case(method, wire, closes=version == b"1.0" or closing or needs_eof, needs_eof=needs_eof)


def random_chunks(rng: random.Random, payload: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(payload):
        size = rng.randint(1, len(payload) - pos)
        ext = rng.choice([b"", b"", b";a=1", b";name=\"quoted;value\"", b";x"])
        hex_size = rng.choice(["%x", "%X", "0%x"]) % size
        out.append(hex_size.encode() + ext + b"\r\n" + payload[pos : pos + size] + b"\r\n")
        pos += size
    out.append(b"0" + rng.choice([b"", b";last"]) + b"\r\n")
    trailers = random_fields(rng, rng.choice([0, 0, 1, 3]))
    out.append(b"".join(name + b": " + value + b"\r\n" for name, value in trailers) + b"\r\n")
    return b"".join(out)


def random_pieces(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(0, 8), len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=False)]


def request(method: bytes, target: bytes = b"/") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: a\r\n\r\n" % (method, target)


def read_responses(data: bytes, methods: list[bytes], eof: bool = False) -> list[Seen]:
    """Every response in `data`, as an independent h11 client reads it after sending `methods` one by one."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    if eof:
        client.receive_data(b"")
    seen = []
    for n, method in enumerate(methods):
        if n:
            client.start_next_cycle()
        client.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
        client.send(h11.EndOfMessage())
        informational, body = [], b""
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            assert event is not h11.NEED_DATA and event is not h11.PAUSED, f"response {n} incomplete"
            if isinstance(event, h11.InformationalResponse):
                informational.append((event.status_code, list(event.headers.raw_items())))
            elif isinstance(event, h11.Response):
                final = event
            elif isinstance(event, h11.Data):
                body += event.data
        headers, trailers = list(final.headers.raw_items()), list(event.headers.raw_items())
        seen.append(Seen(informational, final.status_code, final.reason, headers, body, trailers))
    return seen


def new_relay() -> HttpRelay:
    return HttpRelay(HeaderPolicy(), client_ip="203.0.113.7", identity=None)


def test_relay_output_reads_like_the_backend_response_for_random_responses_and_splits() -> None:
    rng = random.Random(20240611)
    for n in range(300):
        case = random_case(rng)
        relay = new_relay()
        assert relay.from_client(request(case.method)).requests == 1
        steps = [relay.from_backend(piece) for piece in random_pieces(rng, case.wire)]
        if case.needs_eof:
            steps.append(relay.from_backend(b""))
        context = (n, case)
        assert all(step.error is None for step in steps), (context, [s.detail for s in steps])
        assert [step.close for step in steps] == [False] * (len(steps) - 1) + [case.closes], context
        [original] = read_responses(case.wire, [case.method], eof=case.needs_eof)
        [relayed] = read_responses(b"".join(step.to_client for step in steps), [case.method])
        assert sum((step.statuses for step in steps), ()) == (original.status,), context
        # The relay frames a close-delimited body with chunks, and says it will close when it will.
        added = [(b"Transfer-Encoding", b"chunked")] if case.needs_eof else []
        tokens = b",".join(value for name, value in original.headers if name.lower() == b"connection").lower()
        if case.closes and b"close" not in tokens:
            added.append((b"Connection", b"close"))
        assert relayed == original._replace(headers=original.headers + added), context


def keep_alive_case(rng: random.Random) -> Case:
    while (case := random_case(rng, max_body=80)).closes:
        pass
    return case


def test_pipelined_responses_arrive_in_order_whatever_the_split() -> None:
    rng = random.Random(7)
    for _ in range(20):
        first, second = keep_alive_case(rng), keep_alive_case(rng)
        wire, methods = first.wire + second.wire, [first.method, second.method]
        expected, outputs_seen = read_responses(wire, methods), set()
        for cut in range(1, len(wire)):
            relay = new_relay()
            step = relay.from_client(request(first.method, b"/one") + request(second.method, b"/two"))
            assert step.requests == 1 and b"/two" not in step.to_backend
            steps: list[Step] = [relay.from_backend(wire[:cut]), relay.from_backend(wire[cut:])]
            context = (cut, wire)
            assert not any(s.close or s.error for s in steps), context
            # The second request leaves in the step that completed the first response, and only then.
            released = 0 if cut >= len(first.wire) else 1
            assert [s.requests for s in steps] == [1 - released, released], context
            assert steps[released].to_backend.startswith(b"%s /two HTTP/1.1\r\n" % second.method), context
            output = b"".join(s.to_client for s in steps)
            if output not in outputs_seen:  # most splits give the same bytes: read each output once
                assert read_responses(output, methods) == expected, context
                outputs_seen.add(output)


# ---- a head with bare LF line ends is refused at once, not waited on -------------------------------------------------


@pytest.mark.parametrize(
    "head", [b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok"]
)
def test_read_head_rejects_a_head_that_ends_with_bare_lf(head: bytes) -> None:
    with pytest.raises(BadResponse):
        read_head(head, LIMIT)


def test_relay_answers_a_bare_lf_head_with_a_502_at_once() -> None:
    relay = new_relay()
    relay.from_client(request(b"GET"))
    step = relay.from_backend(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    assert step.close and step.error == "bad_response" and step.statuses == (502,)
