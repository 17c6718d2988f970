"""The public surface of the HTTP/2 relay: its settings, the events it reports and the steps it returns.

Pure data, no h2: `proxy.protocol.http2.Http2Relay` produces them (and re-exports every name here), and the
connection, the config schema and the metrics read them.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WINDOW = 65_535  # every connection window starts here (RFC 9113 section 6.9.2)
MAX_WINDOW = 2**31 - 1

# The closed set of AttackContained.reason values.
ATTACKS = (
    "rapid_reset",  # CVE-2023-44487
    "continuation_flood",  # CVE-2024-27316
    "header_list_too_large",  # HPACK bomb or oversized headers
    "settings_flood",
    "ping_flood",
)


# ---- settings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Http2Settings:
    """What the relay advertises to both peers and the flood limits it applies to the client.

    Memory per connection is bounded by about twice `connection_window_size` (one per direction) plus what the
    driver is writing. The windows are advertised to the client and to the backend alike.
    """

    max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS to the client
    initial_window_size: int = 256 * 1024  # per stream, per direction
    connection_window_size: int = 1024 * 1024  # per direction; at least twice initial_window_size
    max_frame_size: int = 16 * 1024  # SETTINGS_MAX_FRAME_SIZE: the largest frame either peer may send us
    max_header_list_size: int = 32 * 1024  # decoded, as RFC 9113 counts it; also bounds an encoded header block
    max_resets_per_second: int = 100  # client RST_STREAM frames (rapid reset)
    max_settings_per_second: int = 10
    max_pings_per_second: int = 50

    def __post_init__(self) -> None:
        _check_range("max_concurrent_streams", self.max_concurrent_streams, 1, 10_000)
        _check_range("initial_window_size", self.initial_window_size, DEFAULT_WINDOW // 64, MAX_WINDOW // 2)
        _check_range("connection_window_size", self.connection_window_size, DEFAULT_WINDOW, MAX_WINDOW)
        _check_range("max_frame_size", self.max_frame_size, 16_384, 16_777_215)
        _check_range("max_header_list_size", self.max_header_list_size, 1024, 16 * 1024 * 1024)
        for name in ("max_resets_per_second", "max_settings_per_second", "max_pings_per_second"):
            _check_range(name, getattr(self, name), 1, 1_000_000)
        if self.connection_window_size < 2 * self.initial_window_size:
            raise ValueError(
                f"connection_window_size ({self.connection_window_size}) must be at least twice initial_window_size "
                f"({self.initial_window_size}), or one stalled stream could hold the whole connection window"
            )


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")


# ---- events and steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """A client opened a stream (a request head arrived)."""

    stream_id: int
    method: str
    path: str
    grpc: bool


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """A stream is over on both connections.

    `status`: the response's :status, the proxy's own (405, 502, 504), or None if no response head went out.
    `grpc_status`: from the response's trailers (or trailers-only head), or the proxy's own answer. `reset`: the
    RST_STREAM error code that ended it on the client's side, if one did; `reset_by`: "client", "backend",
    "proxy", or "connection" (the connection ended under it: `reset` is then CANCEL). `bytes_up` / `bytes_down`:
    DATA payload bytes received from the client / the backend on it. Every StreamOpened gets exactly one
    StreamClosed, so an active-streams gauge can follow the two.
    """

    stream_id: int
    status: int | None
    grpc_status: str | None
    reset: int | None
    reset_by: str | None
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """A peer broke HTTP/2; the connection to it ends with GOAWAY `error_code`. `side`: "client" or "backend"."""

    side: str
    error_code: int
    detail: str


@dataclass(frozen=True, slots=True)
class AttackContained:
    """A known attack (`reason`, one of ATTACKS) ended the client's connection with GOAWAY ENHANCE_YOUR_CALM."""

    reason: str
    side: str
    detail: str


@dataclass(frozen=True, slots=True)
class PeerGoAway:
    """A peer sent GOAWAY (`side`: "client" or "backend")."""

    side: str
    error_code: int
    last_stream_id: int


# The closed set of StreamError.reason values.
STREAM_ERRORS = (
    "malformed_request",  # 400: a request head HTTP/1.1 cannot carry as it is
    "connect_not_allowed",  # 405: CONNECT or extended CONNECT
    "grpc_needs_http2",  # 501 (gRPC: 12 UNIMPLEMENTED): gRPC to an HTTP/1.1 backend
    "request_trailers",  # 501: request trailers to an HTTP/1.1 backend
    "backend_unreachable",  # 502: the stream's backend connection could not be opened
    "backend_timeout",  # 504: its connect timed out
    "bad_response",  # 502, or a reset once the head went out: the HTTP/1.1 response was malformed or cut short
)


@dataclass(frozen=True, slots=True)
class StreamError:
    """With an HTTP/1.1 backend: why one stream got the proxy's answer or a reset (the connection goes on).

    `reason` is one of STREAM_ERRORS; `detail` is free text for the log.
    """

    stream_id: int
    reason: str
    detail: str


Http2Event = StreamOpened | StreamClosed | ProtocolViolation | AttackContained | PeerGoAway | StreamError


@dataclass(frozen=True, slots=True)
class Http2Step:
    """What one call produced: write `to_client` and `to_backend` (either may be empty), then close if `close`.

    With an HTTP/1.1 backend (`backend_http_version="1.1"`) there is no `to_backend`: each stream has a backend
    connection of its own, and the step says what to do with them, in this order:
    - `open_backends`: open one for each of these streams (the same connect, with the same timeout), then report
      `backend_stream_connected(id)` or `backend_stream_failed(id, 502 | 504)`;
    - `stream_writes`: write these bytes on the stream's connection, then report `backend_stream_written(id)` (a
      failed write is not reported: the read that follows fails too);
    - `stream_reads`: read once, at most this many bytes, and report `backend_stream_bytes(id, data)`, or
      `backend_stream_closed(id)` at EOF or a read error;
    - `close_backends`: close the stream's connection now, whatever is in flight on it.
    A stream has at most one write and one read in flight; every connection opened is closed by a later step (the
    step that says `close` lists every one still open), and nothing about a stream comes after its close.
    """

    to_client: bytes = b""
    to_backend: bytes = b""
    events: tuple[Http2Event, ...] = ()
    close: bool = False  # after writing this step's bytes, close both connections (and every stream's backend)
    open_backends: tuple[int, ...] = ()
    stream_writes: tuple[tuple[int, bytes], ...] = ()
    stream_reads: tuple[tuple[int, int], ...] = ()
    close_backends: tuple[int, ...] = ()
