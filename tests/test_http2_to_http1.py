"""proxy.protocol.http2_to_http1, and Http2Relay with an HTTP/1.1 backend: pure, no sockets.

The first part drives an `Http1Exchange` alone: an HTTP/2 request head in, HTTP/1.1 bytes out, and HTTP/1.1
response bytes in, events out. The second part puts the relay between an h2 client connection and one h11 server
connection per stream (the backend), and moves bytes and the driver's reports (`backend_stream_*`) between them
until nothing moves, as `proxy.relay.http2_forwarder` does over sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import h11
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from proxy.protocol.http1 import HeaderPolicy
from proxy.protocol.http2 import STREAM_ERRORS, Http2Relay, Http2Settings, Http2Step, StreamClosed, StreamError
from proxy.protocol.http2_to_http1 import (
    GRPC_MESSAGE,
    REFUSALS,
    TRAILERS_MESSAGE,
    BadResponse,
    Data,
    Ended,
    Http1Exchange,
    Informational,
    Refused,
    Response,
    ResponseEvent,
)
from tests.conftest import ALICE_IDENTITY

CLIENT_IP = "203.0.113.7"
IDENTITY = ALICE_IDENTITY
POLICY = HeaderPolicy({"X-Client-Subject": "subject"})
ADDED = POLICY.added_headers(client_ip=CLIENT_IP, identity=IDENTITY)
XFCC = dict(ADDED)[b"X-Forwarded-Client-Cert"]
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"/hello?x=1")]
Headers = list[tuple[bytes, bytes]]


def post(*extra: tuple[bytes, bytes]) -> Headers:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"/up"), *extra]


def exchange(headers: Iterable[tuple[bytes, bytes]] = GET) -> Http1Exchange:
    return Http1Exchange(headers, policy=POLICY, added=ADDED)


def parsed_request(data: bytes) -> tuple[h11.Request, bytes, list[tuple[bytes, bytes]] | None]:
    """What an HTTP/1.1 server makes of `data`: the request, the body, the trailers (None: the request never ended)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request, body, trailers = None, b"", None
    while True:
        event = server.next_event()
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            trailers = list(event.headers.raw_items())
            break
        else:
            break
    assert request is not None
    return request, body, trailers


def raw_fields(request: h11.Request) -> list[tuple[bytes, bytes]]:
    return list(request.headers.raw_items())


# ---- the request -----------------------------------------------------------------------------------------------


def test_a_get_becomes_an_http11_request_with_host_and_the_identity() -> None:
    head = exchange([*GET, (b"accept", b"*/*")]).request_head(complete_body=0)
    assert head == (
        b"GET /hello?x=1 HTTP/1.1\r\n"
        b"Host: svc.test\r\n"
        b"accept: */*\r\n"
        b"Connection: close\r\n"
        b"X-Forwarded-Client-Cert: " + XFCC + b"\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Client-Subject: CN=alice,OU=payments,O=Acme\r\n"
        b"\r\n"
    )


def test_every_forged_identity_header_goes_in_any_spelling() -> None:
    forged = [
        (b"x-forwarded-client-cert", b"Hash=forged"),
        (b"x_forwarded_client_cert", b"Hash=forged2"),
        (b"x.forwarded.client.cert", b"Hash=forged3"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"forwarded", b"for=10.0.0.1"),
        (b"x-real-ip", b"10.0.0.1"),
        (b"x-client-subject", b"CN=admin"),
    ]
    request, _, _ = parsed_request(exchange([*GET, *forged, (b"x-kept", b"yes")]).request_head(complete_body=0))
    fields = [(name.lower(), value) for name, value in raw_fields(request)]
    assert [v for n, v in fields if n == b"x-forwarded-client-cert"] == [XFCC]
    assert [v for n, v in fields if n == b"x-forwarded-for"] == [CLIENT_IP.encode()]
    assert [v for n, v in fields if n == b"x-client-subject"] == [IDENTITY.subject.encode()]
    assert not [n for n, _ in fields if n in (b"x_forwarded_client_cert", b"x.forwarded.client.cert")]
    assert not [n for n, _ in fields if n in (b"forwarded", b"x-real-ip")]
    assert (b"x-kept", b"yes") in fields


