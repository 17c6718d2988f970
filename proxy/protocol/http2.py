"""HTTP/2 between a verified client and its backend, h2c or HTTP/1.1: the identity on every stream (sans-IO, on h2).

Theory of operation
-------------------
With an h2c backend (`backend_http_version="2"`, the relay's default) one client connection maps to one backend
connection, as in tcp mode and HTTP/1.1 mode, and they end together. With an HTTP/1.1 backend each stream has a
backend connection of its own: see "HTTP/1.1 backends". An `Http2Relay` holds two h2 connections and moves
streams between them:

    client bytes --FrameGate--> h2 SERVER connection --events--> relay --calls--> h2 CLIENT connection --> backend
    client bytes <------------- h2 SERVER connection <--calls--  relay <--events-- h2 CLIENT connection <-- backend

A client stream and its backend stream have the same stream id. Both are odd and opened in the order the client
opens them, and ids may be skipped (RFC 9113 section 5.1.1), so a stream the relay answers itself simply leaves a
gap on the backend connection. The backend's GOAWAY and RST_STREAM therefore name the client's stream directly.

The relay does no I/O. The driver feeds what it read (`client_bytes`, `backend_bytes`) and reports what happened
to the connections (`start`, `backend_connected`, `backend_failed`, `client_closed`, `backend_closed`,
`start_drain`); each call returns an `Http2Step`: bytes for each peer, events for logs and metrics, and whether to
close. `proxy.relay.http2_forwarder` is that driver.

Identity
--------
Every request head is written again (`_request_headers`): pseudo-headers pass in order; every header the policy
owns (`HeaderPolicy.is_stripped`: XFCC, X-Forwarded-*, Forwarded, the configured extras, in any spelling) is
dropped, every copy; then the proxy's own headers are appended with lowercase names (HTTP/2 allows no other). Request
trailers lose the owned headers too. Connection-specific fields (RFC 9113 section 8.2.2) never reach the backend:
h2 refuses a request that carries them, as a connection error (section 5.4.1 lets a stream error be one), and
`_request_headers` drops them again so that no configuration of h2 can let one through.

Flow control and memory
-----------------------
DATA is acknowledged to the side it came from only once the other side's flow-control window has taken it (it is
in the other h2 connection's output, which the driver writes before it reads that side again). Until then it
waits in the stream's buffer, and the sender cannot send more than the window the relay advertised to it. So
each direction of each stream holds at most `initial_window_size` bytes, a connection at most
`connection_window_size` per direction, and a stream whose reader has stopped granting window (a zero-window
stall) fills only its own window: the connection window is at least twice a stream's, so other streams go on.
Buffers are sent in turn, starting from a different stream each time a connection window opens.

Streams wait for the backend's SETTINGS_MAX_CONCURRENT_STREAMS, and for the backend connection itself, in arrival
order; their request bytes are not acknowledged meanwhile, so waiting costs no more than a window.

Attacks (each one ends the connection with GOAWAY ENHANCE_YOUR_CALM and an `AttackContained` event)
--------------------------------------------------------------------------------------------------
- rapid reset (CVE-2023-44487): client RST_STREAM frames over `max_resets_per_second` (token bucket);
- CONTINUATION flood (CVE-2024-27316): a header block over `max_header_list_size` encoded bytes, or of more than
  `http2_frames.MAX_CONTINUATION_FRAMES` frames, refused as its frames arrive, before h2 has buffered it;
- HPACK bomb and oversized header lists: hpack counts the decoded size as it decodes and stops at
  `max_header_list_size` (h2 raises DenialOfServiceError, reported as `header_list_too_large`);
- SETTINGS and PING floods: over `max_settings_per_second` / `max_pings_per_second`.
A frame longer than `max_frame_size` is refused when its header arrives (FRAME_SIZE_ERROR), so it is never
buffered. The floods are counted on the client's side only: the backend is the service this proxy fronts.

Failures
--------
- The backend cannot be reached (`backend_failed(502)`), the connect timed out (`backend_failed(504)`), it closed
  or broke the protocol: each stream without a response head gets 502 or 504 (a gRPC request gets a trailers-only
  response, `grpc-status` 14 UNAVAILABLE or 4 DEADLINE_EXCEEDED), a stream whose response had begun gets
  RST_STREAM INTERNAL_ERROR, and the client gets a GOAWAY so its next streams go to a new connection (and a new
  backend connection). If no stream was open, the first one to arrive is answered before the GOAWAY.
- A backend RST_STREAM before the response head is a 502 (gRPC: 14); REFUSED_STREAM passes as it is (the request
  was not processed, the client may retry); after the head the code passes through.
- A client RST_STREAM resets the backend stream with CANCEL; the client's close cancels every backend stream.

HTTP/1.1 backends
-----------------
`backend_http_version="1.1"`: the client's side is as above; the backend's h2 connection is never used. Each
request opens a connection of its own (`Http2Step.open_backends`; the client's SETTINGS_MAX_CONCURRENT_STREAMS
bounds how many), `proxy.protocol.http2_to_http1.Http1Exchange` translates both ways, and the connection is
closed once the response is complete (`close_backends`), or when the stream ends otherwise. No pooling: a
connection carries one request, and says `Connection: close`. The driver reports what happened on it with the
`backend_stream_*` methods, and the relay says what to do next in the steps:
- writes (`stream_writes`): one at a time per stream; the client's DATA in a write is acknowledged to the client
  once the driver reports it written (`backend_stream_written`), so the client cannot have more in flight than
  its stream window, as with an h2c backend;
- reads (`stream_reads`): one at a time per stream, of at most `max_frame_size` bytes, and after the response
  head only as much as the client's window for the stream (and the connection's) takes at that moment. A client
  that stops reading stops the reads: the response waits in the backend's socket, not here. So a stream holds at
  most one read's worth the client has not taken (one more read may land while another stream uses up the
  connection window), and a connection at most `max_concurrent_streams` of those.
Each stream fails alone: an unreachable backend is a 502 on that stream, a connect timeout a 504, a malformed or
cut-short response a 502 (or RST_STREAM INTERNAL_ERROR once the head went out), each with a `StreamError` event;
no GOAWAY, and the other streams go on. What HTTP/1.1 cannot carry is refused on the stream (see
`proxy.protocol.http2_to_http1`): gRPC gets a trailers-only response with `grpc-status` 12 UNIMPLEMENTED and a
`grpc-message` that names the setting; request trailers get 501 (the backend, which never got the end of the
body, has its connection closed); a malformed request 400; CONNECT 405. A response that is complete before the
request is delivered, then RST_STREAM(NO_ERROR) asks the client to stop sending (RFC 9113 section 8.1).

Drain and GOAWAY
----------------
h2 refuses all frames after a GOAWAY, so the relay writes its GOAWAY frames itself and takes the peers' out of the
byte stream (`proxy.protocol.http2_frames`). `start_drain()` sends GOAWAY(NO_ERROR) with the highest stream id
received: streams up to it run to completion, newer ones get RST_STREAM REFUSED_STREAM (safe to retry elsewhere),
and the relay closes once none is left. The backend's GOAWAY refuses the streams above its last stream id the
same way and drains the client. A client's GOAWAY(NO_ERROR) closes once its streams are done; any other code
ends the connection at once.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, NoSuchStreamError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack.struct import Header
from hyperframe.frame import GoAwayFrame

from proxy.policy.identity import PeerIdentity
from proxy.protocol.http1 import HeaderPolicy
from proxy.protocol.http2_events import (
    ATTACKS,
    DEFAULT_WINDOW,
    STREAM_ERRORS,
    AttackContained,
    Http2Event,
    Http2Settings,
    Http2Step,
    PeerGoAway,
    ProtocolViolation,
    StreamClosed,
    StreamError,
    StreamOpened,
)
from proxy.protocol.http2_frames import Budget, Budgets, FrameGate, GoAway, Violation
from proxy.protocol.http2_to_http1 import (
    BadResponse,
    Data,
    Ended,
    Http1Exchange,
    Informational,
    Refused,
    Response,
    ResponseEvent,
)

__all__ = [
    "ATTACKS",
    "BACKEND_HTTP_VERSIONS",
    "CONNECTION_SPECIFIC",
    "STREAM_ERRORS",
    "AttackContained",
    "Http2Event",
    "Http2Relay",
    "Http2Settings",
    "Http2Step",
    "PeerGoAway",
    "ProtocolViolation",
    "StreamClosed",
    "StreamError",
    "StreamOpened",
]

BACKEND_HTTP_VERSIONS = ("1.1", "2")  # backend.http_version

# Fields that are about one connection and mean nothing on another hop (RFC 9113 section 8.2.2).
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings"}
)

# HEADERS frames may carry padding (up to 256 bytes) and a priority block (5 bytes) besides the encoded fields.
_HEADER_FRAME_OVERHEAD = 512

# The proxy's own answers: status -> (reason, gRPC status, grpc-message unless the answer brings its own).
_ANSWERS = {
    400: (b"Bad Request", b"13", b"malformed request"),  # 13 INTERNAL, as gRPC maps a 400
    405: (b"Method Not Allowed", b"12", b"method not allowed by the proxy"),  # 12 UNIMPLEMENTED
    501: (b"Not Implemented", b"12", b"not implemented"),  # 12 UNIMPLEMENTED
    502: (b"Bad Gateway", b"14", b"backend unavailable"),  # 14 UNAVAILABLE
    504: (b"Gateway Timeout", b"4", b"backend connect timed out"),  # 4 DEADLINE_EXCEEDED
}

# ---- streams ---------------------------------------------------------------------------------------------------


class _Pending:
    """DATA waiting for a window: chunks as they arrived, taken from the front in pieces."""

    __slots__ = ("_chunks", "_offset", "size")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of the first chunk already taken
        self.size = 0

    def push(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def take(self, limit: int) -> bytes:
        first = self._chunks[0]
        end = min(len(first), self._offset + limit)
        piece = first[self._offset : end] if self._offset or end < len(first) else first
        if end == len(first):
            self._chunks.popleft()
            self._offset = 0
        else:
            self._offset = end
        self.size -= len(piece)
        return piece

    def clear(self) -> int:
        dropped = self.size
        self._chunks.clear()
        self._offset = self.size = 0
        return dropped


# Where a stream stands on the backend connection.
_WAITING = "waiting"  # queued for a backend stream (backend not connected yet, or its concurrency limit)
_OPEN = "open"  # a backend stream carries it
_DONE = "done"  # the backend stream ended (both directions, or reset)
_NONE = "none"  # never had one: answered by the proxy or refused


class _Stream:
    __slots__ = (
        "backend",
        "backend_open",
        "bytes_down",
        "bytes_up",
        "down",
        "down_trailers",
        "exchange",
        "grpc",
        "grpc_status",
        "head",
        "id",
        "own_answer",
        "reading",
        "req_in_done",
        "req_out_done",
        "request_headers",
        "reset",
        "reset_by",
        "reset_when_sent",
        "resp_in_done",
        "resp_out_done",
        "resp_started",
        "status",
        "up",
        "up_trailers",
        "writing",
    )

    def __init__(self, stream_id: int, *, grpc: bool, head: bool) -> None:
        self.id = stream_id
        self.grpc = grpc
        self.head = head  # a HEAD request: the proxy's own answers have no body
        self.backend = _NONE
        self.request_headers: list[Header] = []  # for the backend, until its stream opens
        # client -> backend
        self.up = _Pending()
        self.up_trailers: list[Header] | None = None
        self.req_in_done = False  # the client's END_STREAM arrived (or the stream is reset)
        self.req_out_done = False  # END_STREAM went to the backend
        # backend -> client
        self.down = _Pending()
        self.down_trailers: list[Header] | None = None
        self.resp_started = False  # a final response head went to the client
        self.resp_in_done = False  # the response is complete (from the backend or the proxy)
        self.resp_out_done = False  # END_STREAM or RST_STREAM went to the client
        self.own_answer = False  # the response is the proxy's: nothing to acknowledge to the backend
        self.reset_when_sent = False  # once the response is out, RST_STREAM(NO_ERROR) if the request is not done
        self.status: int | None = None
        self.grpc_status: str | None = None
        self.reset: int | None = None
        self.reset_by: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        # With an HTTP/1.1 backend: the translation, and the driver's read and write in flight on the stream's
        # backend connection (`writing`: the client's DATA bytes in that write, acknowledged once it is done).
        self.exchange: Http1Exchange | None = None
        self.backend_open = False  # the driver holds a connection for it: opened, not closed yet
        self.reading = False
        self.writing: int | None = None

    @property
    def finished(self) -> bool:
        return self.req_in_done and self.resp_out_done and self.backend in (_DONE, _NONE)


# ---- the relay -------------------------------------------------------------------------------------------------


class Http2Relay:
    """One HTTP/2 client connection and its backend: one h2c connection, or an HTTP/1.1 connection per stream
    (`backend_http_version="1.1"`). See the module docstring."""

    def __init__(
        self,
        policy: HeaderPolicy,
        *,
        client_ip: str,
        identity: PeerIdentity | None,
        leaf_der: bytes | None = None,
        settings: Http2Settings | None = None,
        backend_http_version: str = "2",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backend_http_version not in BACKEND_HTTP_VERSIONS:
            raise ValueError(f'backend_http_version must be "1.1" or "2", not {backend_http_version!r}')
        self.settings = settings = settings or Http2Settings()
        self.backend_http_version = backend_http_version
        self._http1 = backend_http_version == "1.1"
        self._policy = policy
        added = policy.added_headers(client_ip=client_ip, identity=identity, leaf_der=leaf_der)
        self._added: list[Header] = [(name.lower(), value) for name, value in added]
        self._added_http1 = added  # spelled as in HTTP/1.1 mode: the backend sees the same bytes from both
        self._client = _connection(settings, client_side=False)
        self._backend = _connection(settings, client_side=True)
        header_block = settings.max_header_list_size + _HEADER_FRAME_OVERHEAD
        floods = Budgets(
            resets=Budget(settings.max_resets_per_second, clock),
            settings=Budget(settings.max_settings_per_second, clock),
            pings=Budget(settings.max_pings_per_second, clock),
        )
        self._client_gate = FrameGate(
            server=True, max_frame_size=settings.max_frame_size, max_header_block=header_block, budgets=floods
        )
        self._backend_gate = FrameGate(
            server=False, max_frame_size=settings.max_frame_size, max_header_block=header_block, budgets=Budgets()
        )
        self._streams: dict[int, _Stream] = {}
        self._waiting: collections.deque[_Stream] = collections.deque()
        self._touched: set[int] = set()
        self._rotation = 0
        self._backend_ready = False  # connected, preface sent
        self._failure: int | None = None  # 502 or 504 once the backend is lost: the streams' answer
        self._backend_goaway: int | None = None  # the backend's last stream id after its GOAWAY
        self._goaway_sent: int | None = None  # the last stream id in our GOAWAY to the client
        self._closing = False  # close once no stream is left
        self._closed = False
        self._client_out: list[bytes] = []
        self._events: list[Http2Event] = []
        # What the driver does with the streams' HTTP/1.1 backend connections, for the next step.
        self._opens: list[int] = []
        self._writes: list[tuple[int, bytes]] = []
        self._closes: list[int] = []
        self.streams_total = 0  # streams the client opened
        self.end_reason: str | None = None  # why the connection ended or started ending, for the log

    # -- state for drivers, logs and tests --

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """DATA bytes held for a window, both directions, all streams."""
        return sum(s.up.size + s.down.size for s in self._streams.values())

    @property
    def closed(self) -> bool:
        return self._closed

    # -- entry points --

    def start(self) -> Http2Step:
        """The server preface for the client (SETTINGS, the connection window). Call once, first."""
        return self._run(lambda: _initiate(self._client, self.settings))

    def backend_connected(self) -> Http2Step:
        """The backend connection is up: its preface, then the streams that were waiting."""
        self._require_backend("2", "backend_connected")
        return self._run(self._on_backend_connected)

    def backend_failed(self, status: int = 502) -> Http2Step:
        """The backend could not be reached (502) or the connect timed out (504); see "Failures"."""
        self._require_backend("2", "backend_failed")
        reason = _failure_reason(status)
        return self._run(lambda: self._fail_backend(status, reason))

    def client_bytes(self, data: bytes | bytearray) -> Http2Step:
        """Bytes read from the client (not b"": call client_closed() at its EOF)."""
        return self._run(lambda: self._on_client_bytes(data))

    def backend_bytes(self, data: bytes | bytearray) -> Http2Step:
        """Bytes read from the backend (not b"": call backend_closed() at its EOF)."""
        self._require_backend("2", "backend_bytes")
        return self._run(lambda: self._on_backend_bytes(data))

    def client_closed(self) -> Http2Step:
        """The client's connection ended (EOF or error): every backend stream is cancelled, then close."""
        return self._run(lambda: self._abort("client_closed"))

    def backend_closed(self) -> Http2Step:
        """The backend's connection ended (EOF or error, also a failed write to it)."""
        self._require_backend("2", "backend_closed")
        return self._run(lambda: self._fail_backend(502, "backend_closed"))

    def start_drain(self) -> Http2Step:
        """GOAWAY to the client; close once the streams it covers are done (see "Drain and GOAWAY")."""
        return self._run(lambda: self._send_goaway("drained"))

    def stop(self, reason: str) -> Http2Step:
        """The driver is stopping without the relay's say (idle timeout, cancellation): every stream ends now.

        Its bytes need not be written; its events close the books on the streams still open.
        """
        return self._run(lambda: self._abort(reason))

    # -- a backend connection per stream (backend_http_version "1.1"): see "HTTP/1.1 backends" --

    def backend_stream_connected(self, stream_id: int) -> Http2Step:
        """The stream's backend connection is up: the request goes out on it."""
        self._require_backend("1.1", "backend_stream_connected")
        return self._run(lambda: self._on_stream_connected(stream_id))

    def backend_stream_failed(self, stream_id: int, status: int = 502, detail: str = "") -> Http2Step:
        """The stream's backend could not be reached (502) or the connect timed out (504): the stream's answer.

        `detail` (the connect error) goes to the StreamError event, not to the client.
        """
        self._require_backend("1.1", "backend_stream_failed")
        reason = _failure_reason(status)
        return self._run(lambda: self._on_stream_failed(stream_id, status, reason, detail))

    def backend_stream_written(self, stream_id: int) -> Http2Step:
        """The step's write on the stream's backend connection is done: its DATA is acknowledged to the client."""
        self._require_backend("1.1", "backend_stream_written")
        return self._run(lambda: self._on_stream_written(stream_id))

    def backend_stream_bytes(self, stream_id: int, data: bytes | bytearray) -> Http2Step:
        """What one read on the stream's backend connection returned (not b"": see backend_stream_closed)."""
        self._require_backend("1.1", "backend_stream_bytes")
        return self._run(lambda: self._on_stream_response(stream_id, bytes(data)))

    def backend_stream_closed(self, stream_id: int) -> Http2Step:
        """A read on the stream's backend connection found EOF or an error."""
        self._require_backend("1.1", "backend_stream_closed")
        return self._run(lambda: self._on_stream_response(stream_id, None))

    def _require_backend(self, version: str, method: str) -> None:
        if self.backend_http_version != version:
            raise RuntimeError(f"{method}() is for a relay with backend_http_version={version!r}")

    def _run(self, action: Callable[[], None]) -> Http2Step:
        if self._closed:
            return Http2Step(close=True)
        action()
        for stream_id in self._touched:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.finished:
                del self._streams[stream_id]
                self._events.append(_closed_event(stream))
        self._touched.clear()
        if self._closing and not self._streams:
            self._closed = True
        if self._closed:
            # Every stream opened gets its StreamClosed, also when the connection ends under it.
            for stream in self._streams.values():
                if stream.reset is None and not stream.finished:
                    stream.reset, stream.reset_by = int(ErrorCodes.CANCEL), "connection"
                self._close_stream_backend(stream)
                self._events.append(_closed_event(stream))
            self._streams.clear()
        reads = () if self._closed or not self._http1 else self._grant_reads()
        self._client_out.append(self._client.data_to_send())
        step = Http2Step(
            to_client=b"".join(self._client_out),
            to_backend=self._backend.data_to_send(),
            events=tuple(self._events),
            close=self._closed,
            open_backends=tuple(self._opens),
            stream_writes=tuple(self._writes),
            stream_reads=reads,
            close_backends=tuple(self._closes),
        )
        self._client_out.clear()
        self._events.clear()
        self._opens.clear()
        self._writes.clear()
        self._closes.clear()
        return step

    # -- the client's side --

    def _on_client_bytes(self, data: bytes | bytearray) -> None:
        segments, violation = self._client_gate.feed(data)
        for segment in segments:
            if isinstance(segment, GoAway):
                self._on_client_goaway(segment)
            else:
                try:
                    events = self._client.receive_data(segment)
                except DenialOfServiceError as exc:  # h2 has queued GOAWAY ENHANCE_YOUR_CALM
                    self._events.append(AttackContained("header_list_too_large", "client", str(exc)))
                    self._abort("header_list_too_large")
                except ProtocolError as exc:  # h2 has queued the GOAWAY
                    self._events.append(ProtocolViolation("client", int(exc.error_code), str(exc)))
                    self._abort("protocol_error")
                else:
                    for event in events:
                        self._on_client_event(event)
            if self._closed:
                return
        if violation is not None:
            self._client.close_connection(violation.error_code, last_stream_id=self._client.highest_inbound_stream_id)
            self._report(violation, "client")
            self._abort(violation.reason)
            return
        self._open_waiting()

    def _on_client_event(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event.stream_id, event.headers)
        elif isinstance(event, DataReceived):
            self._on_request_data(event)
        elif isinstance(event, TrailersReceived):
            stream = self._live(event.stream_id)
            if stream is not None and stream.backend in (_WAITING, _OPEN):
                if stream.exchange is not None:
                    self._refuse_request_trailers(stream, stream.exchange)
                else:
                    stream.up_trailers = self._stripped(event.headers)
        elif isinstance(event, StreamEnded):
            stream = self._live(event.stream_id)
            if stream is not None:
                stream.req_in_done = True
                self._flush_up(stream)
        elif isinstance(event, StreamReset):
            stream = self._live(event.stream_id)
            if stream is not None:
                self._client_reset(stream, int(event.error_code))
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                self._flush_down(self._live(event.stream_id))
            else:
                self._flush_down_all()
        elif isinstance(event, RemoteSettingsChanged):
            self._flush_down_all()  # SETTINGS_INITIAL_WINDOW_SIZE may have grown every stream's window
        # PING and SETTINGS were acknowledged by h2; PRIORITY is advisory and a proxy does not schedule by it.

    def _on_request(self, stream_id: int, headers: list[Header]) -> None:
        method, path, content_type = b"", b"", b""
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
        grpc = content_type.startswith(b"application/grpc")
        stream = _Stream(stream_id, grpc=grpc, head=method == b"HEAD")
        self._streams[stream_id] = stream
        self._touched.add(stream_id)
        self.streams_total += 1
        self._events.append(StreamOpened(stream_id, method.decode("latin-1"), path.decode("latin-1"), grpc))
        if self._goaway_sent is not None and stream_id > self._goaway_sent:
            self._refuse(stream)
        elif method == b"CONNECT":
            self._answer(stream, 405)  # no tunnels, as in HTTP/1.1 mode
        elif self._failure is not None:
            self._answer(stream, self._failure)
            self._send_goaway(self.end_reason or "backend_failed")
        elif self._http1:
            self._open_stream_backend(stream, headers)
        else:
            stream.request_headers = self._request_headers(headers)
            stream.backend = _WAITING
            self._waiting.append(stream)

    def _request_headers(self, headers: Iterable[Header]) -> list[Header]:
        """The request head for the backend: see "Identity" in the module docstring."""
        kept = [
            header
            for header in headers
            if header[0].startswith(b":")
            or (header[0] not in CONNECTION_SPECIFIC and not self._policy.is_stripped(header[0]))
        ]
        return kept + self._added

    def _stripped(self, headers: Iterable[Header]) -> list[Header]:
        """Trailers without the owned and connection-specific fields."""
        return [h for h in headers if h[0] not in CONNECTION_SPECIFIC and not self._policy.is_stripped(h[0])]

    def _on_request_data(self, event: DataReceived) -> None:
        stream = self._live(event.stream_id)
        size = len(event.data)
        padding = event.flow_controlled_length - size
        if stream is None or stream.backend in (_DONE, _NONE):
            self._client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)  # nobody takes it
            return
        if padding:
            self._client.acknowledge_received_data(padding, event.stream_id)
        if size:
            stream.up.push(event.data)
            stream.bytes_up += size
            self._flush_up(stream)

    def _client_reset(self, stream: _Stream, code: int) -> None:
        stream.req_in_done = stream.resp_out_done = True
        stream.reset, stream.reset_by = code, "client"
        self._drop_backend(stream)
        self._ack_client(stream, stream.up.clear())

    def _on_client_goaway(self, goaway: GoAway) -> None:
        self._events.append(PeerGoAway("client", goaway.error_code, goaway.last_stream_id))
        if goaway.error_code != ErrorCodes.NO_ERROR:
            self._abort("client_goaway")
        else:
            self._closing = True  # the client is leaving: finish what it asked for
            self.end_reason = self.end_reason or "client_goaway"

    # -- the backend's side --

    def _on_backend_connected(self) -> None:
        if self._failure is not None or self._backend_ready:
            return
        self._backend_ready = True
        _initiate(self._backend, self.settings)
        self._open_waiting()

    def _open_waiting(self) -> None:
        """Give waiting streams a backend stream, in order, as far as the backend's concurrency limit allows."""
        if not self._backend_ready or self._failure is not None or self._backend_goaway is not None:
            return
        limit = self._backend.remote_settings.max_concurrent_streams
        while self._waiting and self._backend.open_outbound_streams < limit:
            stream = self._waiting.popleft()
            end = stream.req_in_done and not stream.up.size and stream.up_trailers is None
            self._backend.send_headers(stream.id, stream.request_headers, end_stream=end)
            stream.request_headers = []
            stream.backend = _OPEN
            stream.req_out_done = end
            self._touched.add(stream.id)
            self._flush_up(stream)

    def _on_backend_bytes(self, data: bytes | bytearray) -> None:
        if self._failure is not None or not self._backend_ready:
            return  # the backend is gone for this connection (or a stray read): nothing more is taken from it
        segments, violation = self._backend_gate.feed(data)
        for segment in segments:
            if isinstance(segment, GoAway):
                self._on_backend_goaway(segment)
            else:
                try:
                    events = self._backend.receive_data(segment)
                except ProtocolError as exc:  # h2 has queued the GOAWAY
                    self._events.append(ProtocolViolation("backend", int(exc.error_code), str(exc)))
                    self._fail_backend(502, "backend_protocol_error")
                else:
                    for event in events:
                        self._on_backend_event(event)
            if self._failure is not None or self._closed:
                return
        if violation is not None:
            self._backend.close_connection(violation.error_code)
            self._report(violation, "backend")
            self._fail_backend(502, "backend_protocol_error")
            return
        self._open_waiting()

    def _on_backend_event(self, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            self._on_response(event)
        elif isinstance(event, InformationalResponseReceived):
            stream = self._live(event.stream_id)
            if stream is not None and not stream.resp_out_done:
                self._client.send_headers(stream.id, event.headers)
        elif isinstance(event, DataReceived):
            self._on_response_data(event)
        elif isinstance(event, TrailersReceived):
            stream = self._live(event.stream_id)
            if stream is not None:
                stream.down_trailers = [h for h in event.headers if h[0] not in CONNECTION_SPECIFIC]
                stream.grpc_status = _value(event.headers, b"grpc-status") or stream.grpc_status
        elif isinstance(event, StreamEnded):
            stream = self._live(event.stream_id)
            if stream is not None and not stream.resp_in_done:
                stream.resp_in_done = True
                self._backend_progress(stream)
                self._flush_down(stream)
        elif isinstance(event, StreamReset):
            stream = self._live(event.stream_id)
            if stream is not None and stream.backend == _OPEN:
                self._backend_reset(stream, int(event.error_code))
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                self._flush_up(self._live(event.stream_id))
            else:
                self._flush_up_all()
        elif isinstance(event, RemoteSettingsChanged):
            self._flush_up_all()  # its concurrency limit is read again by _open_waiting after this batch

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self._live(event.stream_id)
        if stream is None or stream.resp_out_done or stream.backend != _OPEN:
            return
        stream.status = int(_value(event.headers, b":status") or 0)
        stream.grpc_status = _value(event.headers, b"grpc-status")
        headers = [h for h in event.headers if h[0] not in CONNECTION_SPECIFIC]
        stream.resp_started = True
        if event.stream_ended is not None:
            # A head that ends the response (gRPC's trailers-only) stays one HEADERS frame for the client.
            self._client.send_headers(stream.id, headers, end_stream=True)
            stream.resp_in_done = True
            self._response_sent(stream)
            self._backend_progress(stream)
        else:
            self._client.send_headers(stream.id, headers)

    def _on_response_data(self, event: DataReceived) -> None:
        stream = self._live(event.stream_id)
        size = len(event.data)
        padding = event.flow_controlled_length - size
        if stream is None or stream.resp_out_done or stream.backend != _OPEN:
            self._backend.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if padding:
            self._backend.acknowledge_received_data(padding, event.stream_id)
        if size:
            stream.down.push(event.data)
            stream.bytes_down += size
            self._flush_down(stream)

    def _backend_reset(self, stream: _Stream, code: int) -> None:
        stream.backend = _DONE
        self._ack_client(stream, stream.up.clear())  # nothing more goes to the backend on it
        if stream.resp_in_done and code == ErrorCodes.NO_ERROR:
            # A complete response, then "stop sending" (RFC 9113 section 8.1): deliver it, then say the same.
            stream.reset_when_sent = True
            self._flush_down(stream)
            return
        self._ack_backend(stream, stream.down.clear())
        if stream.resp_out_done:
            return
        if not stream.resp_started and code != ErrorCodes.REFUSED_STREAM:
            self._answer(stream, 502)
            return
        self._reset_client(stream, code, "backend")

    def _on_backend_goaway(self, goaway: GoAway) -> None:
        self._events.append(PeerGoAway("backend", goaway.error_code, goaway.last_stream_id))
        self._backend_goaway = goaway.last_stream_id
        for stream in list(self._streams.values()):
            if stream.backend == _WAITING or (stream.backend == _OPEN and stream.id > goaway.last_stream_id):
                # The backend did not and will not process it: the client may safely send it again elsewhere.
                if stream.backend == _WAITING:
                    self._waiting.remove(stream)
                stream.backend = _DONE if stream.backend == _OPEN else _NONE
                self._ack_client(stream, stream.up.clear())
                self._refuse(stream)
        self._send_goaway("backend_goaway")

    # -- a backend connection per stream (backend_http_version "1.1") --

    def _open_stream_backend(self, stream: _Stream, headers: list[Header]) -> None:
        try:
            exchange = Http1Exchange(headers, policy=self._policy, added=self._added_http1)
        except Refused as refused:
            self._stream_failed(stream, refused.reason, str(refused), refused.status, refused.message)
            return
        stream.exchange = exchange
        stream.backend = _WAITING
        stream.backend_open = True
        self._opens.append(stream.id)

    def _on_stream_connected(self, stream_id: int) -> None:
        stream = self._live(stream_id)
        if stream is not None and stream.exchange is not None and stream.backend == _WAITING:
            stream.backend = _OPEN
            self._write_request(stream, stream.exchange)

    def _on_stream_failed(self, stream_id: int, status: int, reason: str, detail: str) -> None:
        stream = self._live(stream_id)
        if stream is not None and stream.exchange is not None and stream.backend == _WAITING:
            self._stream_failed(stream, reason, detail, status)

    def _write_request(self, stream: _Stream, exchange: Http1Exchange) -> None:
        """What the client sent so far, as HTTP/1.1, in one write; the next waits until this one is done."""
        if stream.writing is not None:
            return
        pieces: list[bytes] = []
        taken = 0
        try:
            if not exchange.head_written:
                pieces.append(exchange.request_head(complete_body=stream.up.size if stream.req_in_done else None))
            while stream.up.size:
                piece = stream.up.take(stream.up.size)
                taken += len(piece)
                pieces.append(exchange.request_data(piece))
            if stream.req_in_done:
                pieces.append(exchange.request_end())
        except Refused as refused:  # a body that does not match its content-length (h2 checks that first)
            self._ack_client(stream, taken)
            self._stream_failed(stream, refused.reason, str(refused), refused.status, refused.message)
            return
        data = b"".join(pieces)
        if data:
            stream.writing = taken
            self._writes.append((stream.id, data))
        else:
            self._ack_client(stream, taken)  # a last byte the exchange holds until END_STREAM
        if stream.req_in_done:
            stream.req_out_done = True
            self._backend_progress(stream)

    def _on_stream_written(self, stream_id: int) -> None:
        stream = self._live(stream_id)
        if stream is not None and stream.writing is not None:
            self._ack_client(stream, stream.writing)
            stream.writing = None
            self._flush_up(stream)

    def _on_stream_response(self, stream_id: int, data: bytes | None) -> None:
        """A read's result on the stream's connection: bytes, or None for EOF (or an error)."""
        stream = self._live(stream_id)
        if stream is None or stream.exchange is None or stream.backend != _OPEN:
            return  # closed already: what a read in flight brings is not wanted
        stream.reading = False
        try:
            events = stream.exchange.response_eof() if data is None else stream.exchange.response_data(data)
        except BadResponse as exc:
            self._stream_failed(stream, "bad_response", str(exc), 502)
            return
        for event in events:
            self._on_http1_event(stream, event)

    def _on_http1_event(self, stream: _Stream, event: ResponseEvent) -> None:
        if isinstance(event, Informational):
            self._client.send_headers(stream.id, event.headers)
        elif isinstance(event, Response):
            stream.status = event.status
            stream.resp_started = True
            if event.ended:
                self._response_complete(stream)
                self._client.send_headers(stream.id, event.headers, end_stream=True)
                self._response_sent(stream)
            else:
                self._client.send_headers(stream.id, event.headers)
        elif isinstance(event, Data):
            stream.down.push(event.data)
            stream.bytes_down += len(event.data)
            self._flush_down(stream)
        elif isinstance(event, Ended):
            stream.down_trailers = event.trailers or None
            self._response_complete(stream)
            self._flush_down(stream)

    def _response_complete(self, stream: _Stream) -> None:
        """The whole response has been read: its connection is done. A request still arriving goes no further:
        once the response is out the client is told to stop with RST_STREAM(NO_ERROR) (RFC 9113 section 8.1)."""
        stream.resp_in_done = True
        if not stream.req_in_done:
            stream.reset_when_sent = True
        self._ack_client(stream, stream.up.clear())
        self._close_stream_backend(stream)

    def _refuse_request_trailers(self, stream: _Stream, exchange: Http1Exchange) -> None:
        stream.req_in_done = True  # trailers end the request
        try:
            exchange.request_trailers()
        except Refused as refused:
            self._stream_failed(stream, refused.reason, str(refused), refused.status, refused.message)

    def _stream_failed(self, stream: _Stream, reason: str, detail: str, status: int, answer: str | None = None) -> None:
        """One stream fails and the connection goes on: the proxy's answer (`status`, with `answer` as its text)
        if no response head went out yet, else RST_STREAM(INTERNAL_ERROR)."""
        self._events.append(StreamError(stream.id, reason, detail))
        if stream.resp_out_done:
            self._drop_backend(stream)
        elif stream.resp_started:
            self._reset_client(stream, ErrorCodes.INTERNAL_ERROR, "proxy")
        else:
            self._answer(stream, status, answer)

    def _close_stream_backend(self, stream: _Stream) -> None:
        """Tell the driver to close the stream's connection; the DATA of a write in flight is acknowledged."""
        if not stream.backend_open:
            return
        stream.backend_open = False
        if stream.backend in (_WAITING, _OPEN):
            stream.backend = _DONE
        if stream.writing:
            self._ack_client(stream, stream.writing)
        stream.writing = None
        stream.reading = False
        self._closes.append(stream.id)
        self._touched.add(stream.id)

    def _grant_reads(self) -> tuple[tuple[int, int], ...]:
        """A read for each stream whose response the client can take now (see "HTTP/1.1 backends")."""
        grants: list[tuple[int, int]] = []
        for stream in self._streams.values():
            if stream.exchange is None or stream.backend != _OPEN or stream.reading or stream.resp_in_done:
                continue
            size = self._read_size(stream)
            if size > 0:
                stream.reading = True
                grants.append((stream.id, size))
        return tuple(grants)

    def _read_size(self, stream: _Stream) -> int:
        limit = self.settings.max_frame_size
        if not stream.resp_started:
            return limit  # a head takes no window, and the reader bounds it
        try:
            window = self._client.local_flow_control_window(stream.id)
        except (StreamClosedError, NoSuchStreamError):
            return 0
        return min(window, limit) - stream.down.size

    # -- failures, drain and the end --

    def _fail_backend(self, status: int, reason: str) -> None:
        if self._failure is not None:
            if reason == "backend_closed" and self._closing and not self._streams:
                self._closed = True
            return
        if self._closing and not self._streams:
            self._closed = True  # nothing left to answer: the backend closing is the end we were waiting for
            return
        self._failure = status
        self.end_reason = self.end_reason or reason
        self._waiting.clear()
        answered = False
        for stream in list(self._streams.values()):
            if stream.backend not in (_WAITING, _OPEN):
                continue
            stream.backend = _NONE if stream.backend == _WAITING else _DONE
            self._touched.add(stream.id)
            self._ack_client(stream, stream.up.clear())
            if stream.resp_out_done:
                continue
            answered = True
            if stream.resp_in_done:
                stream.own_answer = True  # the response is complete in our buffer: deliver it, ack nothing
            elif stream.resp_started:
                stream.down.clear()
                self._reset_client(stream, ErrorCodes.INTERNAL_ERROR, "proxy")
            else:
                self._answer(stream, status)
        if answered or self._streams:
            self._send_goaway(reason)

    def _answer(self, stream: _Stream, status: int, detail: str | None = None) -> None:
        """The proxy's own response on a stream that has no response head yet (400, 405, 501, 502, 504).

        `detail` says why in the body (and in `grpc-message`); without it the body is the status line's words.
        """
        self._drop_backend(stream)
        self._ack_client(stream, stream.up.clear())
        self._touched.add(stream.id)
        reason, grpc_status, message = _ANSWERS[status]
        if detail is not None:
            message = detail.encode("ascii", "backslashreplace")
        stream.status, stream.own_answer, stream.resp_started, stream.resp_in_done = status, True, True, True
        if not stream.req_in_done:
            stream.reset_when_sent = True  # the client need not send the rest of its request
        if stream.grpc:
            stream.grpc_status = grpc_status.decode("ascii")
            headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", grpc_status),
                (b"grpc-message", message),
            ]
            self._client.send_headers(stream.id, headers, end_stream=True)
            self._response_sent(stream)
            return
        body = b"%d %s\n" % (status, reason) if detail is None else b"%d %s: %s\n" % (status, reason, message)
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        self._client.send_headers(stream.id, headers)
        if not stream.head:
            stream.down.push(body)
        self._flush_down(stream)

    def _refuse(self, stream: _Stream) -> None:
        """RST_STREAM REFUSED_STREAM: not processed, safe to retry (RFC 9113 section 8.7)."""
        stream.status = None
        self._reset_client(stream, ErrorCodes.REFUSED_STREAM, "proxy")

    def _send_goaway(self, reason: str) -> None:
        """GOAWAY(NO_ERROR) to the client, written here: h2 would refuse every frame after it."""
        self._closing = True
        self.end_reason = self.end_reason or reason
        if self._goaway_sent is not None:
            return
        self._goaway_sent = last = self._client.highest_inbound_stream_id
        self._client_out.append(self._client.data_to_send())
        self._client_out.append(GoAwayFrame(stream_id=0, last_stream_id=last, error_code=0).serialize())

    def _abort(self, reason: str) -> None:
        """End everything now: cancel every backend stream; the caller has queued any GOAWAY."""
        self.end_reason = self.end_reason or reason
        if self._backend_ready and self._failure is None:
            for stream in self._streams.values():
                if stream.backend == _OPEN:
                    self._backend.reset_stream(stream.id, ErrorCodes.CANCEL)
        self._closed = True  # _run closes the streams' own backend connections

    def _report(self, violation: Violation, side: str) -> None:
        if violation.attack:
            self._events.append(AttackContained(violation.reason, side, violation.detail))
        else:
            self._events.append(ProtocolViolation(side, int(violation.error_code), violation.detail))

    # -- moving DATA --

    def _flush_up(self, stream: _Stream | None) -> None:
        """Client DATA to the backend as far as its windows allow, then END_STREAM or trailers."""
        if stream is None or stream.backend != _OPEN or stream.req_out_done:
            return
        if stream.exchange is not None:
            self._write_request(stream, stream.exchange)
            return
        conn = self._backend
        while stream.up.size:
            room = min(stream.up.size, conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size)
            if room <= 0:
                return
            piece = stream.up.take(room)
            conn.send_data(stream.id, piece)
            self._client.acknowledge_received_data(len(piece), stream.id)
        if stream.req_in_done:
            if stream.up_trailers is not None:
                conn.send_headers(stream.id, stream.up_trailers, end_stream=True)
            else:
                conn.end_stream(stream.id)
            stream.req_out_done = True
            self._touched.add(stream.id)
            self._backend_progress(stream)

    def _flush_down(self, stream: _Stream | None) -> None:
        """Response DATA to the client as far as its windows allow, then trailers or END_STREAM."""
        if stream is None or stream.resp_out_done:
            return
        conn = self._client
        while stream.down.size:
            room = min(stream.down.size, conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size)
            if room <= 0:
                return
            piece = stream.down.take(room)
            conn.send_data(stream.id, piece)
            self._ack_backend(stream, len(piece))
        if stream.resp_in_done:
            if stream.down_trailers is not None:
                conn.send_headers(stream.id, stream.down_trailers, end_stream=True)
            else:
                conn.end_stream(stream.id)
            self._response_sent(stream)

    def _response_sent(self, stream: _Stream) -> None:
        stream.resp_out_done = True
        self._touched.add(stream.id)
        if stream.reset_when_sent and not stream.req_in_done:
            self._send_reset(stream.id, ErrorCodes.NO_ERROR)
            stream.req_in_done = True

    def _flush_up_all(self) -> None:
        for stream in self._in_turn():
            if stream.up.size or (stream.req_in_done and not stream.req_out_done):
                self._flush_up(stream)

    def _flush_down_all(self) -> None:
        for stream in self._in_turn():
            if stream.down.size:
                self._flush_down(stream)

    def _in_turn(self) -> list[_Stream]:
        """The streams, starting one further each time: a window that opens is not always the first stream's."""
        streams = list(self._streams.values())
        if not streams:
            return streams
        self._rotation = (self._rotation + 1) % len(streams)
        return streams[self._rotation :] + streams[: self._rotation]

    # -- small helpers --

    def _live(self, stream_id: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._touched.add(stream_id)
        return stream

    def _backend_progress(self, stream: _Stream) -> None:
        if stream.backend == _OPEN and stream.req_out_done and stream.resp_in_done:
            stream.backend = _DONE
            self._close_stream_backend(stream)

    def _drop_backend(self, stream: _Stream) -> None:
        """The backend stream is no longer wanted: cancel it (or its place in the queue)."""
        if stream.exchange is not None:
            stream.down.clear()  # read from the stream's own connection: nothing to acknowledge
            self._close_stream_backend(stream)
        elif stream.backend == _OPEN:
            stream.backend = _DONE
            if self._failure is None:
                self._backend.reset_stream(stream.id, ErrorCodes.CANCEL)
                self._ack_backend(stream, stream.down.clear())
        elif stream.backend == _WAITING:
            self._waiting.remove(stream)
            stream.backend = _NONE

    def _reset_client(self, stream: _Stream, code: int, by: str) -> None:
        if not stream.resp_out_done or not stream.req_in_done:
            self._send_reset(stream.id, code)
        stream.req_in_done = stream.resp_out_done = True
        stream.reset, stream.reset_by = code, by
        self._touched.add(stream.id)
        self._drop_backend(stream)
        self._ack_client(stream, stream.up.clear())

    def _send_reset(self, stream_id: int, code: int) -> None:
        # StreamClosedError: the client's END_STREAM is already in h2's hands, in an event of this batch not handled
        # yet; the stream is over on the client's side, which is all the reset was for.
        with contextlib.suppress(StreamClosedError):
            self._client.reset_stream(stream_id, code)

    def _ack_client(self, stream: _Stream, size: int) -> None:
        if size:
            self._client.acknowledge_received_data(size, stream.id)

    def _ack_backend(self, stream: _Stream, size: int) -> None:
        # An HTTP/1.1 backend has no window: its connection is read only as the client's window takes the bytes.
        if size and self._failure is None and not stream.own_answer and stream.exchange is None:
            self._backend.acknowledge_received_data(size, stream.id)


def _connection(settings: Http2Settings, *, client_side: bool) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
    values = {
        SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
        SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
        SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
    }
    if client_side:
        values[SettingCodes.ENABLE_PUSH] = 0  # the backend may not push: a pushed response has no client stream
    else:
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = settings.max_concurrent_streams
    # Set before the preface, they hold from the first frame: a peer that never acknowledges our SETTINGS must
    # not get h2's defaults (16 MiB frames, 64 KiB header lists). h2 applies its own copies only on the ACK.
    conn.local_settings = Settings(client=client_side, initial_values=values)
    conn.max_inbound_frame_size = settings.max_frame_size
    conn.decoder.max_header_list_size = settings.max_header_list_size
    return conn


def _failure_reason(status: int) -> str:
    if status not in (502, 504):
        raise ValueError(f"a backend failure is 502 (unreachable) or 504 (connect timed out), not {status}")
    return "backend_unreachable" if status == 502 else "backend_timeout"


def _initiate(conn: H2Connection, settings: Http2Settings) -> None:
    conn.initiate_connection()
    if settings.connection_window_size > DEFAULT_WINDOW:
        conn.increment_flow_control_window(settings.connection_window_size - DEFAULT_WINDOW)


def _closed_event(stream: _Stream) -> StreamClosed:
    return StreamClosed(
        stream.id,
        stream.status,
        stream.grpc_status,
        stream.reset,
        stream.reset_by,
        stream.bytes_up,
        stream.bytes_down,
    )


def _value(headers: Iterable[Header], name: bytes) -> str | None:
    for header in headers:
        if header[0] == name:
            return header[1].decode("latin-1")
    return None
