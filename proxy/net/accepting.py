"""Accepting connections when the process may be out of resources: the proxy's listeners and the admin endpoint
share this.

``accept()`` fails with EMFILE/ENFILE/ENOMEM/ENOBUFS when the process (or the system) has no descriptor or memory
left for one more socket. The listener is fine, and the client waits in the kernel's backlog, so the answer is to
back off and retry (trio's serve_listeners does the same; the bounds below are ghostunnel's and Go's net/http's).

At the limit this happens hundreds of times a minute, so the log gets one line when an episode starts and one when
it ends, with the count of retries: no traceback (nothing is wrong with the code) and no line per retry.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TypeVar

import trio

__all__ = ["CAPACITY_ERRNOS", "CapacityEpisode", "accept_with_backoff"]

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
BACKOFF_MIN = 0.005  # seconds
BACKOFF_MAX = 1.0

S = TypeVar("S")


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
            self._started = time.monotonic()
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
                              self.name, self.retries, time.monotonic() - self._started)
        self.retries = 0
        self._delay = BACKOFF_MIN


async def accept_with_backoff(listener: trio.abc.Listener[S], episode: CapacityEpisode) -> S:
    """``listener.accept()``, retried with back-off while the process is out of resources.

    Any other error propagates (a closed listener, a bug).
    """
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            await trio.sleep(episode.failed(exc))
            continue
        episode.succeeded()
        return stream
