"""Worker processes: N copies of the proxy sharing the listening sockets.

Python runs one thread of Python at a time, so using more than one core
takes more than one process. The design:

- The parent loads the config, checks every file, builds the TLS contexts and
  binds the listening sockets, all *before* forking. Every worker therefore
  inherits the same sockets (the kernel spreads new connections over the
  processes blocked in accept) and the same session-ticket keys, so a ticket
  issued by one worker resumes on another.
- The parent runs no event loop and no threads (forking from either is
  unsafe). It only supervises: it restarts a worker that dies, forwards
  SIGHUP, and on SIGTERM/SIGINT forwards the drain and waits for every worker
  to finish; a second signal makes the workers stop at once.
- The admin endpoint is one more child. Metrics live in files shared by all
  processes (prometheus_client's multiprocess mode), and the admin child
  serves their aggregate.

What is lost across processes: a reload (SIGHUP or a file change) happens in
each worker independently, and each builds new ticket keys, so after a
reload a ticket resumes only on the worker that issued it. /status shows
the parent's view of the material; recent failures by reason are per worker
and not shown there (the metrics have them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from proxy.config.materials import ListenerMaterials
from proxy.config.schema import Config
from proxy.net.sockstream import SocketListener

log = logging.getLogger("proxy.daemon.workers")

# A worker that dies sooner than this after starting is restarted only after
# a pause, so a crash loop does not spin the CPU.
RESTART_MIN_LIFETIME = 1.0
RESTART_PAUSE = 1.0
POLL_INTERVAL = 0.1


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 quota."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def worker_count(config: Config) -> int:
    return usable_cpus() if config.workers == "auto" else config.workers


def bind_listeners(config: Config) -> list[list[socket.socket]]:
    """Blocking stdlib listening sockets, one list per listener, bound before forking."""
    from proxy.daemon.server import ListenError

    out: list[list[socket.socket]] = []
    try:
        for listener in config.listeners:
            addr = listener.listen
            try:
                if not addr.host and socket.has_dualstack_ipv6():  # ":8443": every interface, IPv4 and IPv6
                    sock = socket.create_server(("", addr.port), family=socket.AF_INET6, backlog=4096,
                                                dualstack_ipv6=True)
                else:
                    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
                    sock = socket.create_server((addr.host, addr.port), family=family, backlog=4096)
            except OSError as exc:
                raise ListenError(f"listener {listener.name}: cannot listen on {addr}: {exc.strerror or exc}") from None
            sock.setblocking(False)
            out.append([sock])
    except BaseException:
        for socks in out:
            for sock in socks:
                sock.close()
        raise
    return out


@dataclass
class _Child:
    role: str  # "worker" or "admin"
    index: int
    pid: int
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, config: Config, materials: tuple[ListenerMaterials, ...], *, workers: int,
                 drain_timeout: float | None = None) -> None:
        from proxy.ops import metrics as metrics_module

        self.config = config
        self.materials = materials
        self.workers = workers
        self.metrics_dir = tempfile.mkdtemp(prefix="mtls-proxy-metrics-")
        metrics_module.enable_multiprocess(self.metrics_dir)
        # Imported after the switch above so every metric is multiprocess.
        from proxy.daemon.server import Proxy

        self.proxy = Proxy(config, materials, admin=False)  # contexts and ticket keys, shared by fork
        if drain_timeout is not None:
            self.proxy.drain_timeout = drain_timeout
        self.sockets = bind_listeners(config)
        self.admin_socket = self._bind_admin()
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self._signals: list[int] = []

    def _bind_admin(self) -> socket.socket:
        from proxy.daemon.server import ListenError

        addr = self.config.admin.listen
        try:
            sock = socket.create_server((addr.host, addr.port))
        except OSError as exc:
            raise ListenError(f"admin: cannot listen on {addr}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        return sock

    # ---- the parent's loop ---------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self._signals.append(signum))
        try:
            self._spawn("admin", 0)
            for index in range(self.workers):
                self._spawn("worker", index)
            log.info("serving with %d worker processes", self.workers)
            while self.children:
                self._handle_signals()
                self._reap()
                time.sleep(POLL_INTERVAL)
            return 0
        finally:
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not self.stopping:
                    log.info("%s: forwarding to the workers", name)
                    self._send_workers(signal.SIGHUP)
                continue
            if self.stopping:
                log.warning("%s during drain: stopping every worker now", name)
            else:
                log.info("%s: draining %d workers", name, self.workers)
                self.stopping = True
                self._send_admin(signal.SIGUSR1)  # /readyz -> 503 at once
            self._send_workers(signal.SIGTERM)  # a second SIGTERM makes a worker stop at once

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            from prometheus_client import multiprocess

            # prometheus_client leaves this function unannotated; the signature it is called with:
            mark_process_dead: Callable[[int, str], None] = multiprocess.mark_process_dead
            mark_process_dead(pid, self.metrics_dir)
            if self.stopping:
                if child.role == "worker" and not self._workers_left():
                    self._send_admin(signal.SIGTERM)  # the last worker drained: the admin can go
                continue
            log.error("%s %d (pid %d) exited (%s); restarting it", child.role, child.index, pid, _describe(status))
            if time.monotonic() - child.started < RESTART_MIN_LIFETIME:
                time.sleep(RESTART_PAUSE)
            self._spawn(child.role, child.index)

    def _workers_left(self) -> bool:
        return any(c.role == "worker" for c in self.children.values())

    def _send_workers(self, sig: int) -> None:
        for pid, child in self.children.items():
            if child.role == "worker":
                _kill(pid, sig)

    def _send_admin(self, sig: int) -> None:
        for pid, child in self.children.items():
            if child.role == "admin":
                _kill(pid, sig)

    # ---- the children --------------------------------------------------------

    def _spawn(self, role: str, index: int) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = _Child(role, index, pid)
            return
        code = 1
        try:
            # A process group of its own: a Ctrl-C in the terminal reaches the
            # parent only, which turns it into one orderly drain for all.
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            if role == "worker":
                self.admin_socket.close()
                trio.run(self._worker_main)
            else:
                for socks in self.sockets:
                    for sock in socks:
                        sock.close()
                trio.run(self._admin_main)
            code = 0
        except BaseException:
            log.exception("%s %d failed", role, index)
        finally:
            logging.shutdown()
            os._exit(code)

    async def _worker_main(self) -> None:
        from proxy.daemon.lifecycle import run_until_signalled

        listeners = [[SocketListener(s) for s in socks] for socks in self.sockets]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_exit_with_parent, self.proxy.abort)
            await run_until_signalled(self.proxy, sockets=listeners)
            nursery.cancel_scope.cancel()

    async def _admin_main(self) -> None:
        from proxy.ops.admin import admin_handler
        from proxy.ops.admin_http import serve_http_on
        from proxy.ops.metrics import multiprocess_registry

        draining = False

        def ready() -> bool:
            return not draining

        handler = admin_handler(multiprocess_registry(), ready=ready, status=self.proxy.status)
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.admin_socket))
                nursery.start_soon(serve_http_on, handler, [listener])
                nursery.start_soon(_exit_with_parent, nursery.cancel_scope.cancel)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        draining = True
                    elif signum == signal.SIGTERM:
                        nursery.cancel_scope.cancel()


async def _exit_with_parent(stop: Callable[[], None]) -> None:
    """A child whose parent died (killed, say) must not serve on unsupervised."""
    parent = os.getppid()
    while os.getppid() == parent:
        await trio.sleep(1.0)
    log.error("the supervisor process is gone; stopping")
    stop()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
