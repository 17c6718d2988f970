"""proxy.protocol.http2: an Http2Relay between two independent h2 connections, no sockets.

The test's client is an h2 client connection and the test's backend an h2 server connection; bytes move between
them and the relay until nothing moves. GOAWAY frames the relay writes are taken out before they reach the test's
peers (h2 would refuse every frame after one, which is why the relay writes them itself) and kept for assertions.
Attacks are written as raw frames with hyperframe where h2 would refuse to produce them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame

from proxy.protocol.http1 import HeaderPolicy
from proxy.protocol.http2 import (
    AttackContained,
    Http2Relay,
    Http2Settings,
    Http2Step,
    PeerGoAway,
    ProtocolViolation,
    StreamClosed,
    StreamOpened,
)
from proxy.protocol.http2_frames import MAX_CONTINUATION_FRAMES
from tests.conftest import ALICE_IDENTITY

CLIENT_IP = "203.0.113.7"
IDENTITY = ALICE_IDENTITY
XFCC = dict(HeaderPolicy().added_headers(client_ip=CLIENT_IP, identity=IDENTITY))[b"X-Forwarded-Client-Cert"]
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", b"/hello")]
GRPC = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"svc.test"),
    (b":path", b"/pkg.Svc/Call"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def post(path: bytes = b"/upload") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"svc.test"), (b":path", path)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def split_goaways(data: bytes) -> tuple[bytes, list[GoAwayFrame]]:
    """The frames of `data` without its GOAWAY frames, and those frames."""
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


class Peers:
    """A relay between a test h2 client and a test h2 backend, with what each of them received."""

    def __init__(
        self,
        *,
        policy: HeaderPolicy | None = None,
        settings: Http2Settings | None = None,
        clock: Callable[[], float] | None = None,
        connect: bool = True,
        backend_settings: dict[SettingCodes | int, int] | None = None,
        client_config: H2Configuration | None = None,
    ) -> None:
        kwargs = {} if clock is None else {"clock": clock}
        self.relay = Http2Relay(
            policy or HeaderPolicy(), client_ip=CLIENT_IP, identity=IDENTITY, settings=settings, **kwargs
        )
        self.client = H2Connection(client_config or H2Configuration(client_side=True, header_encoding=None))
        self.backend = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if backend_settings:
            self.backend.local_settings = Settings(client=False, initial_values=backend_settings)
        self.client.initiate_connection()
        self.backend.initiate_connection()
        self.client_events: list[Event] = []
        self.backend_events: list[Event] = []
        self.events: list[object] = []
        self.client_goaways: list[GoAwayFrame] = []
        self.backend_goaways: list[GoAwayFrame] = []
        self.closed = False
        self.peak_buffered = 0
        self.apply(self.relay.start())
        if connect:
            self.apply(self.relay.backend_connected())
        self.pump()

    def apply(self, step: Http2Step) -> None:
        self.events += step.events
        self.peak_buffered = max(self.peak_buffered, self.relay.buffered)
        if step.to_client:
            data, goaways = split_goaways(step.to_client)
            self.client_goaways += goaways
            if data:
                self.client_events += self.client.receive_data(data)
        if step.to_backend:
            data, goaways = split_goaways(step.to_backend)
            self.backend_goaways += goaways
            if data:
                self.backend_events += self.backend.receive_data(data)
        if step.close:
            self.closed = True

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            data = self.client.data_to_send()
            if data and not self.closed:
                self.apply(self.relay.client_bytes(data))
                moved = True
            data = self.backend.data_to_send()
            if data and not self.closed and self.relay.closed is False:
                self.apply(self.relay.backend_bytes(data))
                moved = True
            if not moved:
                return
        raise AssertionError("the peers never went quiet")

    def send_raw(self, data: bytes) -> None:
        """Client bytes h2 would not write; the client's own pending bytes go first."""
        self.apply(self.relay.client_bytes(self.client.data_to_send() + data))

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes = b"", *, end: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.client.send_data(stream_id, body, end_stream=end)
        self.pump()
        return stream_id

    def backend_request(self, stream_id: int) -> RequestReceived:
        return one(self.backend_events, RequestReceived, stream_id)

    def respond(self, stream_id: int, status: bytes = b"200", body: bytes = b"", trailers=None) -> None:
        self.backend.send_headers(stream_id, [(b":status", status)], end_stream=not body and not trailers)
        if body:
            self.backend.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.backend.send_headers(stream_id, trailers, end_stream=True)
        self.pump()

    def of(self, kind: type, side: str = "relay") -> list:
        events = {"relay": self.events, "client": self.client_events, "backend": self.backend_events}[side]
        return [event for event in events if isinstance(event, kind)]

    def received(self, side: str, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived, side) if e.stream_id == stream_id)


