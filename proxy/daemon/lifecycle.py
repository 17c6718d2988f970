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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
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
    watchdog = DrainWatchdog(proxy)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, proxy, signals, watchdog)
                await proxy.run(sockets=sockets, task_status=task_status)
                nursery.cancel_scope.cancel()
        finally:
            watchdog.cancel()


class DrainWatchdog:
    """Ends the process if a drain runs past its deadline plus HARD_EXIT_GRACE."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
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
        logging.shutdown()  # flushes every handler
        os._exit(EXIT_OK)  # the drain's contract: up to drain_timeout, then exit 0


async def _handle_signals(proxy: Proxy, signals: AsyncIterator[int], watchdog: DrainWatchdog) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if proxy.draining:
                log.info("%s ignored: draining", name)
            else:
                log.info("%s: reloading certificates", name)
                proxy.reload_certificates()
        elif proxy.draining:
            log.warning("%s during drain: closing every connection now", name)
            proxy.abort()
        else:
            log.info("%s: draining (up to %.0fs); send it again to stop at once", name, proxy.drain_timeout)
            proxy.stop()
            watchdog.start()