def test_cookies_are_joined_where_the_first_one_was() -> None:
    headers = [*GET, (b"a", b"1"), (b"cookie", b"x=1"), (b"b", b"2"), (b"cookie", b"y=2; z=3")]
    request, _, _ = parsed_request(exchange(headers).request_head(complete_body=0))
    names = [name for name, _ in raw_fields(request)]
    assert names[:4] == [b"Host", b"a", b"cookie", b"b"]
    assert request.headers.raw_items()[2] == (b"cookie", b"x=1; y=2; z=3")


def test_the_policy_owns_what_it_names_even_a_cookie() -> None:
    policy = HeaderPolicy({"Cookie": "subject"})
    added = policy.added_headers(client_ip=CLIENT_IP, identity=IDENTITY)
    head = Http1Exchange([*GET, (b"cookie", b"session=forged")], policy=policy, added=added).request_head()
    request, _, _ = parsed_request(head + b"0\r\n\r\n")
    assert [v for n, v in raw_fields(request) if n.lower() == b"cookie"] == [IDENTITY.subject.encode()]


def test_te_and_connection_specific_fields_never_pass_and_host_comes_from_the_authority() -> None:
    headers = [
        *GET,
        (b"te", b"trailers"),
        (b"connection", b"x-secret"),
        (b"keep-alive", b"300"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"proxy-connection", b"keep-alive"),
        (b"host", b"svc.test"),
        (b"x-secret", b"kept: a Connection token of the client names nothing here"),
    ]
    head = exchange(headers).request_head(complete_body=0)
    request, _, _ = parsed_request(head)
    names = [name.lower() for name, _ in raw_fields(request)]
    assert names.count(b"host") == 1 and dict(raw_fields(request))[b"Host"] == b"svc.test"
    for name in (b"te", b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-connection"):
        assert name not in names
    assert [v for n, v in raw_fields(request) if n.lower() == b"connection"] == [b"close"]
    assert b"x-secret" in names


def test_the_host_field_stands_in_for_a_missing_authority() -> None:
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"other.test:8443")]
    request, _, _ = parsed_request(exchange(headers).request_head(complete_body=0))
    assert dict(raw_fields(request))[b"Host"] == b"other.test:8443"


def test_a_declared_length_is_kept_and_its_last_byte_waits_for_end_stream() -> None:
    ex = exchange(post((b"content-length", b"10")))
    head = ex.request_head()
    assert b"Content-Length: 10\r\n" in head and b"Transfer-Encoding" not in head
    assert ex.request_data(b"12345") == b"12345"
    assert ex.request_data(b"67890") == b"6789"  # all of it but the last byte
    _, body, trailers = parsed_request(head + b"123456789")
    assert trailers is None  # the backend has no complete request yet
    assert ex.request_end() == b"0"
    _, body, trailers = parsed_request(head + b"12345" + b"6789" + b"0")
    assert body == b"1234567890" and trailers == []


def test_a_body_complete_before_the_head_gets_its_length() -> None:
    ex = exchange(post())
    head = ex.request_head(complete_body=7)
    data = ex.request_data(b"seven!!") + ex.request_end()
    request, body, trailers = parsed_request(head + data)
    assert dict(raw_fields(request))[b"Content-Length"] == b"7" and body == b"seven!!" and trailers == []


def test_a_body_of_unknown_length_goes_chunked() -> None:
    ex = exchange(post())
    head = ex.request_head(complete_body=None)
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head
    data = ex.request_data(b"abc") + ex.request_data(b"") + ex.request_data(b"defgh") + ex.request_end()
    assert data == b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"
    assert parsed_request(head + data)[1:] == (b"abcdefgh", [])


@pytest.mark.parametrize(
    ("headers", "length"),
    [(GET, None), (post(), b"0"), ([*GET, (b"content-length", b"0")], b"0")],
    ids=["get", "post", "declared"],
)
def test_an_empty_body_has_a_length_only_where_content_is_expected(headers: Headers, length: bytes | None) -> None:
    ex = exchange(headers)
    request, body, _ = parsed_request(ex.request_head(complete_body=0) + ex.request_end())
    assert dict(raw_fields(request)).get(b"Content-Length") == length and body == b""


