"""Drive the sans-IO HTTP/2 relay (`proxy.protocol.http2`) between a client and its backend: h2c, or HTTP/1.1.

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

With an HTTP/1.1 backend (`relay.backend_http_version == "1.1"`) there is no shared backend connection: each
stream has its own, opened, written, read and closed as the relay's steps say (see `Http2Step`). A `_Link` holds
one: a task connects (same `connect`, same `connect_timeout`), then a writer does the relay's writes one at a time
and a reader does its reads, each of the size the relay granted: the relay grants a read only while the client's
window for the stream has room, so a backend whose client does not read waits in its socket buffer, not in ours.
Before each read the reader also waits for the client's outbox, as the backend reader does. A stream that is slow
or stalled holds only its own link; the others go on.
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


class _Link:
    """One stream's HTTP/1.1 backend connection in the driver: the relay's writes and reads for it, one at a time."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.scope = trio.CancelScope()  # cancelled when the relay closes the stream's connection
        self.writes, self._writes_out = trio.open_memory_channel[bytes](1)
        self.reads, self._reads_out = trio.open_memory_channel[int](1)

    async def next_write(self) -> bytes:
        return await self._writes_out.receive()

    async def next_read(self) -> int:
        return await self._reads_out.receive()


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

    `connect` opens the backend connection (BackendError with `timed_out`, OSError or a timeout count as failures),
    once per client connection for an h2c backend, once per stream for an HTTP/1.1 one;
    `drain` set means start_drain(); `on_event` gets every relay event; `on_up` / `on_down` count bytes written to
    the backend / the client. Returns the bytes each way and why it ended (the relay's `end_reason`, or
    `idle_timeout`).
    """
    result = PumpResult()
    to_client, to_backend = _Outbox(), _Outbox()
    closing = trio.Event()
    backend: trio.abc.Stream | None = None
    links: dict[int, _Link] = {}

    def apply(step: Http2Step) -> None:
        if on_event is not None:
            for event in step.events:
                on_event(event)
        to_client.put(step.to_client)
        to_backend.put(step.to_backend)
        for stream_id in step.open_backends:
            links[stream_id] = link = _Link(stream_id)
            nursery.start_soon(run_link, link)
        # The relay has at most one write and one read in flight per stream, so a channel of one never blocks.
        for stream_id, data in step.stream_writes:
            if stream_id in links:
                links[stream_id].writes.send_nowait(data)
        for stream_id, size in step.stream_reads:
            if stream_id in links:
                links[stream_id].reads.send_nowait(size)
        for stream_id in step.close_backends:
            closed = links.pop(stream_id, None)
            if closed is not None:
                closed.scope.cancel()
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
        connected = await connect_backend()
        if isinstance(connected, tuple):
            apply(relay.backend_failed(connected[0]))
            return
        backend = connected
        nursery.start_soon(write, backend, to_backend, False)
        apply(relay.backend_connected())
        await read(backend, from_client=False)

    async def connect_backend() -> trio.abc.Stream | tuple[int, str]:
        """The backend connection, or the status that says why there is none (502, or 504 for a timeout) and the
        error's text."""
        try:
            with trio.fail_after(connect_timeout):
                return await connect()
        except trio.TooSlowError:
            return 504, f"no connection within {connect_timeout}s"
        except BackendError as exc:
            return (504 if exc.timed_out else 502), str(exc)
        except OSError as exc:
            return 502, str(exc)

    async def run_link(link: _Link) -> None:
        with link.scope:
            stream = await connect_backend()
            if isinstance(stream, tuple):
                apply(relay.backend_stream_failed(link.stream_id, *stream))
                return
            try:
                apply(relay.backend_stream_connected(link.stream_id))
                async with trio.open_nursery() as pair:
                    pair.start_soon(write_link, link, stream)
                    pair.start_soon(read_link, link, stream)
            finally:
                await trio.aclose_forcefully(stream)

    async def write_link(link: _Link, stream: trio.abc.Stream) -> None:
        while True:
            data = await link.next_write()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the read that follows finds the connection broken and tells the relay
            result.bytes_up += len(data)
            if on_up is not None:
                on_up(len(data))
            apply(relay.backend_stream_written(link.stream_id))

    async def read_link(link: _Link, stream: trio.abc.Stream) -> None:
        while True:
            size = await link.next_read()
            await to_client.wait_below(HIGH_WATER)
            try:
                data = await stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            idle.touch()
            if not data:
                apply(relay.backend_stream_closed(link.stream_id))
                return
            apply(relay.backend_stream_bytes(link.stream_id, data))
            del data

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
                if relay.backend_http_version == "2":
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