def one(events: list[Event], kind: type, stream_id: int):
    found = [e for e in events if isinstance(e, kind) and e.stream_id == stream_id]
    assert len(found) == 1, f"{kind.__name__} on stream {stream_id}: {found}"
    return found[0]


def headers_of(event: RequestReceived | ResponseReceived | TrailersReceived) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in event.headers]


def closed(peers: Peers, stream_id: int) -> StreamClosed:
    found = [e for e in peers.of(StreamClosed) if e.stream_id == stream_id]
    assert len(found) == 1, found
    return found[0]


# ---- a request and its response --------------------------------------------------------------------------------


def test_a_request_reaches_the_backend_with_the_identity_and_the_response_comes_back() -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    request = peers.backend_request(stream_id)
    headers = headers_of(request)
    assert headers[:4] == GET  # pseudo-headers pass, first and in order
    assert (b"x-forwarded-client-cert", XFCC) in headers
    assert (b"x-forwarded-for", CLIENT_IP.encode()) in headers
    assert (b"x-forwarded-proto", b"https") in headers
    assert all(name == name.lower() for name, _ in headers)
    peers.respond(stream_id, body=b"hi there", trailers=[(b"x-checksum", b"42")])
    response = one(peers.client_events, ResponseReceived, stream_id)
    assert headers_of(response) == [(b":status", b"200")]
    assert peers.received("client", stream_id) == b"hi there"
    assert headers_of(one(peers.client_events, TrailersReceived, stream_id)) == [(b"x-checksum", b"42")]
    assert one(peers.client_events, StreamEnded, stream_id)
    assert peers.of(StreamOpened) == [StreamOpened(stream_id, "GET", "/hello", grpc=False)]
    assert closed(peers, stream_id) == StreamClosed(stream_id, 200, None, None, None, 0, 8)
    assert peers.relay.open_streams == 0 and peers.relay.streams_total == 1
    assert not peers.closed


FORGED = [
    (b"x-forwarded-client-cert", b"Hash=forged;Subject=\"CN=admin\""),
    (b"x_forwarded_client_cert", b"Hash=forged2"),
    (b"x.forwarded.client.cert", b"Hash=forged3"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"forwarded", b"for=10.0.0.1"),
    (b"x-real-ip", b"10.0.0.1"),
    (b"x-client-subject", b"CN=admin"),
]


def test_every_forged_identity_header_is_dropped_from_headers_and_trailers() -> None:
    policy = HeaderPolicy({"X-Client-Subject": "subject"})
    peers = Peers(policy=policy)
    stream_id = peers.client.get_next_available_stream_id()
    peers.client.send_headers(stream_id, [*post(), *FORGED, (b"x-kept", b"yes")])
    peers.client.send_data(stream_id, b"body")
    peers.client.send_headers(stream_id, [*FORGED, (b"x-trailer-kept", b"yes")], end_stream=True)
    peers.pump()
    headers = headers_of(peers.backend_request(stream_id))
    assert [v for n, v in headers if n == b"x-forwarded-client-cert"] == [XFCC]
    assert [v for n, v in headers if n == b"x-forwarded-for"] == [CLIENT_IP.encode()]
    assert [v for n, v in headers if n == b"x-client-subject"] == [IDENTITY.subject.encode()]
    forged_values = {value for _, value in FORGED}
    assert not [h for h in headers if h[1] in forged_values]
    assert (b"x-kept", b"yes") in headers
    assert headers_of(one(peers.backend_events, TrailersReceived, stream_id)) == [(b"x-trailer-kept", b"yes")]
    assert peers.received("backend", stream_id) == b"body"


def test_a_connection_specific_header_ends_the_connection_before_the_backend_sees_the_request() -> None:
    lax = H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    peers = Peers(client_config=lax)
    peers.request([*GET, (b"connection", b"keep-alive")])
    assert not peers.of(RequestReceived, "backend")
    assert [g.error_code for g in peers.client_goaways] == [ErrorCodes.PROTOCOL_ERROR]
    assert [e.side for e in peers.of(ProtocolViolation)] == ["client"]
    assert peers.closed


