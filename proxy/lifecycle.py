"""Signals: SIGTERM/SIGINT drain (a second one stops at once), SIGHUP reloads.

Shutdown and refresh are kept apart (as ghostunnel's signals.go does): a
reload never stops serving, and once a drain has begun reloads are ignored.
"""

from __future__ import annotations

import logging
import signal

import trio

from proxy.server import Proxy

log = logging.getLogger("proxy.lifecycle")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_until_signalled(proxy: Proxy, *, sockets=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handle_signals, proxy, signals)
            await proxy.run(sockets=sockets, task_status=task_status)
            nursery.cancel_scope.cancel()


async def _handle_signals(proxy: Proxy, signals) -> None:
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
