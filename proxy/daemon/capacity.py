"""How much memory the proxy needs, whether its limits fit the box, and giving memory back after a burst.

Sizing. An idle mTLS connection costs about 48 KiB of RSS on top of a process that starts at about 57 MB
(``PER_CONNECTION_BYTES``, ``BASE_BYTES``). A listener that stops accepting at ``max_connections`` keeps the
process inside its memory limit only if ``base + max_connections * per connection`` fits under it; otherwise the
kernel kills the process first. :func:`memory_warnings` checks that against the cgroup memory limit the process
runs under (``/sys/fs/cgroup/memory.max`` in cgroup v2, ``memory/memory.limit_in_bytes`` in v1), so ``check``
and start-up can say so before the OOM killer does.

Giving memory back. Closing thousands of connections frees their memory inside the process, but glibc keeps the
freed pages of its heap mapped, so RSS stays at its peak: 514 MB a minute after 9,900 idle connections closed,
against 56 MB before they opened (bench/README.md, "Memory after a burst"). ``malloc_trim(0)`` hands the free
pages back to the kernel, after a garbage collection frees the cycles closed connections left: 101 MB ten seconds
after they closed (212 MB without the collection). What it cannot reach is CPython's own allocator, which keeps
arenas that any object still lives in; with ``PYTHONMALLOC=malloc`` (the container image's setting) every object
comes from glibc and the trim brings RSS to 66.6 MB five seconds after 9,900 connections closed. A small task
(:func:`give_memory_back`) watches the number of open connections and trims once it has fallen well below its
peak since the last trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.config.schema import Config
from proxy.daemon.fdlimit import fd_capacity_warnings
from proxy.daemon.workers import worker_count
from proxy.ops.metrics import Metrics

log = logging.getLogger("proxy.daemon.capacity")

MiB = 1024 * 1024

# RSS per idle mTLS connection held through to the backend: 46.6 KB at 5,000 connections in bench/RESULTS.md
# (bench/run.py, idle run, code ebd09c4) and 47.2 KB at 2,000 in its breakdown; rounded up to 48 KiB. A
# connection moving data holds more while it moves it (its read buffers: under 1 MiB each way, as the feature
# list in README.md says, given back when it goes quiet: proxy/tls/stream.py), so this is the floor to size for,
# and the reason for HEADROOM.
PER_CONNECTION_BYTES = 48 * 1024
# RSS of one process after start, before any connection: 56.0 MB in bench/RESULTS.md, rounded up.
BASE_BYTES = 60 * MiB
# With worker processes, the supervisor forks the workers and the admin process after loading everything, so they
# share its pages: each holds about 5 MB of its own at idle (Private_Dirty in /proc/PID/smaps_rollup, workers: 2
# and 4, measured 2026-12-04). Doubled, for the shared pages a long-running process writes to (reference counts).
EXTRA_PROCESS_BYTES = 10 * MiB
# Room kept free for connections that are moving data, page-cache charged to the cgroup, and allocator slack.
HEADROOM = 0.10

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number; anything this large is no limit.
_V1_UNLIMITED = 1 << 60


# ---- sizing: pure arithmetic ------------------------------------------------------------------------------------


def processes(workers: int) -> int:
    """Processes the proxy runs: one, or the workers plus the supervisor and the admin process."""
    return 1 if workers <= 1 else workers + 2


def base_memory(workers: int = 1) -> int:
    """Bytes the proxy holds before its first connection."""
    return BASE_BYTES + (processes(workers) - 1) * EXTRA_PROCESS_BYTES


def memory_needed(max_connections: int, workers: int = 1) -> int:
    """Bytes the proxy needs with ``max_connections`` idle connections open (all listeners, all workers)."""
    return base_memory(workers) + max_connections * PER_CONNECTION_BYTES


def max_connections_for(limit_bytes: int, workers: int = 1) -> int:
    """The most connections (all listeners, all workers) that fit in ``limit_bytes`` with HEADROOM kept free."""
    usable = limit_bytes * (1 - HEADROOM) - base_memory(workers)
    return max(0, int(usable // PER_CONNECTION_BYTES))


def total_max_connections(config: Config, workers: int) -> int:
    """Each worker has its own connection limit per listener, so the process tree can hold workers times the sum."""
    return workers * sum(listener.max_connections for listener in config.listeners)


# ---- the cgroup limit ---------------------------------------------------------------------------------------------


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of the cgroup this process runs in, in bytes; None when there is none (or no cgroup).

    In a container the cgroup namespace makes ``/sys/fs/cgroup`` the container's own cgroup, whose limit is the
    one that counts. cgroup v2 has ``memory.max`` ("max" means no limit); v1 has ``memory/memory.limit_in_bytes``.
    """
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= _V1_UNLIMITED else value
    return None