def test_a_grpc_trailers_only_response_stays_one_headers_frame() -> None:
    peers = Peers()
    stream_id = peers.request(GRPC, b"\x00\x00\x00\x00\x00")
    assert peers.of(StreamOpened)[0].grpc
    status = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"5")]
    peers.backend.send_headers(stream_id, status, end_stream=True)
    peers.pump()
    response = one(peers.client_events, ResponseReceived, stream_id)
    assert response.stream_ended is not None
    assert headers_of(response) == status
    assert closed(peers, stream_id).grpc_status == "5"


def test_the_proxy_refuses_connect() -> None:
    peers = Peers()
    stream_id = peers.request([(b":method", b"CONNECT"), (b":authority", b"elsewhere:443")], end=False)
    assert headers_of(one(peers.client_events, ResponseReceived, stream_id))[0] == (b":status", b"405")
    assert not peers.of(RequestReceived, "backend")
    assert closed(peers, stream_id).status == 405


def test_streams_wait_for_the_backends_concurrency_limit() -> None:
    peers = Peers(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    first = peers.request(GET)
    second = peers.request(GET)
    assert [e.stream_id for e in peers.of(RequestReceived, "backend")] == [first]
    peers.respond(first, body=b"one")
    assert [e.stream_id for e in peers.of(RequestReceived, "backend")] == [first, second]
    peers.respond(second, body=b"two")
    assert peers.received("client", second) == b"two"


def test_one_byte_at_a_time() -> None:
    """Frame headers cut anywhere, a client GOAWAY among them: the same exchange."""
    peers = Peers()
    stream_id = peers.client.get_next_available_stream_id()
    peers.client.send_headers(stream_id, post(), end_stream=False)
    peers.client.send_data(stream_id, b"x" * 3000, end_stream=True)
    data = peers.client.data_to_send() + GoAwayFrame(0, last_stream_id=0, error_code=0).serialize()
    for i in range(len(data)):
        peers.apply(peers.relay.client_bytes(data[i : i + 1]))
    peers.pump()
    assert peers.received("backend", stream_id) == b"x" * 3000
    assert peers.of(PeerGoAway) == [PeerGoAway("client", 0, 0)]
    peers.respond(stream_id, body=b"done")
    assert peers.received("client", stream_id) == b"done"
    assert peers.closed  # the client said GOAWAY: its last stream is done


# ---- flow control ----------------------------------------------------------------------------------------------


def send_what_fits(conn: H2Connection, stream_id: int, body: bytes) -> bytes:
    """Send as much of `body` as the windows allow; return the rest."""
    while body:
        room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(body))
        if room <= 0:
            break
        conn.send_data(stream_id, body[:room])
        body = body[room:]
    return body


def test_an_upload_is_acknowledged_only_as_far_as_the_backend_takes_it() -> None:
    settings = Http2Settings()
    peers = Peers(settings=settings)
    body = bytes(range(256)) * 4096  # 1 MiB
    stream_id = peers.request(post(), end=False)
    rest = send_what_fits(peers.client, stream_id, body)
    peers.pump()
    # The test backend never acknowledges: it has its default 64 KiB window, the relay one stream window.
    assert len(peers.received("backend", stream_id)) == 65_535
    assert peers.relay.buffered == settings.initial_window_size - 65_535
    assert peers.client.local_flow_control_window(stream_id) <= 65_535  # given back: at most what the backend took
    while rest or len(peers.received("backend", stream_id)) < len(body):
        for event in peers.of(DataReceived, "backend"):
            if event.flow_controlled_length:
                peers.backend.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                event.flow_controlled_length = 0  # acknowledged once
        peers.pump()
        rest = send_what_fits(peers.client, stream_id, rest)
        peers.pump()
    assert peers.received("backend", stream_id) == body
    assert peers.peak_buffered <= settings.initial_window_size


