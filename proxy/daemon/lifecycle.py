"""Signals: SIGTERM/SIGINT drain (a second one stops at once), SIGHUP reloads.

Shutdown and refresh are kept apart (as ghostunnel's signals.go does): a
reload never stops serving, and once a drain has begun reloads are ignored.

The drain has a hard bound. Past ``drain_timeout`` the proxy cancels every
connection and closes it without a close_notify, which takes about 0.3 ms of
CPU each; on a loaded machine thousands of them can still overrun, and an
orchestrator waits for the exit (then kills the pod). So a watchdog thread,
which needs nothing from the event loop, ends the process at the deadline plus
``HARD_EXIT_GRACE``, saying how many connections were still closing (their
access-log lines are lost).

The process's last log line says that it stopped and why:
``stopped: reason=sigterm drained=12 forced=3 uptime=3605.2s``. ``drained``
counts the connections open when the drain began that finished by themselves,
``forced`` those still open at its deadline (or at a second signal), which the
proxy then closed. The command line writes the same line, with
``reason=error``, when the proxy fails to start, and the worker supervisor
writes its own once every worker is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator

import trio

from proxy.daemon.server import Bound, Proxy
from proxy.net.sockstream import SocketListener

log = logging.getLogger("proxy.daemon.lifecycle")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HARD_EXIT_GRACE = 1.5  # seconds past the drain deadline; exiting takes ~0.3 s more on a loaded machine
EXIT_OK = 0


async def run_until_signalled(
    proxy: Proxy,
    *,
    sockets: list[list[SocketListener]] | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until a stop signal has drained the proxy, then log the ``stopped:`` line.

    An error that ends the proxy (a port in use, say) propagates without that line: the caller reports it.
    """
    drain = DrainCount(proxy)
    watchdog = DrainWatchdog(proxy, drain)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, proxy, signals, watchdog, drain, nursery)
                await proxy.run(sockets=sockets, task_status=task_status)
                nursery.cancel_scope.cancel()
        finally:
            watchdog.cancel()
    drain.log_stopped()


def log_stopped(reason: str, uptime: float, *, level: int = logging.INFO, **counts: int) -> None:
    """The process's last log line: ``stopped: reason=... [name=count ...] uptime=...s``.

    The counts come in the order given, in the message and as fields of their own.
    """
    words = [f"reason={reason}", *(f"{name}={count}" for name, count in counts.items()), f"uptime={uptime:.1f}s"]
    fields: dict[str, object] = {"stop_reason": reason, **counts, "uptime_s": round(uptime, 1)}
    log.log(level, "stopped: %s", " ".join(words), extra={"fields": fields})


class DrainCount:
    """Why the proxy stopped, and how its drain went, for the ``stopped:`` line.

    The drain's own deadline is the proxy's (daemon/server.py), which it sets once its listeners are closed; this
    one is set when the stop signal arrives, a moment before. So a connection that finishes by itself in that
    moment at the end counts as forced.
    """

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._started = time.monotonic()
        # The first stop signal's name; a stop that did not come from a signal (a worker whose supervisor is
        # gone, say) keeps this one.
        self.reason = "requested"
        self.open_at_start = 0
        self.forced = 0
        self._cut = False
        self._deadline: trio.CancelScope | None = None

    def begin(self, reason: str, nursery: trio.Nursery) -> None:
        """The drain begins: count what is open, and watch for what is left at its deadline."""
        self.reason = reason
        connections = self._proxy.connections
        self.open_at_start = len(connections) if connections is not None else 0
        nursery.start_soon(self._until_deadline)

    def cut(self) -> None:
        """The proxy is about to close what is still open (the deadline passed, or a second signal came)."""
        if not self._cut:
            self._cut = True
            connections = self._proxy.connections
            self.forced = len(connections) if connections is not None else 0
        if self._deadline is not None:
            self._deadline.cancel()

    async def _until_deadline(self) -> None:
        connections = self._proxy.connections
        if connections is None:  # stopped before serving: nothing to drain
            return
        with trio.move_on_after(self._proxy.drain_timeout) as deadline:
            self._deadline = deadline
            await connections.wait_closed()
        if deadline.cancelled_caught:  # the deadline passed (or cut() came first, and counted already)
            self.cut()

    def log_stopped(self, level: int = logging.INFO) -> None:
        log_stopped(self.reason, time.monotonic() - self._started, level=level,
                    drained=max(0, self.open_at_start - self.forced), forced=self.forced)


class DrainWatchdog:
    """Ends the process if a drain runs past its deadline plus HARD_EXIT_GRACE."""

    def __init__(self, proxy: Proxy, drain: DrainCount | None = None) -> None:
        self._proxy = proxy
        self._drain = drain
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self._proxy.drain_timeout + HARD_EXIT_GRACE, self._exit)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _exit(self) -> None:
        still_open = len(self._proxy.connections or ())
        log.error("the drain overran its deadline by %.1fs; exiting with %d connection(s) still closing, "
                  "without their access-log lines", HARD_EXIT_GRACE, still_open,
                  extra={"fields": {"connections_left": still_open}})
        if self._drain is not None:
            self._drain.log_stopped(logging.WARNING)
        logging.shutdown()  # flushes every handler
        os._exit(EXIT_OK)  # the drain's contract: up to drain_timeout, then exit 0


async def _handle_signals(proxy: Proxy, signals: AsyncIterator[int], watchdog: DrainWatchdog, drain: DrainCount,
                          nursery: trio.Nursery) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if proxy.draining:
                log.info("%s ignored: draining", name)
            else:
                log.info("%s: reloading", name)
                proxy.request_reload()
        elif proxy.draining:
            log.warning("%s during drain: closing every connection now", name)
            drain.cut()
            proxy.abort()
        else:
            log.info("%s: draining (up to %.0fs); send it again to stop at once", name, proxy.drain_timeout)
            drain.begin(name.lower(), nursery)
            proxy.stop()
            watchdog.start()
