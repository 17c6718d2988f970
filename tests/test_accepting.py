"""proxy.net.accepting: the accept loop the listeners and the admin endpoint share, and the bind function.

Most tests drive ``accept_loop`` with a scripted listener (the small interface the loop needs: ``accept`` and
``accept_waiting``) whose connections are trio memory streams, under the autojump clock: the back-off is checked
to the millisecond without waiting for it. One test runs the loop on real loopback sockets.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import deque
from collections.abc import Callable

import pytest
import trio
import trio.testing

from proxy.net.accepting import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    ListenError,
    accept_loop,
    format_address,
    open_listeners,
)
from proxy.net.sockstream import SocketStream

LOGGER = logging.getLogger("tests.accepting")


class ScriptedListener:
    """``accept()`` raises or returns what the script says, in order; once it is spent, connections that wait
    (``waiting``) are accepted, and then ``accept()`` blocks until ``add()``.

    ``calls`` counts the ``accept()`` calls, ``accept_times`` has the clock when each one raised or returned;
    ``events`` says what happened in order: "A" for a connection from ``accept()``, "W" for one from
    ``accept_waiting()``, "H" when a handler starts (the handlers append it).
    """

    def __init__(self, *script: OSError | trio.StapledStream) -> None:
        self.script: deque[OSError | trio.StapledStream] = deque(script)
        self.waiting: deque[trio.StapledStream] = deque()
        self.calls = 0
        self.accept_times: list[float] = []
        self.events: list[str] = []
        self._more = trio.lowlevel.ParkingLot()

    def add(self, *items: OSError | trio.StapledStream) -> None:
        self.script.extend(items)
        self._more.unpark_all()

    async def accept(self) -> trio.StapledStream:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        while not (self.script or self.waiting):
            await self._more.park()
        item = self.script.popleft() if self.script else self.waiting.popleft()
        self.accept_times.append(trio.current_time())
        if isinstance(item, OSError):
            raise item
        self.events.append("A")
        return item

    def accept_waiting(self) -> trio.StapledStream | None:
        if self.script or not self.waiting:
            return None  # the next accept() has something to raise or return first
        self.events.append("W")
        return self.waiting.popleft()


def connection_pair() -> tuple[trio.StapledStream, trio.StapledStream]:
    """(client, server) ends of one connection."""
    return trio.testing.memory_stream_pair()


def failure(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Handled:
    """A handler that echoes until the client closes, and tells the test each time one starts."""

    def __init__(self, listener: ScriptedListener) -> None:
        self._listener = listener
        self.send, self.started = trio.open_memory_channel[trio.StapledStream](100)
        self.running = 0

    async def __call__(self, stream: trio.StapledStream) -> None:
        self._listener.events.append("H")
        self.running += 1
        try:
            await self.send.send(stream)
            async with stream:
                while data := await stream.receive_some():
                    await stream.send_all(data)
        finally:
            self.running -= 1


async def run_loop(nursery: trio.Nursery, listener: ScriptedListener, handler: Callable[..., object],
                   slots: tuple[trio.Semaphore, ...] = (), **options: int) -> None:
    nursery.start_soon(functools.partial(
        accept_loop, listener, handler, nursery, slots=slots or (trio.Semaphore(100),), name="listener test",
        logger=LOGGER, **options,
    ))


# ---- out of resources: back off, log one episode, recover --------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM], ids=errno.errorcode.get)
async def test_out_of_resources_backs_off_doubling_then_accepts(autojump_clock, nursery, caplog, code):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    client, server = connection_pair()
    listener = ScriptedListener(*[failure(code)] * 4, server)
    handler = Handled(listener)
    start = trio.current_time()
    await run_loop(nursery, listener, handler)

    assert await handler.started.receive() is server
    gaps = [b - a for a, b in zip([start, *listener.accept_times], listener.accept_times, strict=False)]
    assert gaps == pytest.approx([0, 0.005, 0.010, 0.020, 0.040])  # 5 ms, doubling
    await client.send_all(b"ping")
    assert await client.receive_some() == b"ping"
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER.name]
    assert messages == [
        ("ERROR", f"listener test: cannot accept: {os.strerror(code)}; backing off until resources are free"),
        ("WARNING", "listener test: accepting again after 4 retries over 0.1s"),  # 75 ms
    ]
    assert not any(r.exc_info for r in caplog.records)  # nothing is wrong with the code: no traceback


async def test_the_back_off_stops_doubling_at_one_second_and_starts_over_after_a_success(autojump_clock, nursery):
    first, second = connection_pair()[1], connection_pair()[1]
    listener = ScriptedListener(*[failure(errno.EMFILE)] * 10, first)
    handler = Handled(listener)
    await run_loop(nursery, listener, handler)
    await handler.started.receive()
    gaps = [b - a for a, b in zip(listener.accept_times, listener.accept_times[1:], strict=False)]
    assert gaps == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0])
    assert (BACKOFF_MIN, BACKOFF_MAX) == (0.005, 1.0)

    listener.add(failure(errno.EMFILE), second)
    await handler.started.receive()
    assert listener.accept_times[-1] - listener.accept_times[-2] == pytest.approx(0.005)


async def test_each_episode_is_logged_once(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    listener = ScriptedListener(failure(errno.EMFILE), failure(errno.EMFILE), connection_pair()[1])
    handler = Handled(listener)
    await run_loop(nursery, listener, handler)
    await handler.started.receive()
    listener.add(failure(errno.ENFILE), connection_pair()[1], connection_pair()[1])
    await handler.started.receive()
    await handler.started.receive()
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER.name]
    assert lines == [
        "listener test: cannot accept: Too many open files; backing off until resources are free",
        "listener test: accepting again after 2 retries over 0.0s",
        "listener test: cannot accept: Too many open files in system; backing off until resources are free",
        "listener test: accepting again after 1 retries over 0.0s",
    ]


# ---- the other errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM], ids=errno.errorcode.get)
async def test_a_connection_that_died_in_the_queue_is_skipped_at_once_and_quietly(autojump_clock, nursery, caplog,
                                                                                 code):
    caplog.set_level(logging.DEBUG)
    _, server = connection_pair()
    listener = ScriptedListener(failure(code), failure(code), server)
    handler = Handled(listener)
    start = trio.current_time()
    await run_loop(nursery, listener, handler)
    assert await handler.started.receive() is server
    assert listener.accept_times == [start] * 3  # no back-off: the listener is fine
    assert caplog.records == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF, errno.ENOTSOCK], ids=errno.errorcode.get)
async def test_an_unexpected_error_is_raised_and_gives_the_slots_back(autojump_clock, code):
    listener = ScriptedListener(failure(code))
    slots = (trio.Semaphore(3), trio.Semaphore(5))
    handled: list[object] = []

    async def handler(stream: object) -> None:
        handled.append(stream)

    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError) as raised:
            await accept_loop(listener, handler, nursery, slots=slots, name="listener test", logger=LOGGER)
    assert raised.value.errno == code
    assert [slot.value for slot in slots] == [3, 5]
    assert handled == []


async def test_a_closed_listener_ends_the_loop():
    async with trio.open_nursery() as nursery:
        listeners = await open_listeners("127.0.0.1", 0, what="test")
        slots = (trio.Semaphore(1),)

        async def close_soon() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await listeners[0].aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await accept_loop(listeners[0], trio.aclose_forcefully, nursery, slots=slots, name="t", logger=LOGGER)
    assert slots[0].value == 1


# ---- slots and batches ----------------------------------------------------------------------------------------


async def test_at_the_listeners_limit_the_loop_stops_accepting_until_a_connection_ends(autojump_clock, nursery):
    pairs = [connection_pair() for _ in range(3)]
    listener = ScriptedListener(*(server for _, server in pairs))
    handler = Handled(listener)
    slots = trio.Semaphore(2)
    await run_loop(nursery, listener, handler, (slots,))
    await handler.started.receive()
    await handler.started.receive()
    await trio.sleep(10)
    assert listener.calls == 2  # the third connection waits (in the backlog) for a slot, not in accept()
    assert (slots.value, handler.running) == (0, 2)

    await pairs[0][0].aclose()  # the first connection ends: its slot comes back
    assert await handler.started.receive() is pairs[2][1]
    for client, _ in pairs[1:]:
        await client.aclose()
    await trio.sleep(10)
    assert handler.running == 0
    assert slots.value == 1  # the loop holds one while it waits in accept() for the next connection


async def test_listeners_sharing_a_budget_never_exceed_it_together(autojump_clock, nursery):
    clients = {}

    def connections(count: int) -> list[trio.StapledStream]:
        servers = []
        for _ in range(count):
            client, server = connection_pair()
            clients[server] = client
            servers.append(server)
        return servers

    first, second = ScriptedListener(*connections(3)), ScriptedListener(*connections(3))
    handler = Handled(first)
    budget = trio.Semaphore(3)  # the process's descriptors, for both listeners
    own = trio.Semaphore(10), trio.Semaphore(10)
    await run_loop(nursery, first, handler, (own[0], budget))
    await run_loop(nursery, second, handler, (own[1], budget))
    started = [await handler.started.receive() for _ in range(3)]
    await trio.sleep(10)
    assert (handler.running, budget.value, first.calls + second.calls) == (3, 0, 3)

    await clients[started[0]].aclose()  # one ends: one more, from either listener, takes its place
    started.append(await handler.started.receive())
    await trio.sleep(10)
    assert (handler.running, budget.value, first.calls + second.calls) == (3, 0, 4)
    assert own[0].value + own[1].value == 20 - 3 - 2  # the running ones, and each loop waiting for the budget


async def test_connections_that_wait_already_are_accepted_in_batches_without_a_checkpoint(autojump_clock, nursery):
    listener = ScriptedListener()
    listener.waiting.extend(connection_pair()[1] for _ in range(10))
    handler = Handled(listener)
    await run_loop(nursery, listener, handler, batch=4)
    for _ in range(10):
        await handler.started.receive()
    # Each accept() and the accept_waiting() calls after it happen back to back: no handler starts in between.
    batches = "".join(listener.events).replace("H", " ").split()
    assert batches == ["AWWW", "AWWW", "AW"]


async def test_a_batch_stops_at_the_limit(autojump_clock, nursery):
    listener = ScriptedListener()
    listener.waiting.extend(connection_pair()[1] for _ in range(10))
    handler = Handled(listener)
    slots = (trio.Semaphore(3),)
    await run_loop(nursery, listener, handler, slots)
    for _ in range(3):
        await handler.started.receive()
    await trio.sleep(10)
    assert listener.events.count("A") + listener.events.count("W") == 3
    assert len(listener.waiting) == 7 and slots[0].value == 0


# ---- real sockets -----------------------------------------------------------------------------------------------


async def test_real_listeners_serve_clients_and_a_taken_port_is_a_listen_error():
    (listener,) = await open_listeners("127.0.0.1", 0, what="listener real")
    host, port = listener.socket.getsockname()
    slots = (trio.Semaphore(2),)

    async def echo(stream: SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(accept_loop, listener, echo, nursery, slots=slots, name="listener real",
                                             logger=LOGGER))
        clients = [await trio.open_tcp_stream(host, port) for _ in range(3)]
        for i, client in enumerate(clients[:2]):
            await client.send_all(b"hello %d" % i)
            assert await client.receive_some() == b"hello %d" % i
        # Two slots: the third client is connected (in the backlog) but not accepted until one leaves.
        await clients[2].send_all(b"third")
        with trio.move_on_after(0.2):
            await clients[2].receive_some()
            pytest.fail("served beyond the limit")
        await clients[0].aclose()
        with trio.fail_after(5):
            assert await clients[2].receive_some() == b"third"

        with pytest.raises(ListenError) as raised:
            await open_listeners("127.0.0.1", port, what="listener again")
        assert str(raised.value) == f"listener again: cannot listen on 127.0.0.1:{port}: Address already in use"
        assert isinstance(raised.value, OSError)
        for client in clients[1:]:
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_no_host_listens_on_every_interface():
    listeners = await open_listeners("", 0, what="listener any")
    try:
        hosts = {listener.socket.getsockname()[0] for listener in listeners}
        assert "0.0.0.0" in hosts and hosts <= {"0.0.0.0", "::"}
    finally:
        for listener in listeners:
            await listener.aclose()


def test_format_address_brackets_ipv6():
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 8443, 0, 0)) == "[::1]:8443"