def test_a_stalled_stream_does_not_block_the_others() -> None:
    peers = Peers()
    stalled, moving = peers.request(GET), peers.request(GET)
    big = b"s" * (512 * 1024)
    for stream_id in (stalled, moving):
        peers.backend.send_headers(stream_id, [(b":status", b"200")])
    pending = {stalled: big, moving: big}
    ended = False
    for _ in range(1000):
        for stream_id in (stalled, moving):
            pending[stream_id] = send_what_fits(peers.backend, stream_id, pending[stream_id])
        if not pending[moving] and not ended:
            peers.backend.end_stream(moving)
            ended = True
        peers.pump()
        for event in peers.of(DataReceived, "client"):
            if event.flow_controlled_length:
                if event.stream_id == moving:
                    peers.client.acknowledge_received_data(event.flow_controlled_length, moving)
                else:  # the reader of this stream reads nothing more: only the connection window is given back
                    peers.client.increment_flow_control_window(event.flow_controlled_length)
                event.flow_controlled_length = 0
        peers.pump()
        if ended and len(peers.received("client", moving)) == len(big):
            break
    assert peers.received("client", moving) == big
    assert one(peers.client_events, StreamEnded, moving)
    assert len(peers.received("client", stalled)) == 65_535  # the test client's stream window, never reopened
    assert peers.relay.buffered <= Http2Settings().initial_window_size
    assert peers.backend.local_flow_control_window(stalled) == 0  # the backend cannot push more into it
    assert [e.stream_id for e in peers.of(StreamClosed)] == [moving]


def test_a_zero_window_client_costs_no_more_than_one_stream_window() -> None:
    settings = Http2Settings(initial_window_size=64 * 1024, connection_window_size=256 * 1024)
    peers = Peers(settings=settings)
    peers.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream_id = peers.request(GET)
    peers.backend.send_headers(stream_id, [(b":status", b"200")])
    rest = send_what_fits(peers.backend, stream_id, b"z" * (4 * 1024 * 1024))
    peers.pump()
    rest = send_what_fits(peers.backend, stream_id, rest)
    peers.pump()
    assert peers.received("client", stream_id) == b""
    assert peers.relay.buffered == settings.initial_window_size
    assert peers.backend.local_flow_control_window(stream_id) == 0
    assert len(rest) == 4 * 1024 * 1024 - settings.initial_window_size


# ---- failures --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "grpc_status"), [(502, b"14"), (504, b"4")])
def test_a_backend_failure_answers_each_waiting_stream_then_goaway(status: int, grpc_status: bytes) -> None:
    peers = Peers(connect=False)
    plain = peers.request(GET)
    grpc = peers.request(GRPC, b"\x00\x00\x00\x00\x00")
    peers.apply(peers.relay.backend_failed(status))
    peers.pump()
    assert headers_of(one(peers.client_events, ResponseReceived, plain))[0] == (b":status", str(status).encode())
    assert peers.received("client", plain).startswith(str(status).encode())
    grpc_head = one(peers.client_events, ResponseReceived, grpc)
    assert grpc_head.stream_ended is not None
    assert (b"grpc-status", grpc_status) in headers_of(grpc_head)
    assert [(g.error_code, g.last_stream_id) for g in peers.client_goaways] == [(0, grpc)]
    assert closed(peers, grpc).grpc_status == grpc_status.decode()
    assert peers.closed and peers.relay.end_reason in ("backend_unreachable", "backend_timeout")


def test_with_no_stream_open_the_failure_waits_for_the_first_request() -> None:
    peers = Peers(connect=False)
    peers.apply(peers.relay.backend_failed(502))
    assert not peers.client_goaways and not peers.closed
    stream_id = peers.request(GRPC, b"\x00\x00\x00\x00\x00")
    assert (b"grpc-status", b"14") in headers_of(one(peers.client_events, ResponseReceived, stream_id))
    assert [g.last_stream_id for g in peers.client_goaways] == [stream_id]
    assert peers.closed


def test_the_backend_closing_resets_started_responses_and_answers_the_rest() -> None:
    peers = Peers()
    started, waiting = peers.request(GET), peers.request(GET)
    peers.backend.send_headers(started, [(b":status", b"200")])
    peers.backend.send_data(started, b"part")
    peers.pump()
    peers.apply(peers.relay.backend_closed())
    assert one(peers.client_events, StreamReset, started).error_code == ErrorCodes.INTERNAL_ERROR
    assert headers_of(one(peers.client_events, ResponseReceived, waiting))[0] == (b":status", b"502")
    assert peers.closed