def test_a_body_longer_or_shorter_than_its_length_is_refused() -> None:
    ex = exchange(post((b"content-length", b"3")))
    ex.request_head()
    with pytest.raises(Refused) as longer:
        ex.request_data(b"four")
    assert longer.value.status == 400
    ex = exchange(post((b"content-length", b"3")))
    ex.request_head()
    assert ex.request_data(b"ab") == b"ab"
    with pytest.raises(Refused) as shorter:
        ex.request_end()
    assert shorter.value.status == 400 and shorter.value.reason == "malformed_request"


@pytest.mark.parametrize("content_type", [b"application/grpc", b"application/grpc+proto", b"Application/GRPC-Web"])
def test_grpc_is_refused_with_the_setting_to_change(content_type: bytes) -> None:
    with pytest.raises(Refused) as refused:
        exchange(post((b"content-type", content_type), (b"te", b"trailers")))
    assert (refused.value.status, refused.value.reason) == (501, "grpc_needs_http2")
    assert refused.value.message == GRPC_MESSAGE and "http_version" in GRPC_MESSAGE


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"CONNECT"), (b":authority", b"svc.test:443")],
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":path", b"/chat"),
            (b":authority", b"svc.test"),
        ],
    ],
    ids=["connect", "extended-connect"],
)
def test_connect_is_refused(headers: Headers) -> None:
    with pytest.raises(Refused) as refused:
        exchange(headers)
    assert (refused.value.status, refused.value.reason) == (405, "connect_not_allowed")


def test_request_trailers_are_refused() -> None:
    ex = exchange(post())
    ex.request_head()
    with pytest.raises(Refused) as refused:
        ex.request_trailers()
    assert (refused.value.status, refused.value.reason, refused.value.message) == (
        501,
        "request_trailers",
        TRAILERS_MESSAGE,
    )


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"/a b")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", "/é".encode())],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"http://x/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"*")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test")],
        [(b":method", b"G T"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"user@svc.test"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test/x"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
        [*GET, (b"host", b"evil.test")],
        [*GET, (b"host", b"svc.test"), (b"host", b"svc.test")],
        [*GET, (b":path", b"/again")],
        [*GET, (b":status", b"200")],
        [*GET, (b"x-a", b"line\r\nX-Injected: 1")],
        [*GET, (b"x-a", b"nul\x00")],
        [*GET, (b"x-a", b" padded")],
        [*GET, (b"X-Upper", b"1")],
        [*GET, (b"x a", b"1")],
        [*post(), (b"content-length", b"3"), (b"content-length", b"4")],
        [*post(), (b"content-length", b"-1")],
        [*post(), (b"content-length", b"9" * 19)],
    ],
    ids=[
        "space-in-path",
        "non-ascii-path",
        "absolute-form",
        "asterisk-not-options",
        "empty-path",
        "no-path",
        "method-not-token",
        "userinfo",
        "slash-in-authority",
        "no-authority-no-host",
        "host-differs",
        "two-hosts",
        "path-twice",
        "unknown-pseudo",
        "crlf-in-value",
        "nul-in-value",
        "edge-whitespace",
        "uppercase-name",
        "space-in-name",
        "lengths-differ",
        "negative-length",
        "length-too-long",
    ],
)
def test_what_http11_cannot_carry_as_it_is_is_malformed(headers: Headers) -> None:
    with pytest.raises(Refused) as refused:
        exchange(headers)
    assert (refused.value.status, refused.value.reason) == (400, "malformed_request")


def test_every_refusal_is_a_stream_error_the_relay_reports() -> None:
    assert set(REFUSALS) <= set(STREAM_ERRORS)


def test_options_asterisk_passes() -> None:
    headers = [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"*")]
    assert exchange(headers).request_head(complete_body=0).startswith(b"OPTIONS * HTTP/1.1\r\n")


# ---- the response ----------------------------------------------------------------------------------------------


def response(data: bytes, headers: Headers = GET, *, split: bool = False, eof: bool = False) -> list[ResponseEvent]:
    """The events for `data` as the backend's answer (in one read, or one byte a read), merged for comparison."""
    ex = exchange(headers)
    ex.request_head(complete_body=0)
    events: list[ResponseEvent] = []
    for piece in [data[i : i + 1] for i in range(len(data))] if split else [data]:
        events += ex.response_data(piece)
    if eof:
        events += ex.response_eof()
    merged: list[ResponseEvent] = []
    for event in events:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
