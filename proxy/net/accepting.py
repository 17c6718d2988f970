"""Listening and accepting: the one way the proxy binds a listening socket, and the one accept loop that the proxy's
listeners and the admin endpoint share.

Binding. ``open_listeners`` binds ``host:port`` (one socket per address the host resolves to, as
``trio.open_tcp_listeners`` does) and gives ``SocketListener`` objects; a failure is a ``ListenError`` whose message
says what could not listen, where, and why ("listener api: cannot listen on 0.0.0.0:8443: Address already in use").

Accepting. ``accept_loop`` takes a slot from each of its semaphores *before* accepting: at a limit (a listener's
``max_connections``, the process's descriptor budget, the admin endpoint's 64 connections) new clients wait in the
kernel's backlog, not in our memory. Then it accepts, starts the handler in the handler nursery, and gives the
slots back when the handler returns. An error from ``accept()`` is one of three kinds:

- the connection died between the kernel's accept queue and ``accept()`` (ECONNABORTED and the like): that
  client is gone and the listener is fine, so the loop accepts again at once, silently;
- the process (or the system) has no descriptor or memory left for one more socket (EMFILE, ENFILE, ENOMEM,
  ENOBUFS): the listener is fine too, and the client waits in the backlog, so the loop backs off and retries (5 ms,
  doubling up to 1 s: trio's serve_listeners retries the same errors; the bounds are ghostunnel's and Go's
  net/http's). At the limit this happens hundreds of times a minute, so the log gets one line when such an episode
  starts and one when it ends, with the count of retries: no traceback (nothing is wrong with the code) and no
  line per retry;
- anything else (a closed listener, a bug): raised.

A burst. After each accept the loop takes up to ``batch - 1`` more connections that wait in the backlog already,
without a checkpoint between them (``accept_waiting``). The backlog is a queue: a healthy client that connects
just after a burst of 1,500 waits until all of them are accepted. Accepting each one in its own turn of the
scheduler drained such a burst in 120-150 ms; a batch costs a few microseconds per connection (bench/burst.py).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import NoReturn, Protocol, TypeVar

import trio

from proxy.config.schema import TCPAddress
from proxy.net.sockstream import SocketListener

__all__ = [
    "ACCEPT_BATCH",
    "CAPACITY_ERRNOS",
    "DEAD_CONNECTION_ERRNOS",
    "Acceptor",
    "CapacityEpisode",
    "ListenError",
    "accept_loop",
    "format_address",
    "open_listeners",
    "take_waiting",
]

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A connection that failed in the accept queue (the list trio's SocketListener skips). Some names exist on some
# platforms only.
DEAD_CONNECTION_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
                 "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
)
BACKOFF_MIN = 0.005  # seconds
BACKOFF_MAX = 1.0
# Connections accepted back to back, without yielding to the scheduler, when they wait in the backlog already;
# starting their handlers is all that happens per connection until the next checkpoint.
ACCEPT_BATCH = 64

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


class ListenError(OSError):
    """A listening socket could not be bound; the message names what, where and why.

    An ``OSError``, as the failure underneath is, so callers that catch that keep working.
    """


def format_address(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``host:port`` of a socket address, with an IPv6 host in brackets."""
    return str(TCPAddress(sockname[0], sockname[1]))


async def open_listeners(host: str | None, port: int, *, what: str) -> list[SocketListener]:
    """Listening sockets on ``host:port``: one per address ``host`` resolves to; port 0 picks a free port.

    ``host`` None or "" (a listen address written ``:PORT``) means every interface, IPv4 and IPv6. ``what`` starts
    the ``ListenError`` message ("listener api", "admin").
    """
    try:
        bound = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        where = TCPAddress(host or "", port)
        raise ListenError(f"{what}: cannot listen on {where}: {exc.strerror or exc}") from None
    return [SocketListener.take_over(listener) for listener in bound]


class Acceptor(Protocol[S_co]):
    """What ``accept_loop`` needs of a listener; ``SocketListener`` is one."""

    async def accept(self) -> S_co:
        """The next connection, waiting for one; an ``OSError`` as the socket's ``accept()`` raises it."""
        ...

    def accept_waiting(self) -> S_co | None:
        """A connection that waits already, without a checkpoint; None when there is none or accepting fails."""
        ...


