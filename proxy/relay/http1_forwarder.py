"""Drive the sans-IO HTTP relay (`proxy.protocol.http1`) between a client and its backend.

Two tasks, one per peer, each read a chunk and feed it to the relay. The relay
is synchronous and its outputs must reach each peer in the order it produced
them, so feeding the relay and writing what it returned happen under one lock:
a task holding it has the relay's latest output written before the other
task's next output exists. Reading happens outside the lock, so a read from
one peer never waits for the other.

Memory stays bounded the same way as in the TCP pump: a task does not read
again until what its last chunk produced has been written, and while a
pipelined request waits for the response ahead of it (``client_paused``) the
client is not read at all.

After the backend's ``101 Switching Protocols`` both tasks stop and the raw
two-way pump (`proxy.relay.tcp_forwarder`) takes over the two streams.

`HttpForwarder` holds what the two tasks share (the lock, the idle deadline,
the result, whether the pump takes over); `relay_http` builds one and runs it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from proxy.protocol.http1 import HttpRelay, Step, SwitchToRaw
from proxy.relay.tcp_forwarder import CHUNK_SIZE, IdleDeadline, PumpResult, chunk_reader, pump


@dataclass
class HttpCounters:
    requests: Callable[[int], None]
    status: Callable[[int], None]
    up: Callable[[int], None]
    down: Callable[[int], None]

    def record(self, step: Step, result: PumpResult) -> None:
        """Count one step's requests and responses, and keep the error that ends the connection, if it has one.

        The first half of applying a step, the same for this driver and for the data plane's `HttpPair`.
        """
        if step.requests:
            self.requests(step.requests)
        for status in step.statuses:
            self.status(status)
        if step.error:
            result.ended_by = step.error


def relay_http(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    relay: HttpRelay,
    *,
    idle_timeout: float,
    counters: HttpCounters,
) -> Awaitable[PumpResult]:
    """Relay HTTP between the two streams until the connection ends; after a 101, pump raw bytes.

    Not a coroutine itself: it hands back the forwarder's, so a connection's frames are not nested one deeper for
    its whole life (proxy.relay.connection's `_forward` does the same).
    """
    return HttpForwarder(client, backend, relay, idle_timeout=idle_timeout, counters=counters).run()


class HttpForwarder:
    """The two tasks of one HTTP connection and what they share. `run()` once."""

    def __init__(
        self,
        client: trio.abc.HalfCloseableStream,
        backend: trio.abc.HalfCloseableStream,
        relay: HttpRelay,
        *,
        idle_timeout: float,
        counters: HttpCounters,
    ) -> None:
        self._client = client
        self._backend = backend
        self._relay = relay
        self._idle_timeout = idle_timeout
        self._counters = counters
        self._result = PumpResult()
        self._lock = trio.Lock()
        self._wake_client = trio.Condition(self._lock)  # the backend task wakes a paused client task
        self._tasks = trio.CancelScope()  # cancelled to stop both tasks
        self._idle: IdleDeadline  # set by run(): its deadline counts from the start
        self._switched = False  # the 101 and both leftovers are written: the raw pump takes over
        # What the client task has read and not yet handed to the relay. Stopping the tasks for the pump can cancel
        # it on its way to the lock; those bytes were sent after the 101, so they go to the backend before the pump.
        self._unfed = b""

    async def run(self) -> PumpResult:
        self._idle = IdleDeadline(self._idle_timeout)
        with self._idle.scope, self._tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._client_task)
                nursery.start_soon(self._backend_task)
        result = self._result
        if self._idle.scope.cancelled_caught:
            result.ended_by = "idle_timeout"
            return result
        if self._switched:
            if self._unfed and not await self._send_unfed():
                return result
            raw = await pump(
                self._client,
                self._backend,
                idle_timeout=self._idle_timeout,
                on_up=self._counters.up,
                on_down=self._counters.down,
            )
            result.bytes_up += raw.bytes_up
            result.bytes_down += raw.bytes_down
            result.ended_by = "upgrade:" + raw.ended_by
        return result

    def _stop(self) -> None:
        self._tasks.cancel()

    async def _client_task(self) -> None:
        relay = self._relay
        while True:
            if relay.client_paused:
                async with self._lock:
                    while relay.client_paused:
                        await self._wake_client.wait()
            try:
                # bytes() of bytes is the same object: no copy (trio's stream type also allows a bytearray).
                data = bytes(await self._client.receive_some(CHUNK_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._result.ended_by = "client_error"
                self._stop()
                return
            self._idle.touch()
            self._unfed = data
            async with self._lock:
                await self._apply(self._feed_client(data))
            if not data or relay.switched:
                return  # the client finished sending (the backend task carries on), or the raw pump takes over
            del data  # not kept alive through the next read's wait

    def _feed_client(self, data: bytes) -> Step:
        """The relay's step for bytes from the client, which are then no longer unfed (the lock is held)."""
        self._unfed = b""
        return self._relay.from_client(data)

    async def _backend_task(self) -> None:
        relay = self._relay
        read = chunk_reader(self._backend, self._client)
        while True:
            try:
                data = bytes(await read())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # the relay answers a lost backend like a closed one
            self._idle.touch()
            async with self._lock:
                await self._apply(relay.from_backend(data))
                self._wake_client.notify_all()
            if not data or relay.switched:
                return
            del data  # not kept alive through the next read's wait

    async def _apply(self, step: Step) -> None:
        """Write one step's output and act on its flags (the lock is held)."""
        counters, result = self._counters, self._result
        counters.record(step, result)
        if step.to_backend:
            if not await _send(self._backend, step.to_backend):
                # The backend is gone mid-request: the client gets a 502 if
                # it has no response head yet, then the connection ends.
                await self._apply(self._relay.fail(502))
                return
            result.bytes_up += len(step.to_backend)
            counters.up(len(step.to_backend))
        if step.to_client:
            if not await _send(self._client, step.to_client):
                result.ended_by = "client_error"
                self._stop()
                return
            result.bytes_down += len(step.to_client)
            counters.down(len(step.to_client))
        if step.switch is not None:
            await self._switch(step.switch)
        elif step.close:
            self._stop()

    async def _switch(self, switch: SwitchToRaw) -> None:
        """Write what each side sent past the 101, then let the raw pump take over."""
        if not (
            await _send(self._backend, switch.client_leftover) and await _send(self._client, switch.backend_leftover)
        ):
            self._result.ended_by = "peer_error"
            self._stop()
            return
        self._switched = True
        self._stop()  # bytes the client task read but could not feed yet are in _unfed

    async def _send_unfed(self) -> bool:
        """Write what the client sent right after the 101 and the client task read but never fed the relay."""
        data, self._unfed = self._unfed, b""
        if not await _send(self._backend, data):
            self._result.ended_by = "peer_error"
            return False
        self._result.bytes_up += len(data)
        self._counters.up(len(data))
        return True


async def _send(stream: trio.abc.SendStream, data: bytes) -> bool:
    """Write `data`; False if the stream is broken or closed."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
