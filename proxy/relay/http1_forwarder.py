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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from proxy.protocol.http1 import HttpRelay, Step
from proxy.relay.tcp_forwarder import CHUNK_SIZE, IdleDeadline, PumpResult, chunk_reader, pump


@dataclass
class HttpCounters:
    requests: Callable[[int], None]
    status: Callable[[int], None]
    up: Callable[[int], None]
    down: Callable[[int], None]


async def relay_http(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    relay: HttpRelay,
    *,
    idle_timeout: float,
    counters: HttpCounters,
) -> PumpResult:
    result = PumpResult()
    lock = trio.Lock()
    wake_client = trio.Condition(lock)  # the backend task wakes a paused client task
    switched = False
    client_holds_data = False  # the client task has read bytes it has not fed to the relay yet

    async def send(stream: trio.abc.SendStream, data: bytes) -> bool:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def apply(step: Step) -> None:
        """Write one step's output (the lock is held)."""
        nonlocal switched
        if step.requests:
            counters.requests(step.requests)
        for status in step.statuses:
            counters.status(status)
        if step.error:
            result.ended_by = step.error
        if step.to_backend:
            if not await send(backend, step.to_backend):
                # The backend is gone mid-request: the client gets a 502 if
                # it has no response head yet, then the connection ends.
                await apply(relay.fail(502))
                return
            result.bytes_up += len(step.to_backend)
            counters.up(len(step.to_backend))
        if step.to_client:
            if not await send(client, step.to_client):
                result.ended_by = "client_error"
                nursery.cancel_scope.cancel()
                return
            result.bytes_down += len(step.to_client)
            counters.down(len(step.to_client))
        if step.switch is not None:
            sw = step.switch
            if not (await send(backend, sw.client_leftover) and await send(client, sw.backend_leftover)):
                result.ended_by = "peer_error"
                nursery.cancel_scope.cancel()
                return
            switched = True
            # The client task may already hold bytes the client sent after the
            # 101 (it read them while we wrote): cancelling it would lose them.
            # It feeds them to the relay, which passes them on raw, and stops.
            if not client_holds_data:
                nursery.cancel_scope.cancel()
        elif step.close:
            nursery.cancel_scope.cancel()

    async def from_client() -> None:
        nonlocal client_holds_data
        while True:
            if relay.client_paused:
                async with lock:
                    while relay.client_paused:
                        await wake_client.wait()
            try:
                data = await client.receive_some(CHUNK_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                result.ended_by = "client_error"
                nursery.cancel_scope.cancel()
                return
            idle.touch()
            client_holds_data = True
            try:
                async with lock:
                    await apply(relay.from_client(data))
            finally:
                client_holds_data = False
            if not data or relay.switched:
                return  # the client finished sending (the backend task carries on), or the raw pump takes over
            del data  # not kept alive through the next read's wait

    async def from_backend() -> None:
        read = chunk_reader(backend, client)
        while True:
            try:
                data = await read()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # the relay answers a lost backend like a closed one
            idle.touch()
            async with lock:
                await apply(relay.from_backend(data))
                wake_client.notify_all()
            if not data or relay.switched:
                return
            del data  # not kept alive through the next read's wait

    idle = IdleDeadline(idle_timeout)
    with idle.scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(from_client)
            nursery.start_soon(from_backend)
    if idle.scope.cancelled_caught:
        result.ended_by = "idle_timeout"
        return result
    if switched:
        raw = await pump(client, backend, idle_timeout=idle_timeout, on_up=counters.up, on_down=counters.down)
        result.bytes_up += raw.bytes_up
        result.bytes_down += raw.bytes_down
        result.ended_by = "upgrade:" + raw.ended_by
    return result