class CapacityEpisode:
    """Back-to-back capacity failures of one listener, and the back-off between them."""

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.name = name
        self._log = logger
        self.retries = 0
        self._started = 0.0
        self._delay = BACKOFF_MIN

    def failed(self, exc: OSError) -> float:
        """Count a failure; the seconds to wait before the next try (5 ms, doubling up to 1 s)."""
        if self.retries == 0:
            self._started = trio.current_time()
            self._log.error("%s: cannot accept: %s; backing off until resources are free",
                            self.name, exc.strerror or exc)
        else:
            self._delay = min(self._delay * 2, BACKOFF_MAX)
        self.retries += 1
        return self._delay

    def succeeded(self) -> None:
        """An accept worked: the episode, if there was one, is over."""
        if self.retries:
            self._log.warning("%s: accepting again after %d retries over %.1fs",
                              self.name, self.retries, trio.current_time() - self._started)
        self.retries = 0
        self._delay = BACKOFF_MIN


async def accept_loop(
    listener: Acceptor[S],
    handler: Callable[[S], Awaitable[object]],
    handler_nursery: trio.Nursery,
    *,
    slots: Sequence[trio.Semaphore],
    name: str,
    logger: logging.Logger,
    batch: int = ACCEPT_BATCH,
) -> NoReturn:
    """Accept connections from ``listener`` and run ``handler(stream)`` for each in ``handler_nursery``, for ever.

    Args:
      listener: where connections come from.
      handler: serves one connection and closes it. It must catch its own errors: one that escapes ends the
        handler nursery.
      handler_nursery: where the handlers run (it may be the nursery this loop runs in).
      slots: each connection holds one unit of every semaphore, taken in this order before it is accepted and
        given back when its handler returns.
      name: starts the log lines of a capacity episode ("listener api", "http").
      logger: where those lines go.
      batch: at most this many connections are accepted without a checkpoint.

    Raises whatever ``accept()`` raises but the errors of a dead connection or of a process out of resources
    (see the module docstring): ``ClosedResourceError`` when the listener is closed, ``Cancelled``.
    """
    episode = CapacityEpisode(name, logger)
    while True:
        await _acquire(slots)
        try:
            stream = await _accept(listener, episode)
        except BaseException:
            _release(slots)
            raise
        handler_nursery.start_soon(_handle, handler, stream, slots)
        for stream in take_waiting(listener, slots, batch - 1):
            handler_nursery.start_soon(_handle, handler, stream, slots)


def take_waiting(listener: Acceptor[S], slots: Sequence[trio.Semaphore], limit: int) -> Iterator[S]:
    """Up to ``limit`` more connections that wait in the backlog already, each holding a unit of every slot.

    It stops when a slot has no unit left, or at the first ``accept_waiting()`` that gives nothing (no connection
    waits, or accepting fails: the next ``accept()`` meets that error again, and the loop handles it).
    """
    for _ in range(limit):
        if not _all_free(slots):
            return
        stream = listener.accept_waiting()
        if stream is None:
            return
        for slot in slots:
            slot.acquire_nowait()
        yield stream


async def _accept(listener: Acceptor[S], episode: CapacityEpisode) -> S:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in DEAD_CONNECTION_ERRNOS:
                continue
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            await trio.sleep(episode.failed(exc))
            continue
        episode.succeeded()
        return stream


async def _handle(handler: Callable[[S], Awaitable[object]], stream: S, slots: Sequence[trio.Semaphore]) -> None:
    try:
        await handler(stream)
    finally:
        _release(slots)


async def _acquire(slots: Sequence[trio.Semaphore]) -> None:
    taken = 0
    try:
        for slot in slots:
            await slot.acquire()
            taken += 1
    except BaseException:
        _release(slots[:taken])
        raise


def _release(slots: Sequence[trio.Semaphore]) -> None:
    for slot in slots:
        slot.release()


def _all_free(slots: Sequence[trio.Semaphore]) -> bool:
    return all(slot.value for slot in slots)
