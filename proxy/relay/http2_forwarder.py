"""Drive the sans-IO HTTP/2 relay (`proxy.protocol.http2`) between a client and its h2c backend.

Five small tasks share one `Http2Relay`: a reader per peer, a writer per peer, and the backend's connect. A reader
feeds what it read to the relay and queues the bytes the relay returns, for each peer, on that peer's outbox; the
writers send the outboxes. The relay is synchronous and queuing happens in the same turn of the scheduler as the
call, so each peer gets its bytes in the order the relay produced them, and no lock is held across a write: a peer
that does not read never stops the other direction's control frames (WINDOW_UPDATE, SETTINGS and PING answers).

Memory: a reader does not read again while either outbox holds more than `HIGH_WATER` bytes. What the relay itself
holds is bounded by the windows it advertises (see "Flow control and memory" in proxy.protocol.http2).

The backend connection is opened while the client's first frames arrive; streams wait in the relay meanwhile. A
failed connect is `backend_failed(502)`, a timed-out one `backend_failed(504)`: the relay answers the streams on
the client's connection. When a step says close, the writers get up to `FLUSH_TIMEOUT` to send what is queued,
then everything stops; the caller closes the client's stream, this function the backend's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from proxy.net.backend import BackendError
from proxy.protocol.http2 import Http2Event, Http2Relay, Http2Step
from proxy.relay.tcp_forwarder import CHUNK_SIZE, EndedBy, IdleDeadline, PumpResult

HIGH_WATER = CHUNK_SIZE  # bytes queued for one peer before the readers wait for its writer
FLUSH_TIMEOUT = 1.0  # after the relay says close: time to write what is queued (a GOAWAY, the last answers)


class _Outbox:
    """Bytes for one peer, in order; `size` counts them until they are written."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.size = 0
        self.broken = False  # a write failed: what comes later is dropped
        self._data = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()

    def put(self, data: bytes) -> None:
        if data and not self.broken:
            self._pieces.append(data)
            self.size += len(data)
            self._data.unpark_all()

    async def take(self) -> bytes:
        while not self._pieces:
            await self._data.park()
        data = b"".join(self._pieces)
        self._pieces.clear()
        return data

    def sent(self, count: int) -> None:
        self.size -= count
        self._room.unpark_all()

    def break_(self) -> None:
        self.broken = True
        self._pieces.clear()
        self.size = 0
        self._room.unpark_all()

    async def wait_below(self, limit: int) -> None:
        while self.size > limit:
            await self._room.park()


async def relay_http2(
    client: trio.abc.Stream,
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    relay: Http2Relay,
    *,
    connect_timeout: float,
    idle_timeout: float,
    drain: trio.Event | None = None,
    on_event: Callable[[Http2Event], None] | None = None,
    on_up: Callable[[int], None] | None = None,
    on_down: Callable[[int], None] | None = None,
) -> PumpResult:
    """Serve one HTTP/2 client connection until the relay closes it, the idle timeout, or cancellation.

    `connect` opens the backend connection (BackendError with `timed_out`, OSError or a timeout count as failures);
    `drain` set means start_drain(); `on_event` gets every relay event; `on_up` / `on_down` count bytes written to
    the backend / the client. Returns the bytes each way and why it ended (the relay's `end_reason`, or
    `idle_timeout`).
    """
    result = PumpResult()
    to_client, to_backend = _Outbox(), _Outbox()
    closing = trio.Event()
    backend: trio.abc.Stream | None = None

    def apply(step: Http2Step) -> None:
        if on_event is not None:
            for event in step.events:
                on_event(event)
        to_client.put(step.to_client)
        to_backend.put(step.to_backend)
        if step.close:
            closing.set()

    async def write(stream: trio.abc.Stream, box: _Outbox, to_client_side: bool) -> None:
        count = on_down if to_client_side else on_up
        while True:
            data = await box.take()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                box.break_()
                apply(relay.client_closed() if to_client_side else relay.backend_closed())
                return
            box.sent(len(data))
            if to_client_side:
                result.bytes_down += len(data)
            else:
                result.bytes_up += len(data)
            if count is not None:
                count(len(data))

    async def read(stream: trio.abc.Stream, from_client: bool) -> None:
        while not closing.is_set():
            await to_client.wait_below(HIGH_WATER)
            await to_backend.wait_below(HIGH_WATER)
            try:
                data = await stream.receive_some(CHUNK_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            idle.touch()
            if from_client:
                apply(relay.client_bytes(data) if data else relay.client_closed())
            else:
                apply(relay.backend_bytes(data) if data else relay.backend_closed())
            if not data:
                return
            del data  # not kept alive through the next wait

    async def run_backend() -> None:
        nonlocal backend
        try:
            with trio.fail_after(connect_timeout):
                backend = await connect()
        except trio.TooSlowError:
            apply(relay.backend_failed(504))
            return
        except BackendError as exc:
            apply(relay.backend_failed(504 if exc.timed_out else 502))
            return
        except OSError:
            apply(relay.backend_failed(502))
            return
        nursery.start_soon(write, backend, to_backend, False)
        apply(relay.backend_connected())
        await read(backend, from_client=False)

    async def wait_for_drain(event: trio.Event) -> None:
        await event.wait()
        apply(relay.start_drain())

    async def finish() -> None:
        await closing.wait()
        with trio.move_on_after(FLUSH_TIMEOUT):
            await to_client.wait_below(0)
            await to_backend.wait_below(0)
        nursery.cancel_scope.cancel()

    idle = IdleDeadline(idle_timeout)
    try:
        with idle.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish)
                apply(relay.start())
                nursery.start_soon(write, client, to_client, True)
                nursery.start_soon(read, client, True)
                nursery.start_soon(run_backend)
                if drain is not None:
                    nursery.start_soon(wait_for_drain, drain)
    finally:
        if not relay.closed:  # the idle timeout or a cancellation from outside (a drain's deadline)
            apply(relay.stop(EndedBy.IDLE_TIMEOUT if idle.scope.cancelled_caught else "cancelled"))
        if backend is not None:
            with trio.move_on_after(FLUSH_TIMEOUT) as scope:
                scope.shield = True
                await backend.aclose()
    result.ended_by = EndedBy.IDLE_TIMEOUT if idle.scope.cancelled_caught else relay.end_reason or EndedBy.EOF
    return result