def test_a_response_with_a_length(split: bool) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\n\r\nhello"
    assert response(data, split=split) == [
        Response(
            200,
            [
                (b":status", b"200"),
                (b"content-type", b"text/plain"),
                (b"content-length", b"5"),
                (b"set-cookie", b"a=1"),
            ],
            ended=False,
        ),
        Data(b"hello"),
        Ended([]),
    ]


def test_connection_specific_response_fields_and_the_ones_connection_names_are_dropped() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Hop: 1\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n"
    )
    assert response(data) == [Response(200, [(b":status", b"200"), (b"x-kept", b"2"), (b"content-length", b"0")], True)]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
    b"5;ext=1\r\nhello\r\n"
    b"d\r\n, \r\n0\r\n\r\nx: y\r\n"  # payload that looks like a last chunk and a trailer section
    b"0\r\nX-Checksum: 42\r\nGrpc-Status: 0\r\nConnection: close\r\nContent-Length: 9\r\nx-empty:\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
def test_a_chunked_response_is_dechunked_and_its_trailers_become_fields(split: bool) -> None:
    assert response(CHUNKED, split=split) == [
        Response(200, [(b":status", b"200"), (b"trailer", b"x-checksum")], ended=False),
        Data(b"hello, \r\n0\r\n\r\nx: y"),
        Ended([(b"x-checksum", b"42"), (b"grpc-status", b"0"), (b"x-empty", b"")]),
    ]


def test_trailers_after_a_body_larger_than_what_is_kept() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, more than the kept tail
    chunks = b"".join(b"%x\r\n%s\r\n" % (4096, payload[i : i + 4096]) for i in range(0, len(payload), 4096))
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nx-sum: 1\r\n\r\n"
    ex = exchange()
    ex.request_head(complete_body=0)
    events = [event for i in range(0, len(data), 1000) for event in ex.response_data(data[i : i + 1000])]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == payload
    assert events[-1] == Ended([(b"x-sum", b"1")])


def test_a_chunked_response_without_trailers() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert response(data)[1:] == [Data(b"abc"), Ended([])]


def test_interim_responses_pass_and_a_101_is_refused() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    assert response(data) == [
        Informational([(b":status", b"100")]),
        Informational([(b":status", b"103"), (b"link", b"</a.css>")]),
        Response(204, [(b":status", b"204")], ended=True),
    ]
    with pytest.raises(BadResponse, match="101"):
        response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")


def test_a_head_response_has_no_body_whatever_its_length() -> None:
    head = [(b":method", b"HEAD"), *GET[1:]]
    assert response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", head) == [
        Response(200, [(b":status", b"200"), (b"content-length", b"99")], ended=True)
    ]


def test_a_body_until_the_close() -> None:
    assert response(b"HTTP/1.0 200 OK\r\n\r\nall of it", eof=True) == [
        Response(200, [(b":status", b"200")], ended=False),
        Data(b"all of it"),
        Ended([]),
    ]


def test_bytes_after_the_response_are_ignored() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"
    assert response(data, eof=True)[1:] == [Data(b"ok"), Ended([])]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "without responding"),
        (b"HTTP/1.1 200 OK\r\nContent-", "middle of a response head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", "middle of a response body"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\n", "bare LF"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk"),
    ],
    ids=["nothing", "cut-head", "cut-body", "cl-and-te", "bare-lf", "obs-fold", "bad-chunk"],
)
def test_a_bad_response(data: bytes, match: str) -> None:
    with pytest.raises(BadResponse, match=match):
        response(data, eof=True)


# ---- through the relay: an h11 backend per stream ----------------------------------------------------------------


def split_goaways(data: bytes) -> tuple[bytes, list[GoAwayFrame]]:
    kept, goaways, view = bytearray(), [], memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        if isinstance(frame, GoAwayFrame):
            goaways.append(frame)
        else:
            kept += view[: 9 + length]
        view = view[9 + length :]
    return bytes(kept), goaways


