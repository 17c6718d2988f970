"""Copy bytes both ways between the client and the backend.

Each direction is one task that reads a chunk and writes it before reading
the next, so at most one chunk per direction is in memory and a slow reader
slows its writer down (backpressure) instead of growing a buffer.

Half-close: when one side ends its data (a TCP FIN, or close_notify on the
TLS side), the other side gets ``send_eof()`` and the opposite direction keeps
flowing until it ends too. A request/response protocol where the client
half-closes after its request therefore still gets the whole response.

A side that stops taking data ends only the direction that writes to it: a
backend that answers early and closes while the client is still sending
makes the next write toward it fail, but what it sent before closing is on
its way back, and the other direction delivers it, up to the backend's EOF
(or reset, or the idle timeout). Meanwhile the rest of the client's upload
is read and dropped: many clients write all of it before they read, and
left unread they would wait in that write, never reading the answer. A side
that fails as it is read breaks the whole pump: nothing more can come from
it.

Closing with our data unread, the backend reset the connection, which
throws away what it had not sent yet; so after any failure on the backend's
connection its EOF is not passed on, and the caller ends the client's side
without close_notify (``PumpResult.backend_cut``): the client must not take
what it got for the complete answer.

The idle timeout is a cancel scope whose deadline moves forward as chunks
pass in either direction (see IdleDeadline); when it expires the whole pump
ends.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from proxy.net.sockstream import SocketStream

# One read from either side. Larger reads mean fewer trips through the
# scheduler per megabyte: 256 KiB instead of 64 KiB took 13% less CPU per GB
# from backend to client, and 1 MiB no more than that while it made client to
# backend slower. At most one chunk per direction is held per connection, and
# only while data flows.
CHUNK_SIZE = 256 * 1024


class EndedBy(enum.StrEnum):
    """How a pump ended: the access log's ``ended_by``."""

    EOF = "eof"  # both directions reached their end of data
    IDLE_TIMEOUT = "idle_timeout"
    CLIENT_ERROR = "client_error"  # the client's connection failed
    BACKEND_ERROR = "backend_error"  # the backend's connection failed as it was read
    # The backend stopped taking the client's data (it answered and closed while
    # the client was still sending); what it had sent was still delivered.
    BACKEND_CLOSED_EARLY = "backend_closed_early"


@dataclass
class PumpResult:
    bytes_up: int = 0      # client -> backend
    bytes_down: int = 0    # backend -> client
    # An EndedBy from the pump; the HTTP relay (proxy.relay.http1_forwarder)
    # also reports endings of its own, such as "upgrade_refused".
    ended_by: str = EndedBy.EOF
    # The backend's connection failed, whatever ended_by says first: what
    # reached the client may be cut short, and its end must not look clean.
    backend_cut: bool = False