def test_a_client_reset_resets_the_backend_stream() -> None:
    peers = Peers()
    stream_id = peers.request(GRPC, end=False)
    peers.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    peers.pump()
    assert one(peers.backend_events, StreamReset, stream_id).error_code == ErrorCodes.CANCEL
    assert closed(peers, stream_id).reset_by == "client"


def test_the_client_closing_cancels_every_backend_stream() -> None:
    peers = Peers()
    streams = [peers.request(GET), peers.request(GET)]
    peers.apply(peers.relay.client_closed())
    assert [e.stream_id for e in peers.of(StreamReset, "backend")] == streams
    assert peers.closed and peers.relay.end_reason == "client_closed"
    # Every stream opened is closed in the books too, so a gauge of active streams comes back down.
    assert [(e.stream_id, e.reset, e.reset_by) for e in peers.of(StreamClosed)] == [
        (stream_id, ErrorCodes.CANCEL, "connection") for stream_id in streams
    ]


def test_stop_ends_the_streams_still_open() -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    peers.apply(peers.relay.stop("cancelled"))
    assert one(peers.backend_events, StreamReset, stream_id).error_code == ErrorCodes.CANCEL
    assert closed(peers, stream_id).reset_by == "connection"
    assert peers.closed and peers.relay.end_reason == "cancelled" and peers.relay.open_streams == 0


@pytest.mark.parametrize(
    ("code", "expect"),
    [(ErrorCodes.CANCEL, "502"), (ErrorCodes.REFUSED_STREAM, ErrorCodes.REFUSED_STREAM)],
)
def test_a_backend_reset_before_the_response(code: ErrorCodes, expect: object) -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    peers.backend.reset_stream(stream_id, code)
    peers.pump()
    if expect == "502":
        assert headers_of(one(peers.client_events, ResponseReceived, stream_id))[0] == (b":status", b"502")
    else:
        assert one(peers.client_events, StreamReset, stream_id).error_code == expect


def test_a_backend_reset_after_the_head_passes_its_code() -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    peers.backend.send_headers(stream_id, [(b":status", b"200")])
    peers.backend.reset_stream(stream_id, ErrorCodes.CANCEL)
    peers.pump()
    assert one(peers.client_events, StreamReset, stream_id).error_code == ErrorCodes.CANCEL


# ---- drain and GOAWAY ------------------------------------------------------------------------------------------


def test_drain_finishes_streams_in_flight_and_refuses_new_ones() -> None:
    peers = Peers()
    in_flight = peers.request(GET)
    peers.apply(peers.relay.start_drain())
    assert [(g.error_code, g.last_stream_id) for g in peers.client_goaways] == [(0, in_flight)]
    late = peers.request(GET)
    assert one(peers.client_events, StreamReset, late).error_code == ErrorCodes.REFUSED_STREAM
    assert not peers.closed
    peers.respond(in_flight, body=b"finished")
    assert peers.received("client", in_flight) == b"finished"
    assert peers.closed and peers.relay.end_reason == "drained"


def test_drain_with_nothing_in_flight_closes_at_once() -> None:
    peers = Peers()
    peers.apply(peers.relay.start_drain())
    assert peers.closed and [g.last_stream_id for g in peers.client_goaways] == [0]


def test_the_backends_goaway_refuses_what_it_did_not_take_and_drains_the_client() -> None:
    peers = Peers()
    taken, not_taken = peers.request(GET), peers.request(GET)
    # The test backend's h2 would refuse to go on after its own GOAWAY, so the frame is written for it.
    peers.apply(peers.relay.backend_bytes(GoAwayFrame(0, last_stream_id=taken, error_code=0).serialize()))
    assert one(peers.client_events, StreamReset, not_taken).error_code == ErrorCodes.REFUSED_STREAM
    assert [g.last_stream_id for g in peers.client_goaways] == [not_taken]
    assert peers.of(PeerGoAway) == [PeerGoAway("backend", 0, taken)]
    peers.respond(taken, body=b"ok")
    assert peers.received("client", taken) == b"ok"
    assert peers.closed


# ---- attacks ---------------------------------------------------------------------------------------------------


