"""HTTP/2 frame headers read on the way in, before h2 parses the frames (sans-IO; used by proxy.protocol.http2).

Why a gate in front of h2
-------------------------
h2 is a good parser but three of its habits do not suit a proxy that faces the internet:
- it parses a frame once all of it has arrived, and compares the length with SETTINGS_MAX_FRAME_SIZE only then:
  a peer that announces a 16 MiB frame makes h2 hold 16 MiB before the frame is refused;
- it keeps a header block's CONTINUATION frames until the block ends, up to 64 frames of any size, and refuses the
  64th with a PROTOCOL_ERROR (CVE-2024-27316 is exactly this shape of attack);
- its connection state machine refuses every frame, in both directions, once a GOAWAY was sent or received. RFC 9113
  section 6.8 lets the streams below a GOAWAY's last stream id run to completion, and a proxy draining for a
  restart, or behind a backend that drains, needs exactly that.

So `FrameGate` reads each 9-byte frame header as it arrives:
- a frame longer than the SETTINGS_MAX_FRAME_SIZE this side advertised is refused when its header arrives
  (FRAME_SIZE_ERROR, RFC 9113 section 4.2);
- a header block (HEADERS or PUSH_PROMISE, then CONTINUATION) is measured as it grows and refused past
  `max_header_block` bytes or `MAX_CONTINUATION_FRAMES` frames (ENHANCE_YOUR_CALM);
- RST_STREAM, SETTINGS and PING frames spend from per-second `Budget`s when the gate has them (the rapid reset of
  CVE-2023-44487, SETTINGS and PING floods; ENHANCE_YOUR_CALM);
- GOAWAY frames are taken out of the byte stream and returned parsed, so h2 never sees them; the relay applies them.
Every other byte passes to h2 unchanged and as it arrives: the gate holds at most one incomplete frame header or
one GOAWAY frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from h2.errors import ErrorCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # a client's first bytes (RFC 9113 section 3.4)
FRAME_HEADER_SIZE = 9

# A header block larger than one frame needs one CONTINUATION per frame's worth; encoders fill their frames, so
# even a block at a 1 MiB limit needs fewer than this. Empty or tiny CONTINUATION frames exist to tie up a
# server (they cost a parse each and make no progress): this bounds them below h2's own backlog of 64.
MAX_CONTINUATION_FRAMES = 32

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 9
_FLAG_ACK = 0x1  # SETTINGS and PING
_FLAG_END_HEADERS = 0x4


class Budget:
    """A token bucket: up to `per_second` events at once, refilled at `per_second` a second.

    `clock` is a monotonic clock in seconds (time.monotonic; tests pass their own).
    """

    def __init__(self, per_second: int, clock: Callable[[], float]) -> None:
        self._rate = float(per_second)
        self._tokens = float(per_second)
        self._clock = clock
        self._last = clock()

    def spend(self) -> bool:
        """Take one token; False when none is left (the caller counts it as a flood)."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class Budgets:
    """The floods counted on one side; None leaves that frame type uncounted."""

    resets: Budget | None = None
    settings: Budget | None = None
    pings: Budget | None = None


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame the gate took out of the byte stream (RFC 9113 section 6.8)."""

    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass(frozen=True, slots=True)
class Violation:
    """Why the gate stopped: the connection ends with a GOAWAY carrying `error_code`.

    `reason` is an attack name (`attack` is True) or `frame_too_large` / `bad_goaway` (protocol errors).
    """

    error_code: ErrorCodes
    reason: str
    detail: str
    attack: bool


Segment = memoryview | bytes | bytearray | GoAway


class FrameGate:
    """Checks one peer's frames on the way in; see the module docstring.

    `feed(data)` returns, in order, the pieces of `data` that go to h2 (bytes or memoryviews over `data`, valid
    until the next read) and the GOAWAY frames taken out, then the `Violation` that stopped it, if any: nothing
    after the offending frame's header is passed on, and the gate must not be fed again.
    """

    def __init__(self, *, server: bool, max_frame_size: int, max_header_block: int, budgets: Budgets) -> None:
        self._max_frame_size = max_frame_size
        self._max_header_block = max_header_block
        self._budgets = budgets
        self._pass = len(PREFACE) if server else 0  # bytes that go through unread: the preface, then payloads
        self._head = bytearray()  # a frame header still arriving
        self._goaway: bytearray | None = None  # a GOAWAY payload still arriving
        self._goaway_left = 0
        self._block_stream = 0  # the stream of an unfinished header block, or 0
        self._block_bytes = 0
        self._block_frames = 0

    def feed(self, data: bytes | bytearray) -> tuple[list[Segment], Violation | None]:
        out: list[Segment] = []
        view = memoryview(data)
        size = len(data)
        pos = 0
        run = 0  # where the bytes of `data` not yet handed out begin
        while pos < size:
            if self._pass:
                take = min(self._pass, size - pos)
                pos += take
                self._pass -= take
                continue
            if self._goaway is not None:
                take = min(self._goaway_left, size - pos)
                self._goaway += view[pos : pos + take]
                pos += take
                self._goaway_left -= take
                if not self._goaway_left:
                    out.append(_parse_goaway(self._goaway))
                    self._goaway = None
                    run = pos
                continue
            start = pos
            take = min(FRAME_HEADER_SIZE - len(self._head), size - pos)
            held = len(self._head)  # bytes of this header that came with the previous read
            self._head += view[pos : pos + take]
            pos += take
            if len(self._head) < FRAME_HEADER_SIZE:
                # Its type decides whether it passes (a GOAWAY does not): hold it until it is complete.
                if start > run:
                    out.append(view[run:start])
                run = pos
                break
            head = bytes(self._head)
            self._head.clear()
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
            violation = self._check(length, kind, flags, stream)
            if violation is not None or kind == _GOAWAY:
                if start > run:
                    out.append(view[run:start])
                if violation is not None:
                    return out, violation
                self._goaway = bytearray()
                self._goaway_left = length
                run = pos
                continue
            if held:
                out.append(head[:held])  # the start of `data` continues this header: it passes from `run` == 0
            self._pass = length
        if pos > run:
            out.append(view[run:pos] if run or pos < size else data)
        return out, None

    def _check(self, length: int, kind: int, flags: int, stream: int) -> Violation | None:
        if length > self._max_frame_size:
            return Violation(
                ErrorCodes.FRAME_SIZE_ERROR,
                "frame_too_large",
                f"a frame of type {kind} announces {length} bytes, over the {self._max_frame_size} advertised",
                attack=False,
            )
        if self._block_stream:
            if kind != _CONTINUATION or stream != self._block_stream:
                self._block_stream = 0  # h2 refuses the interleaved frame itself (PROTOCOL_ERROR)
                return None
            self._block_bytes += length
            self._block_frames += 1
            if self._block_frames > MAX_CONTINUATION_FRAMES or self._block_bytes > self._max_header_block:
                return Violation(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    "continuation_flood",
                    f"a header block of {self._block_frames} CONTINUATION frames and {self._block_bytes} bytes",
                    attack=True,
                )
            if flags & _FLAG_END_HEADERS:
                self._block_stream = 0
            return None
        if kind in (_HEADERS, _PUSH_PROMISE):
            if length > self._max_header_block:
                return Violation(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    "header_list_too_large",
                    f"a header block of {length} bytes",
                    attack=True,
                )
            if not flags & _FLAG_END_HEADERS:
                self._block_stream, self._block_bytes, self._block_frames = stream, length, 0
            return None
        if kind == _GOAWAY and (stream != 0 or length < 8):
            return Violation(ErrorCodes.PROTOCOL_ERROR, "bad_goaway", "a malformed GOAWAY frame", attack=False)
        budget, reason = None, ""
        if kind == _RST_STREAM:
            budget, reason = self._budgets.resets, "rapid_reset"
        elif kind == _SETTINGS and not flags & _FLAG_ACK:
            budget, reason = self._budgets.settings, "settings_flood"
        elif kind == _PING and not flags & _FLAG_ACK:
            budget, reason = self._budgets.pings, "ping_flood"
        if budget is not None and not budget.spend():
            return Violation(ErrorCodes.ENHANCE_YOUR_CALM, reason, f"too many frames of type {kind}", attack=True)
        return None


def _parse_goaway(payload: bytearray) -> GoAway:
    last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
    code = int.from_bytes(payload[4:8], "big")
    return GoAway(last, code, bytes(payload[8:200]))  # the debug data is for the log: a little is enough