class Backend:
    """One stream's HTTP/1.1 backend connection: an h11 server and the bytes it has sent, not read yet."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.SERVER)
        self.events: list[Any] = []
        self.outgoing = bytearray()
        self.eof = False  # the backend closed after `outgoing`
        self.state = "connecting"  # -> connected | failed; closed once the relay says so
        self.closed = False

    def receive(self, data: bytes) -> None:
        self.h11.receive_data(data)
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.events.append(event)

    @property
    def request(self) -> h11.Request:
        return next(e for e in self.events if isinstance(e, h11.Request))

    @property
    def body(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, h11.Data))

    @property
    def complete(self) -> bool:
        return any(isinstance(e, h11.EndOfMessage) for e in self.events)

    def send(self, *events: Any) -> None:
        for event in events:
            self.outgoing += self.h11.send(event) or b""


class Relay1:
    """An Http2Relay with an HTTP/1.1 backend between a test h2 client and a `Backend` per stream.

    `auto_connect`: each stream's connect succeeds at once (else the test calls connect/fail).
    `hold_writes`: writes are taken by the backend but reported done only when the test says so.
    """

    def __init__(
        self,
        *,
        settings: Http2Settings | None = None,
        client_settings: dict[SettingCodes | int, int] | None = None,
        auto_connect: bool = True,
        hold_writes: bool = False,
    ) -> None:
        self.relay = Http2Relay(
            POLICY, client_ip=CLIENT_IP, identity=IDENTITY, settings=settings, backend_http_version="1.1"
        )
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if client_settings:
            self.client.local_settings = Settings(client=True, initial_values=client_settings)
        self.client.initiate_connection()
        self.auto_connect = auto_connect
        self.hold_writes = hold_writes
        self.backends: dict[int, Backend] = {}
        self.reads: dict[int, int] = {}  # granted reads not done yet
        self.held_writes: list[int] = []
        self.writes_done: list[int] = []
        self.client_events: list[Event] = []
        self.events: list[object] = []
        self.goaways: list[GoAwayFrame] = []
        self.largest_read = 0
        self.peak_buffered = 0
        self.closed = False
        self.apply(self.relay.start())
        self.pump()

    def apply(self, step: Http2Step) -> None:
        assert not step.to_backend
        self.events += step.events
        self.peak_buffered = max(self.peak_buffered, self.relay.buffered)
        if step.to_client:
            data, goaways = split_goaways(step.to_client)
            self.goaways += goaways
            if data:
                self.client_events += self.client.receive_data(data)
        for stream_id in step.open_backends:
            assert stream_id not in self.backends
            self.backends[stream_id] = Backend()
        for stream_id, data in step.stream_writes:
            backend = self.backends[stream_id]
            assert backend.state == "connected" and not backend.closed
            assert stream_id not in self.held_writes and stream_id not in self.writes_done  # one write at a time
            backend.receive(data)
            (self.held_writes if self.hold_writes else self.writes_done).append(stream_id)
        for stream_id, size in step.stream_reads:
            assert stream_id not in self.reads and not self.backends[stream_id].closed  # one read at a time
            self.reads[stream_id] = size
            self.largest_read = max(self.largest_read, size)
        for stream_id in step.close_backends:
            backend = self.backends[stream_id]
            assert not backend.closed
            backend.closed = True
            self.reads.pop(stream_id, None)
            for pending in (self.held_writes, self.writes_done):
                if stream_id in pending:
                    pending.remove(stream_id)
        if step.close:
            self.closed = True

    def pump(self) -> None:
        for _ in range(100_000):
            if self.closed:
                return
            data = self.client.data_to_send()
            if data:
                self.apply(self.relay.client_bytes(data))
                continue
            connecting = [s for s, b in self.backends.items() if b.state == "connecting" and not b.closed]
            if connecting and self.auto_connect:
                self.connect(connecting[0], pump=False)
                continue
            if self.writes_done:
                self.apply(self.relay.backend_stream_written(self.writes_done.pop(0)))
                continue
            if not self._read_one():
                return
        raise AssertionError("never went quiet")

    def _read_one(self) -> bool:
        for stream_id, size in list(self.reads.items()):
            backend = self.backends[stream_id]
            if backend.outgoing:
                del self.reads[stream_id]
                data = bytes(backend.outgoing[:size])
                del backend.outgoing[:size]
                self.apply(self.relay.backend_stream_bytes(stream_id, data))
                return True
            if backend.eof:
                del self.reads[stream_id]
                self.apply(self.relay.backend_stream_closed(stream_id))
                return True
        return False

    def connect(self, stream_id: int, *, pump: bool = True) -> None:
        self.backends[stream_id].state = "connected"
        self.apply(self.relay.backend_stream_connected(stream_id))
        if pump:
            self.pump()

    def fail(self, stream_id: int, status: int) -> None:
        self.backends[stream_id].state = "failed"
        self.apply(self.relay.backend_stream_failed(stream_id, status, "connection refused"))
        self.pump()

    def release_writes(self) -> None:
        self.writes_done += self.held_writes
        self.held_writes.clear()
        self.pump()

    def request(self, headers: Headers, body: bytes = b"", *, end: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=end and not body)
        for offset in range(0, len(body), 16_384):
            self.client.send_data(
                stream_id, body[offset : offset + 16_384], end_stream=end and offset + 16_384 >= len(body)
            )
        self.pump()
        return stream_id

    def respond(self, stream_id: int, *events: Any, close: bool = False) -> None:
        backend = self.backends[stream_id]
        backend.send(*events)
        backend.eof = close
        self.pump()

    def received(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.client_events if isinstance(e, DataReceived) and e.stream_id == stream_id)

    def of(self, kind: type, stream_id: int) -> list[Any]:
        return [e for e in self.client_events if isinstance(e, kind) and e.stream_id == stream_id]

    def closed_event(self, stream_id: int) -> StreamClosed:
        found = [e for e in self.events if isinstance(e, StreamClosed) and e.stream_id == stream_id]
        assert len(found) == 1, found
        return found[0]


def ok(body: bytes = b"", **headers: str) -> list[Any]:
    fields = [("content-length", str(len(body))), *headers.items()]
    return [h11.Response(status_code=200, headers=fields), h11.Data(data=body), h11.EndOfMessage()]


def status_of(event: ResponseReceived) -> bytes:
    return dict(event.headers)[b":status"]


def test_a_stream_gets_its_own_backend_connection_and_the_response_comes_back() -> None:
    peers = Relay1()
    first = peers.request([*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-forwarded-client-cert", b"forged")])
    backend = peers.backends[first]
    request = backend.request
    assert (request.method, request.target, request.http_version) == (b"GET", b"/hello?x=1", b"1.1")
    fields = raw_fields(request)
    assert (b"Host", b"svc.test") in fields and (b"cookie", b"a=1; b=2") in fields
    assert [v for n, v in fields if n.lower() == b"x-forwarded-client-cert"] == [XFCC]
    assert backend.complete
    peers.respond(first, h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
    peers.respond(first, h11.Data(data=b"hi "), h11.Data(data=b"there"), h11.EndOfMessage(headers=[("x-sum", "7")]))
    assert status_of(peers.of(ResponseReceived, first)[0]) == b"200"
    assert peers.received(first) == b"hi there"
    assert [e.headers for e in peers.of(TrailersReceived, first)] == [[(b"x-sum", b"7")]]
    assert peers.of(StreamEnded, first)
    assert backend.closed  # the response is complete: its connection is closed
    assert peers.closed_event(first) == StreamClosed(first, 200, None, None, None, 0, 8)
    second = peers.request(GET)
    assert second in peers.backends and peers.backends[second] is not backend
    peers.respond(second, *ok(b"again"))
    assert peers.received(second) == b"again" and peers.relay.open_streams == 0 and not peers.closed


def test_an_upload_is_acknowledged_only_once_the_backend_took_it() -> None:
    # h2 gives window back once half of it is used: 20 000 bytes of a 32 KiB stream window are enough.
    peers = Relay1(settings=Http2Settings(initial_window_size=32_768, connection_window_size=65_536), hold_writes=True)
    stream_id = peers.request(post(), b"x" * 20_000, end=False)
    assert peers.backends[stream_id].body == b"x" * 20_000  # written (chunked: no length yet)...
    assert not peers.of(WindowUpdated, stream_id)  # ...but not acknowledged while the write is in flight
    peers.release_writes()
    assert [e.delta for e in peers.of(WindowUpdated, stream_id)] == [20_000]
    peers.client.send_data(stream_id, b"y" * 10, end_stream=True)
    peers.pump()
    peers.release_writes()
    backend = peers.backends[stream_id]
    assert backend.complete and backend.body == b"x" * 20_000 + b"y" * 10
    assert (b"transfer-encoding", b"chunked") in list(backend.request.headers)


def test_a_request_complete_before_the_connection_goes_with_a_length() -> None:
    peers = Relay1(auto_connect=False)
    stream_id = peers.request(post(), b"z" * 1000)
    peers.connect(stream_id)
    backend = peers.backends[stream_id]
    assert dict(raw_fields(backend.request))[b"Content-Length"] == b"1000" and backend.complete


def test_reads_follow_the_clients_window() -> None:
    peers = Relay1(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    stream_id = peers.request(GET)
    body = bytes(range(256)) * 400  # 100 KiB
    head, *rest = ok(body)
    peers.respond(stream_id, head)
    peers.respond(stream_id, *rest)
    assert peers.received(stream_id) == body[:1000]  # the client's window...
    assert stream_id not in peers.reads and peers.relay.buffered == 0  # ...and nothing read beyond it
    assert len(peers.backends[stream_id].outgoing) == len(body) - 1000  # the rest waits at the backend
    acked = 0
    while not peers.of(StreamEnded, stream_id):
        taken = len(peers.received(stream_id))
        assert taken > acked, "no progress"
        peers.client.acknowledge_received_data(taken - acked, stream_id)
        acked = taken
        peers.pump()
    assert peers.received(stream_id) == body
    assert peers.largest_read <= 16 * 1024 and peers.peak_buffered <= 16 * 1024


def test_a_stream_whose_backend_is_slow_or_stalled_does_not_hold_the_others() -> None:
    peers = Relay1(auto_connect=False)
    slow = peers.request(GET)  # its connect never completes
    stalled = peers.request(GET)
    peers.connect(stalled)
    peers.respond(stalled, h11.Response(status_code=200, headers=[("content-length", "100")]))  # and no body
    fast = peers.request(GET)
    peers.connect(fast)
    peers.respond(fast, *ok(b"fast"))
    assert peers.received(fast) == b"fast" and peers.of(StreamEnded, fast)
    assert not peers.of(StreamEnded, slow) and not peers.of(StreamEnded, stalled)


@pytest.mark.parametrize(("status", "code"), [(502, b"502"), (504, b"504")])
def test_a_backend_that_cannot_be_reached_fails_that_stream_only(status: int, code: bytes) -> None:
    peers = Relay1(auto_connect=False)
    down = peers.request(GET)
    up = peers.request(GET)
    peers.fail(down, status)
    assert [status_of(e) for e in peers.of(ResponseReceived, down)] == [code]
    assert peers.received(down).startswith(code)
    assert [e.reason for e in peers.events if isinstance(e, StreamError)] == [
        "backend_unreachable" if status == 502 else "backend_timeout"
    ]
    assert peers.backends[down].closed and not peers.goaways and not peers.closed
    peers.connect(up)
    peers.respond(up, *ok(b"fine"))
    assert peers.received(up) == b"fine"
    later = peers.request(GET)
    peers.connect(later)
    peers.respond(later, *ok(b"still"))
    assert peers.received(later) == b"still"


def test_grpc_gets_unimplemented_without_a_backend_connection() -> None:
    peers = Relay1()
    grpc = [*post(), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    stream_id = peers.request(grpc, b"\x00\x00\x00\x00\x00")
    [head] = peers.of(ResponseReceived, stream_id)
    fields = dict(head.headers)
    assert fields[b":status"] == b"200" and fields[b"grpc-status"] == b"12"
    assert fields[b"grpc-message"] == GRPC_MESSAGE.encode()
    assert head.stream_ended is not None  # trailers-only
    assert not peers.backends
    assert peers.closed_event(stream_id).grpc_status == "12"


def test_request_trailers_get_501_and_the_backend_never_has_a_complete_request() -> None:
    for length in (None, b"4"):
        peers = Relay1()
        stream_id = peers.client.get_next_available_stream_id()
        extra = [] if length is None else [(b"content-length", length)]
        peers.client.send_headers(stream_id, post(*extra))
        peers.client.send_data(stream_id, b"body")
        peers.pump()
        backend = peers.backends[stream_id]
        assert backend.body == (b"body" if length is None else b"bod")  # a declared length's last byte waits
        peers.client.send_headers(stream_id, [(b"x-checksum", b"1")], end_stream=True)
        peers.pump()
        assert [status_of(e) for e in peers.of(ResponseReceived, stream_id)] == [b"501"]
        assert peers.received(stream_id) == b"501 Not Implemented: " + TRAILERS_MESSAGE.encode() + b"\n"
        assert backend.closed and not backend.complete
        assert [e.reason for e in peers.events if isinstance(e, StreamError)] == ["request_trailers"]


def test_a_bad_response_is_a_502_before_the_head_and_a_reset_after() -> None:
    peers = Relay1()
    before = peers.request(GET)
    peers.backends[before].outgoing += b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    peers.pump()
    assert [status_of(e) for e in peers.of(ResponseReceived, before)] == [b"502"]
    after = peers.request(GET)
    peers.respond(after, h11.Response(status_code=200, headers=[("content-length", "10")]), h11.Data(data=b"12345"))
    peers.backends[after].eof = True
    peers.pump()
    assert peers.received(after) == b"12345"
    assert [e.error_code for e in peers.of(StreamReset, after)] == [ErrorCodes.INTERNAL_ERROR]
    assert [e.reason for e in peers.events if isinstance(e, StreamError)] == ["bad_response", "bad_response"]
    assert peers.backends[before].closed and peers.backends[after].closed and not peers.closed


def test_a_101_is_refused() -> None:
    peers = Relay1()
    stream_id = peers.request(GET)
    peers.backends[stream_id].outgoing += b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    peers.pump()
    assert [status_of(e) for e in peers.of(ResponseReceived, stream_id)] == [b"502"]


def test_100_continue_passes_before_the_final_response() -> None:
    peers = Relay1()
    stream_id = peers.request([*post(), (b"expect", b"100-continue")], end=False)
    peers.respond(stream_id, h11.InformationalResponse(status_code=100, headers=[]))
    assert [dict(e.headers)[b":status"] for e in peers.of(InformationalResponseReceived, stream_id)] == [b"100"]
    peers.client.send_data(stream_id, b"now", end_stream=True)
    peers.pump()
    peers.respond(stream_id, *ok(b"got it"))
    assert peers.backends[stream_id].body == b"now" and peers.received(stream_id) == b"got it"


def test_an_early_complete_response_stops_the_upload() -> None:
    peers = Relay1()
    stream_id = peers.request(post(), b"part", end=False)
    backend = peers.backends[stream_id]
    backend.send(
        h11.Response(status_code=413, headers=[("content-length", "0"), ("connection", "close")]),
        h11.EndOfMessage(),
    )
    peers.pump()
    assert [status_of(e) for e in peers.of(ResponseReceived, stream_id)] == [b"413"]
    assert [e.error_code for e in peers.of(StreamReset, stream_id)] == [ErrorCodes.NO_ERROR]
    assert backend.closed and peers.relay.open_streams == 0


def test_a_client_reset_closes_the_streams_backend() -> None:
    peers = Relay1()
    stream_id = peers.request(GET)
    peers.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    peers.pump()
    assert peers.backends[stream_id].closed
    assert peers.closed_event(stream_id).reset_by == "client"


def test_the_end_of_the_connection_closes_every_backend() -> None:
    peers = Relay1(auto_connect=False)
    waiting = peers.request(GET)
    open_ = peers.request(GET)
    peers.connect(open_)
    peers.apply(peers.relay.client_closed())
    assert peers.closed and peers.backends[waiting].closed and peers.backends[open_].closed
    assert {e.stream_id for e in peers.events if isinstance(e, StreamClosed)} == {waiting, open_}


def test_drain_lets_the_streams_in_flight_finish() -> None:
    peers = Relay1()
    stream_id = peers.request(GET)
    peers.apply(peers.relay.start_drain())
    peers.pump()
    assert [g.last_stream_id for g in peers.goaways] == [stream_id] and not peers.closed
    peers.respond(stream_id, *ok(b"done"))
    assert peers.received(stream_id) == b"done" and peers.closed


def test_each_relay_takes_only_the_calls_of_its_backend() -> None:
    h1 = Http2Relay(POLICY, client_ip=CLIENT_IP, identity=None, backend_http_version="1.1")
    h2 = Http2Relay(POLICY, client_ip=CLIENT_IP, identity=None)
    assert h2.backend_http_version == "2"
    with pytest.raises(RuntimeError):
        h1.backend_connected()
    with pytest.raises(RuntimeError):
        h1.backend_bytes(b"x")
    with pytest.raises(RuntimeError):
        h2.backend_stream_connected(1)
    with pytest.raises(ValueError, match="502"):
        h1.backend_stream_failed(1, 500)
    with pytest.raises(ValueError, match="backend_http_version"):
        Http2Relay(POLICY, client_ip=CLIENT_IP, identity=None, backend_http_version="3")