@dataclass(frozen=True)
class Fit:
    limit: int
    needed: int
    connections: int
    workers: int
    fits_connections: int


def check_fit(config: Config, limit: int | None, workers: int) -> Fit | None:
    """The sizing problem, or None when every connection the config allows fits under ``limit``."""
    if limit is None:
        return None
    connections = total_max_connections(config, workers)
    needed = memory_needed(connections, workers)
    if needed <= limit * (1 - HEADROOM):
        return None
    return Fit(limit, needed, connections, workers, max_connections_for(limit, workers))


def describe(fit: Fit, config: Config) -> str:
    per_listener = ", ".join(f"listeners[{i}].max_connections={listener.max_connections}"
                             for i, listener in enumerate(config.listeners))
    workers = f" x {fit.workers} workers" if fit.workers > 1 else ""
    return (f"max_connections does not fit the memory limit: {per_listener}{workers} = {fit.connections} "
            f"connections need about {fit.needed / MiB:.0f} MiB ({base_memory(fit.workers) // MiB} MiB at idle + "
            f"{PER_CONNECTION_BYTES // 1024} KiB per connection), but the cgroup memory limit is "
            f"{fit.limit / MiB:.0f} MiB: the kernel would kill the proxy before it stops accepting; "
            f"lower max_connections to about {fit.fits_connections} in total, or raise the limit")


def memory_warnings(config: Config, cgroup_root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Warnings for ``check`` and start-up: the listeners' connection limits against the cgroup memory limit."""
    fit = check_fit(config, cgroup_memory_limit(cgroup_root), worker_count(config))
    return [] if fit is None else [describe(fit, config)]


def capacity_warnings(config: Config, fd_limit: int | None = None) -> list[str]:
    """Where max_connections cannot fit this box: descriptors per process, memory of the cgroup.

    What start-up logs, and a reload too: a reload may raise max_connections or add listeners.
    """
    return fd_capacity_warnings(config, limit=fd_limit) + memory_warnings(config)


# ---- giving memory back -------------------------------------------------------------------------------------------

# How often the task looks at the connection count. Often enough to see the peak of a burst that lasts seconds (a
# peak it never saw cannot be fallen from); looking costs 6 µs with three listeners (a sum over their gauges).
TRIM_CHECK_INTERVAL = 1.0
# Trim when the open connections have fallen to this share of their peak since the last trim ...
TRIM_WHEN_BELOW_PEAK = 0.5
# ... and by at least this many: 200 idle connections are about 10 MB, less is not worth a system call.
TRIM_MIN_DROP = 200


@dataclass
class BurstWatch:
    """Decides when a burst of connections is over: the open count has fallen well below its recent peak."""

    peak: int = 0

    def should_trim(self, open_now: int) -> bool:
        self.peak = max(self.peak, open_now)
        dropped = self.peak - open_now
        if dropped >= TRIM_MIN_DROP and open_now <= self.peak * TRIM_WHEN_BELOW_PEAK:
            self.peak = open_now  # the next burst is measured from here
            return True
        return False


def open_connections(metrics: Metrics) -> int:
    """Client connections open in this process, over all listeners (the active_connections gauge)."""
    return int(sum(sample.value for family in metrics.active_connections.collect() for sample in family.samples))


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on a libc without it (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _load_malloc_trim()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Trimmed:
    rss_before: int
    rss_after: int
    seconds: float


def trim_now() -> Trimmed:
    """Give the C heap's free pages back to the kernel.

    Collect first: a closed connection can leave reference cycles (an exception and its traceback's frames), and
    once the burst is over nothing allocates enough to start the collector, so without this their memory, and the
    heap pages it pins, stay until the next burst.
    """
    before, started = rss_bytes(), time.perf_counter()
    gc.collect()
    if malloc_trim is not None:
        malloc_trim(0)
    return Trimmed(before, rss_bytes(), time.perf_counter() - started)


async def give_memory_back(count_open: Callable[[], int], interval: float = TRIM_CHECK_INTERVAL) -> None:
    """Run for the life of the proxy: after a burst of connections ends, hand the freed memory back to the kernel.

    malloc_trim walks the whole heap: 9-15 ms to give back the 95 MB freed by 3,000 connections (bench/README.md,
    "Memory after a burst"). ctypes lets go of the GIL during the call, so it runs in a thread and the event loop
    keeps serving meanwhile (a malloc of the loop's may wait for the heap's lock).
    """
    if malloc_trim is None:
        return
    watch = BurstWatch()
    while True:
        await trio.sleep(interval)
        if watch.should_trim(count_open()):
            done = await trio.to_thread.run_sync(trim_now)
            log.info("connections fell from their peak: RSS %.0f -> %.0f MB after malloc_trim (%.1f ms)",
                     done.rss_before / 1e6, done.rss_after / 1e6, done.seconds * 1000)
