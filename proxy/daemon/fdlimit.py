"""File descriptors: how many connections one process can hold, and the warning when the config asks for more.

Every proxied connection costs two descriptors, the client's socket and the backend's. A process may open
RLIMIT_NOFILE of them, less what it needs for itself: the reserve below. The accept loops share one budget of
``connection_capacity()`` connections, so at the limit they stop accepting (clients wait in the kernel's
backlog) before the process runs out, and the reserve keeps the admin endpoint answering probes and scrapes.

Pure: no sockets, no trio (the accept loops in server.py hold the budget).
"""

from __future__ import annotations

import resource

from proxy.config.schema import Config

__all__ = ["FDS_PER_CONNECTION", "RESERVED_FDS", "connection_capacity", "fd_capacity_warnings", "raise_nofile_limit"]

FDS_PER_CONNECTION = 2  # the client's socket and the backend's
# Descriptors kept out of the connections' budget: 64 for the admin endpoint (httpserver.MAX_CONNECTIONS), and
# 64 for the process itself: stdio, the listening sockets, trio's epoll and wake-up pair, a reload reading the
# certificate files, the metric files of worker mode, a backend connect that tries two addresses at once.
RESERVED_FDS = 128


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as nginx's worker_rlimit_nofile or systemd would); the new
    soft limit. Where the hard limit is unlimited, the soft one is left alone (Linux refuses it anyway)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have: the capacity and the warning are computed from the real value
    return soft


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_capacity(limit: int | None = None) -> int:
    """How many proxied connections fit in ``limit`` descriptors (the current soft limit by default); at least 1."""
    limit = soft_limit() if limit is None else limit
    return max(1, (limit - RESERVED_FDS) // FDS_PER_CONNECTION)


def fd_capacity_warnings(config: Config, limit: int | None = None) -> list[str]:
    """One warning when the listeners' max_connections add up to more than a process can hold; else none."""
    limit = soft_limit() if limit is None else limit
    wanted = sum(listener.max_connections for listener in config.listeners)
    capacity = connection_capacity(limit)
    if wanted <= capacity:
        return []
    per_listener = ", ".join(f"{listener.name} {listener.max_connections}" for listener in config.listeners)
    return [
        f"listeners[*].max_connections add up to {wanted} ({per_listener}), but the file descriptor limit "
        f"(RLIMIT_NOFILE {limit}, less {RESERVED_FDS} reserved, {FDS_PER_CONNECTION} per connection) holds "
        f"{capacity}: past that, accepting pauses for every listener; raise the limit (ulimit -n, LimitNOFILE=) "
        f"to {wanted * FDS_PER_CONNECTION + RESERVED_FDS} or lower max_connections"
    ]