def assert_calmed(peers: Peers, reason: str) -> None:
    assert [e.reason for e in peers.of(AttackContained)] == [reason]
    assert [g.error_code for g in peers.client_goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert peers.closed and peers.relay.end_reason == reason


def test_rapid_reset_is_contained() -> None:
    clock = FakeClock()
    peers = Peers(settings=Http2Settings(max_resets_per_second=20), clock=clock)
    for _ in range(100):  # a client that resets at the allowed pace is fine
        stream_id = peers.request(GET)
        peers.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        peers.pump()
        clock.now += 0.05
    assert not peers.of(AttackContained)
    backend_resets = len(peers.of(StreamReset, "backend"))
    assert backend_resets == 100
    for _ in range(21):  # HEADERS then RST_STREAM, as fast as it can
        stream_id = peers.client.get_next_available_stream_id()
        peers.client.send_headers(stream_id, GET)
        peers.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    peers.pump()
    assert_calmed(peers, "rapid_reset")
    assert len(peers.of(RequestReceived, "backend")) <= 100 + 21


def continuation_flood(stream_id: int, frames: int, size: int) -> list[bytes]:
    block = HeadersFrame(stream_id, data=b"\x82", flags=["END_STREAM"]).serialize()  # :method GET, no END_HEADERS
    return [block] + [ContinuationFrame(stream_id, data=b"\x00" * size).serialize() for _ in range(frames)]


@pytest.mark.parametrize(("frames", "size"), [(40, 16_000), (MAX_CONTINUATION_FRAMES + 1, 0)])
def test_a_continuation_flood_is_refused_as_it_arrives(frames: int, size: int) -> None:
    settings = Http2Settings()
    peers = Peers(settings=settings)
    fed = 0
    for frame in continuation_flood(1, frames, size):
        if peers.closed:
            break
        peers.send_raw(frame)
        fed += len(frame)
    assert_calmed(peers, "continuation_flood")
    assert fed <= settings.max_header_list_size + 512 + 2 * (9 + settings.max_frame_size)
    assert not peers.of(RequestReceived, "backend")


def test_h2_alone_buffers_a_continuation_flood_until_64_frames() -> None:
    """Why the gate exists: h2 keeps a megabyte of CONTINUATION frames before it refuses the block."""
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    frames = continuation_flood(1, 70, 16_000)
    accepted = 0
    with pytest.raises(ProtocolError):
        for frame in frames:
            server.receive_data(frame)
            accepted += 1
    assert accepted >= 63  # about 1 MB held


def test_an_hpack_bomb_is_refused_at_the_header_list_limit() -> None:
    peers = Peers()
    value = b"a" * 4000
    # One literal header, indexed into the dynamic table (4 KB), then referenced over and over (one byte each).
    literal = b"\x40\x06x-bomb" + b"\x7f" + _hpack_int(len(value) - 127) + value
    block = b"\x82\x87\x84" + b"\x41\x08svc.test" + literal + b"\xbe" * 8000  # GET https / authority, then refs
    peers.send_raw(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert_calmed(peers, "header_list_too_large")
    assert not peers.of(RequestReceived, "backend")


def _hpack_int(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def test_too_many_small_headers_are_refused() -> None:
    peers = Peers()
    stream_id = peers.client.get_next_available_stream_id()
    peers.client.send_headers(stream_id, [*GET, *((b"h%d" % i, b"v") for i in range(1200))], end_stream=True)
    peers.pump()
    assert_calmed(peers, "header_list_too_large")


def test_a_settings_flood_is_contained() -> None:
    peers = Peers(clock=FakeClock())
    for i in range(12):
        peers.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 4096 + i})
    peers.pump()
    assert_calmed(peers, "settings_flood")


def test_a_ping_flood_is_contained() -> None:
    peers = Peers(clock=FakeClock())
    for i in range(51):
        peers.client.ping(b"%08d" % i)
    peers.pump()
    assert_calmed(peers, "ping_flood")


def test_pings_at_a_steady_pace_are_fine() -> None:
    clock = FakeClock()
    peers = Peers(clock=clock)
    for i in range(200):
        peers.client.ping(b"%08d" % i)
        peers.pump()
        clock.now += 0.05
    assert not peers.of(AttackContained) and not peers.closed


def test_a_frame_over_the_advertised_size_is_refused_from_its_header() -> None:
    peers = Peers()
    stream_id = peers.request(post(), end=False)
    huge = DataFrame(stream_id, data=b"").serialize()
    huge = (16 * 1024 * 1024 - 1).to_bytes(3, "big") + huge[3:]  # announces 16 MiB, sends 100 bytes of it
    peers.send_raw(huge + b"d" * 100)
    assert [(e.side, e.error_code) for e in peers.of(ProtocolViolation)] == [("client", ErrorCodes.FRAME_SIZE_ERROR)]
    assert [g.error_code for g in peers.client_goaways] == [ErrorCodes.FRAME_SIZE_ERROR]
    assert one(peers.backend_events, StreamReset, stream_id).error_code == ErrorCodes.CANCEL
    assert peers.closed


# ---- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_streams", 0),
        ("max_frame_size", 1024),
        ("max_header_list_size", 10),
        ("initial_window_size", 2**31),
        ("max_resets_per_second", 0),
        ("connection_window_size", 300 * 1024),  # under twice the default stream window
    ],
)
def test_settings_out_of_range_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        Http2Settings(**{field: value})