class IdleDeadline:
    """A cancel scope that fires after ``timeout`` seconds without activity.

    Moving a trio deadline costs a trip through the run loop's deadline
    heap; doing that for every chunk of a busy connection showed in profiles.
    So ``touch()`` moves it at most every ``granularity`` seconds, and adds
    that much grace: the scope fires between ``timeout`` and
    ``timeout + granularity`` after the last activity, never early.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.granularity = min(1.0, timeout / 10)
        now = trio.current_time()
        self.scope = trio.CancelScope(deadline=now + timeout + self.granularity)
        self._next_move = now + self.granularity

    def touch(self) -> None:
        now = trio.current_time()
        if now >= self._next_move:
            self.scope.deadline = now + self.timeout + self.granularity
            self._next_move = now + self.granularity


def chunk_reader(src: trio.abc.ReceiveStream, dst: object) -> Callable[[], Awaitable[bytes | bytearray]]:
    """``src.receive_some(CHUNK_SIZE)``, telling ``dst`` when ``src`` goes quiet.

    A TLS stream's buffers grow with a burst it sends and are given back
    when no more is coming (``TLSStream.release_buffers``); the read of the
    other side is where that shows first.
    """
    release = getattr(dst, "release_buffers", None)
    if release is not None and isinstance(src, SocketStream):
        return functools.partial(src.receive_some, CHUNK_SIZE, before_waiting=release)
    return functools.partial(src.receive_some, CHUNK_SIZE)


@dataclass
class _Direction:
    src: trio.abc.ReceiveStream
    dst: trio.abc.HalfCloseableStream
    count: Callable[[int], None]
    src_error: EndedBy  # the outcome when reading src fails: the whole pump ends
    dst_error: EndedBy  # the outcome when writing dst fails: this direction ends
    drop_when_stopped: bool = False  # after dst fails, read src to its end and drop it
    total: int = 0
    dropping: bool = False

    def __post_init__(self) -> None:
        self.read = chunk_reader(self.src, self.dst)


async def pump(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
    on_up: Callable[[int], None] = lambda n: None,
    on_down: Callable[[int], None] = lambda n: None,
) -> PumpResult:
    """Relay until both directions have ended, one side breaks, or idle timeout."""
    result = PumpResult()
    up = _Direction(client, backend, on_up, src_error=EndedBy.CLIENT_ERROR, dst_error=EndedBy.BACKEND_CLOSED_EARLY,
                    drop_when_stopped=True)
    down = _Direction(backend, client, on_down, src_error=EndedBy.BACKEND_ERROR, dst_error=EndedBy.CLIENT_ERROR)
    idle = IdleDeadline(idle_timeout)
    with idle.scope:
        async with trio.open_nursery() as nursery:
            ending = _Ending(result, up, down, nursery.cancel_scope)
            # One direction in a task of its own, the other in this one:
            # a task fewer per connection (thousands of idle connections).
            nursery.start_soon(_copy, up, idle, ending)
            await _copy(down, idle, ending)
            if up.dropping:
                nursery.cancel_scope.cancel()  # all the backend sent is delivered: the upload has nowhere to go
    if idle.scope.cancelled_caught:
        result.ended_by = EndedBy.IDLE_TIMEOUT
    result.bytes_up = up.total
    result.bytes_down = down.total
    return result


class _Ending:
    """What the two directions share: how the pump ends, and the scope that ends it."""

    def __init__(self, result: PumpResult, up: _Direction, down: _Direction, scope: trio.CancelScope) -> None:
        self.result = result
        self.up = up
        self.down = down
        self.scope = scope

    def stopped(self, outcome: EndedBy) -> None:
        """A destination takes no more: the direction that writes to it ends."""
        # The first failure names the end: a backend that closed early, then
        # reset, and the read of its reset is only the echo.
        if self.result.ended_by == EndedBy.EOF:
            self.result.ended_by = outcome
        # A write toward the backend fails only after its reset: it closed
        # with our data unread, which throws away what it had not sent yet.
        # And only one call sees the reset; the read after it finds a plain EOF.
        if outcome in (self.up.dst_error, self.down.src_error):
            self.result.backend_cut = True

    def broken(self, outcome: EndedBy) -> None:
        """A source failed as it was read: the other direction cannot finish meaningfully, the pump ends."""
        self.stopped(outcome)
        self.scope.cancel()

    def clean_eof(self, d: _Direction) -> bool:
        """Whether ``d``'s source reaching EOF is the end of its data, to pass on with ``send_eof()``.

        After the backend's reset it is not: close_notify would tell the client its data is complete.
        """
        return not (d is self.down and self.result.backend_cut)


async def _copy(d: _Direction, idle: IdleDeadline, ending: _Ending) -> None:
    """Copy until the source ends, then half-close the destination.

    If the source fails, the pump ends (``ending.broken``); if the destination does, only this direction
    (``ending.stopped``).

    (Called directly, without a wrapper coroutine: every frame of a waiting task is kept for as long as an idle
    connection lives.)
    """
    while True:
        try:
            data = await d.read()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return ending.broken(d.src_error)
        if not data:
            break
        idle.touch()
        try:
            await d.dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ending.stopped(d.dst_error)
            if d.drop_when_stopped:
                await _drop_the_rest(d, idle)
            return
        d.total += len(data)
        d.count(len(data))
        del data  # not kept alive through the next read's wait, however long
    if not ending.clean_eof(d):
        return
    try:
        await d.dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        ending.stopped(d.dst_error)


async def _drop_the_rest(d: _Direction, idle: IdleDeadline) -> None:
    """Read the source to its end (or until the pump ends) and drop what comes: the destination takes no more.

    Bytes that pass still count as activity for the idle timeout, and not as delivered.
    """
    d.dropping = True
    try:
        while await d.src.receive_some(CHUNK_SIZE):
            idle.touch()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