def test_the_settings_reach_the_client() -> None:
    settings = Http2Settings(max_concurrent_streams=7, initial_window_size=100_000, max_frame_size=32_768)
    peers = Peers(settings=settings)
    remote = peers.client.remote_settings
    assert (remote.max_concurrent_streams, remote.initial_window_size, remote.max_frame_size) == (7, 100_000, 32_768)
    assert remote.max_header_list_size == settings.max_header_list_size
    assert peers.client.outbound_flow_control_window == settings.connection_window_size


# ---- more of the edges -----------------------------------------------------------------------------------------


def test_an_informational_response_passes_before_the_final_one() -> None:
    peers = Peers()
    stream_id = peers.request([*post(), (b"expect", b"100-continue")], end=False)
    peers.backend.send_headers(stream_id, [(b":status", b"100")])
    peers.pump()
    peers.client.send_data(stream_id, b"payload", end_stream=True)
    peers.pump()
    assert peers.received("backend", stream_id) == b"payload"
    peers.respond(stream_id, status=b"201")
    statuses = [headers_of(e)[0][1] for e in peers.client_events if hasattr(e, "headers") and e.stream_id == stream_id]
    assert statuses == [b"100", b"201"]


def test_a_head_request_gets_the_proxys_answer_without_a_body() -> None:
    peers = Peers(connect=False)
    stream_id = peers.request([(b":method", b"HEAD"), *GET[1:]])
    peers.apply(peers.relay.backend_failed(502))
    head = headers_of(one(peers.client_events, ResponseReceived, stream_id))
    assert head[0] == (b":status", b"502") and (b"content-length", b"16") in head
    assert peers.received("client", stream_id) == b""
    assert one(peers.client_events, StreamEnded, stream_id)


def test_a_backend_breaking_the_protocol_gets_goaway_and_the_client_502() -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    oversized = (1 << 20).to_bytes(3, "big") + DataFrame(stream_id, data=b"").serialize()[3:]
    peers.apply(peers.relay.backend_bytes(oversized))
    assert [(e.side, e.error_code) for e in peers.of(ProtocolViolation)] == [("backend", ErrorCodes.FRAME_SIZE_ERROR)]
    assert [g.error_code for g in peers.backend_goaways] == [ErrorCodes.FRAME_SIZE_ERROR]
    assert headers_of(one(peers.client_events, ResponseReceived, stream_id))[0] == (b":status", b"502")
    assert peers.closed and peers.relay.end_reason == "backend_protocol_error"


def test_a_client_goaway_with_an_error_ends_everything_at_once() -> None:
    peers = Peers()
    stream_id = peers.request(GET)
    peers.send_raw(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.INTERNAL_ERROR).serialize())
    assert one(peers.backend_events, StreamReset, stream_id).error_code == ErrorCodes.CANCEL
    assert peers.closed and peers.relay.end_reason == "client_goaway"


def test_padding_is_given_back_with_the_data() -> None:
    """Padding counts against the window but never reaches the backend: the relay returns it at once."""
    peers = Peers(settings=Http2Settings(initial_window_size=4096, connection_window_size=65_535))
    stream_id = peers.request(post(), end=False)
    for _ in range(40):  # 40 x 1201 window bytes through a 4096-byte window: only if all of it comes back
        assert peers.client.local_flow_control_window(stream_id) >= 1201
        peers.client.send_data(stream_id, b"d" * 1000, pad_length=200)
        peers.pump()
    assert peers.received("backend", stream_id) == b"d" * 40_000
