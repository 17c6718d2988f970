"""Worker processes: N copies of the proxy sharing the listening sockets, replaced a generation at a time on reload.

Python runs one thread of Python at a time, so using more than one core
takes more than one process. The design:

- The parent loads the config, checks every file, builds the TLS contexts and
  binds the listening sockets, all *before* forking. Every worker therefore
  inherits the same sockets (the kernel spreads new connections over the
  processes blocked in accept) and the same session-ticket keys, so a ticket
  issued by one worker resumes on another.
- The parent runs no event loop and no threads (forking from either is
  unsafe). It only supervises: it restarts a worker that dies, reloads, and on
  SIGTERM/SIGINT forwards the drain and waits for every worker to finish; a
  second signal makes the workers stop at once.
- The admin endpoint is one more child. Metrics live in files shared by all
  processes (prometheus_client's multiprocess mode), and the admin child
  serves their aggregate. Each worker also writes its listeners' last backend
  connect failure to a small file there, once a second when it changed, for
  /status.

Reload (docs/architecture.md, "Reload"). The supervisor reloads, never a
worker: every worker must run one config. On SIGHUP, or when its file watch
sees the config file (or a file it names) change, the supervisor reads and
checks the file as a single process does (``read_config``, then a new Proxy,
which builds every TLS context), binds sockets for new listen addresses (and a
moved admin endpoint), and forks a new generation of workers from that state,
as nginx replaces its workers. Each new worker says on a pipe when it serves.
Once all of them do, the old generation gets SIGTERM and drains as on a stop,
each worker within its drain_timeout; the supervisor closes its own copies of
the sockets of removed listeners at once (the kernel closes them when the last
old worker has closed its copy), and a new admin child replaces the old one,
so /status speaks for the new config. Any failure before that (the config, a
port in use, a new worker that does not serve within WORKER_START_TIMEOUT)
kills what was started, closes what was bound, and leaves the old generation
serving; it is counted, logged and shown in /status (a new admin child is
forked for that too). One generation shares its new ticket keys, so tickets
issued before a reload do not resume after it, as in a single process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from proxy.config.materials import ListenerMaterials
from proxy.config.schema import Config, ConfigError, ListenerConfig, TCPAddress
from proxy.daemon.watch import OutOfResources, changed, snapshot, watched_paths
from proxy.net.sockstream import SocketListener
from proxy.ops.metrics import BackendFailure

if TYPE_CHECKING:
    from proxy.daemon.server import Bound, Candidate, Proxy, ReloadRefused

log = logging.getLogger("proxy.daemon.workers")

# A worker that dies sooner than this after starting is restarted only after
# a pause, so a crash loop does not spin the CPU.
RESTART_MIN_LIFETIME = 1.0
RESTART_PAUSE = 1.0
POLL_INTERVAL = 0.1
# How long a reload's new workers may take to serve. Forked from a supervisor that has loaded and built everything,
# one serves in tens of milliseconds; one that has not within this is stuck, and the reload fails.
WORKER_START_TIMEOUT = 30.0
# How often a worker looks whether its listeners' last backend failures changed (and then writes them).
FAILURES_INTERVAL = 1.0
_FAILURES_GLOB = "backend-failures-*.json"


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


def bind_listener(listener: ListenerConfig) -> list[socket.socket]:
    """A blocking stdlib listening socket for one listener, bound before forking."""
    from proxy.daemon.server import ListenError

    addr = listener.listen
    try:
        if not addr.host and socket.has_dualstack_ipv6():  # ":8443": every interface, IPv4 and IPv6
            sock = socket.create_server(("", addr.port), family=socket.AF_INET6, backlog=4096, dualstack_ipv6=True)
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.create_server((addr.host, addr.port), family=family, backlog=4096)
    except OSError as exc:
        raise ListenError(f"listener {listener.name}: cannot listen on {addr}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return [sock]


def bind_listeners(config: Config) -> list[list[socket.socket]]:
    """Blocking stdlib listening sockets, one list per listener, bound before forking."""
    out: list[list[socket.socket]] = []
    try:
        for listener in config.listeners:
            out.append(bind_listener(listener))
    except BaseException:
        _close(itertools.chain.from_iterable(out))
        raise
    return out


def bind_admin(address: TCPAddress) -> socket.socket:
    from proxy.daemon.server import ListenError

    try:
        sock = socket.create_server((address.host, address.port))
    except OSError as exc:
        raise ListenError(f"admin: cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass
class _Generation:
    """What one generation of workers is forked with: the proxy (config, contexts, ticket keys) and its sockets."""

    number: int
    proxy: Proxy
    sockets: list[list[socket.socket]]  # one list per listener of proxy.config
    admin_socket: socket.socket

    def owns(self) -> set[socket.socket]:
        return {*itertools.chain.from_iterable(self.sockets), self.admin_socket}


@dataclass
class _Pending:
    """A reload's new generation, forked and not yet serving."""

    generation: _Generation
    workers: int
    candidate: Candidate
    bound: list[socket.socket]  # bound for it: closed again if it fails
    changes: str
    deadline: float
    failed: str | None = None


@dataclass
class _Child:
    role: str  # "worker" or "admin"
    index: int
    pid: int
    generation: int
    started: float = field(default_factory=time.monotonic)
    ready_fd: int | None = None  # the pipe on which it says it serves
    ready: bool = False
    retiring: bool = False  # told to drain and exit: not restarted


class Supervisor:
    def __init__(self, config: Config, materials: tuple[ListenerMaterials, ...], *, workers: int,
                 drain_timeout: float | None = None, config_path: Path | str | None = None) -> None:
        from proxy.ops import metrics as metrics_module

        self.pid = os.getpid()
        self.config_path = None if config_path is None else Path(config_path).absolute()
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.metrics_dir = tempfile.mkdtemp(prefix="mtls-proxy-metrics-")
        metrics_module.enable_multiprocess(self.metrics_dir)
        # Imported after the switch above so every metric is multiprocess.
        from proxy.daemon.server import Proxy

        # Contexts and ticket keys, shared by fork. Without a config file to re-read (a caller that loaded the
        # config itself) the supervisor cannot reload: it passes SIGHUP on, and each worker re-reads its files.
        proxy = Proxy(config, materials, admin=False, config_path=self.config_path,
                      supervisor=self.pid if self.config_path is not None else None)
        proxy.signal_pid = self.pid
        if drain_timeout is not None:
            proxy.drain_timeout = drain_timeout
        sockets = bind_listeners(config)
        try:
            admin_socket = bind_admin(config.admin.listen)
        except BaseException:
            _close(itertools.chain.from_iterable(sockets))
            raise
        self._numbers = itertools.count(1)
        self.current = _Generation(next(self._numbers), proxy, sockets, admin_socket)
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self._signals: list[int] = []
        self._pending: _Pending | None = None
        self._reload_again = False
        self._watched = watched_paths(config, self.config_path)
        self._files_seen = snapshot(self._watched)
        self._next_check = time.monotonic() + config.reload.watch_interval
        self._short_of_resources = False

    @property
    def proxy(self) -> Proxy:
        """The current generation's proxy."""
        return self.current.proxy

    # ---- the parent's loop ---------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self._signals.append(signum))
        try:
            self._spawn("admin", 0, self.current)
            for index in range(self.workers):
                self._spawn("worker", index, self.current)
            log.info("serving with %d worker processes", self.workers)
            while self.children:
                self._handle_signals()
                self._watch()
                self._check_ready()
                self._reap()
                self._check_pending()
                time.sleep(POLL_INTERVAL)
            return 0
        finally:
            for pid, child in list(self.children.items()):
                _kill(pid, signal.SIGKILL)
                if child.ready_fd is not None:
                    os.close(child.ready_fd)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self.stopping:
                    log.info("%s ignored: draining", name)
                elif self.config_path is None:
                    log.info("%s: forwarding to the workers", name)
                    self._send_workers(signal.SIGHUP)
                else:
                    log.info("%s: reloading %s", name, self.config_path)
                    self._reload()
                continue
            if self.stopping:
                log.warning("%s during drain: stopping every worker now", name)
                self._send_workers(signal.SIGTERM, retiring_too=True)  # a second SIGTERM: stop at once
            else:
                log.info("%s: draining %d workers", name, self.workers)
                self.stopping = True
                if self._pending is not None:  # its workers drain with the others (they have nothing to drain)
                    _close(self._pending.bound)
                    self._pending = None
                self._send_admins(signal.SIGUSR1)  # /readyz -> 503 at once
                self._send_workers(signal.SIGTERM)  # those retiring since a reload drain already

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
            if child.ready_fd is not None:
                os.close(child.ready_fd)
            self._forget_process(pid)
            if self.stopping:
                if child.role == "worker" and not self._workers_left():
                    self._send_admins(signal.SIGTERM)  # the last worker drained: the admin can go
                continue
            pending = self._pending
            if pending is not None and child.generation == pending.generation.number:
                pending.failed = pending.failed or (
                    f"{child.role} {child.index} of the new configuration (pid {pid}) exited "
                    f"({_describe(status)}) before it was serving")
                continue
            if child.retiring or child.generation != self.current.number:
                log.info("%s %d of generation %d (pid %d) has finished (%s)", child.role, child.index,
                         child.generation, pid, _describe(status))
                continue
            log.error("%s %d (pid %d) exited (%s); restarting it", child.role, child.index, pid, _describe(status))
            if time.monotonic() - child.started < RESTART_MIN_LIFETIME:
                time.sleep(RESTART_PAUSE)
            self._spawn(child.role, child.index, self.current)

    def _forget_process(self, pid: int) -> None:
        """A child is gone: what its files in the metrics folder said about the present goes with it."""
        from prometheus_client import multiprocess

        # prometheus_client leaves this function unannotated; the signature it is called with:
        mark_process_dead: Callable[[int, str], None] = multiprocess.mark_process_dead
        mark_process_dead(pid, self.metrics_dir)
        # Its other gauges (certificate expiry, CRL next update) describe what it had loaded: a retired generation's
        # would linger as series of certificates or listeners that are gone. The live processes have their own.
        for path in Path(self.metrics_dir).glob(f"gauge_*_{pid}.db"):
            with contextlib.suppress(OSError):
                path.unlink()
        _retire_failures(Path(self.metrics_dir), pid)

    def _workers_left(self) -> bool:
        return any(c.role == "worker" for c in self.children.values())

    def _send_workers(self, sig: int, *, retiring_too: bool = False) -> None:
        for pid, child in self.children.items():
            if child.role == "worker" and (retiring_too or not child.retiring):
                _kill(pid, sig)

    def _send_admins(self, sig: int) -> None:
        for pid, child in self.children.items():
            if child.role == "admin":
                _kill(pid, sig)

    def _check_ready(self) -> None:
        for child in self.children.values():
            if child.ready_fd is None:
                continue
            try:
                said = os.read(child.ready_fd, 1)
            except BlockingIOError:
                continue
            os.close(child.ready_fd)
            child.ready_fd = None
            child.ready = bool(said)  # b"": it exited (or closed the pipe) without saying so

    # ---- reload ---------------------------------------------------------------

    def _watch(self) -> None:
        """The file watch of a single process (Proxy._watch_files), in the supervisor's loop."""
        interval = self.current.proxy.config.reload.watch_interval
        now = time.monotonic()
        if self.config_path is None or interval <= 0 or now < self._next_check:
            return
        self._next_check = now + interval
        if self.stopping or self._pending is not None:
            return
        try:
            current = snapshot(self._watched)
        except OutOfResources as exc:
            if not self._short_of_resources:
                log.warning("cannot check the watched files: %s; trying again every %gs", exc, interval)
            self._short_of_resources = True
            return
        self._short_of_resources = False
        if current != self._files_seen:
            log.info("files changed: %s; reloading", ", ".join(changed(self._files_seen, current)))
            self._reload()

    def _reload(self) -> None:
        """Read and check the config file, bind what it adds, and fork a new generation on it (see the module
        docstring); ``_check_pending`` swaps it in once it serves."""
        from proxy.daemon.server import (
            ListenError,
            Proxy,
            ReloadRefused,
            describe_changes,
            plan_listeners,
            read_config,
            refusal,
        )

        assert self.config_path is not None
        if self._pending is not None:
            self._reload_again = True  # once the one under way has settled
            return
        old = self.current
        try:
            candidate = read_config(self.config_path, self._watched)
            config = candidate.config
            try:
                proxy = Proxy(config, candidate.materials, metrics=old.proxy.metrics, admin=False,
                              config_path=self.config_path, supervisor=self.pid, last_reload=old.proxy.last_reload)
            except ConfigError as exc:
                located = ConfigError(str(self.config_path), exc.problems)
                raise refusal(located, candidate.refused_watched, candidate.refused_seen) from None
            except OutOfResources as exc:
                raise ReloadRefused(str(exc), postponed=True) from None
        except ReloadRefused as refused:
            self._refused(refused)
            return
        except Exception as exc:  # a bug of ours: the old generation serves on
            log.error("reload failed unexpectedly, still serving the previous configuration", exc_info=True)
            self._failed(f"{type(exc).__name__}: {exc}", logged=True)
            return
        proxy.signal_pid = self.pid
        if self.drain_timeout is not None:
            proxy.drain_timeout = self.drain_timeout
        plan = plan_listeners(old.proxy.config.listeners, config.listeners)
        reused = {**plan.same, **plan.takes_over}
        sockets = [old.sockets[reused[j]] if j in reused else [] for j in range(len(config.listeners))]
        bound: list[socket.socket] = []
        try:
            for j in plan.bind:
                sockets[j] = bind_listener(config.listeners[j])
                bound += sockets[j]
            admin_socket = old.admin_socket
            if config.admin.listen != old.proxy.config.admin.listen:
                admin_socket = bind_admin(config.admin.listen)
                bound.append(admin_socket)
        except ListenError as exc:
            _close(bound)
            self._watched, self._files_seen = candidate.refused_watched, candidate.refused_seen
            self._failed(str(exc))
            return
        generation = _Generation(next(self._numbers), proxy, sockets, admin_socket)
        self._pending = _Pending(generation, worker_count(config), candidate, bound,
                                 describe_changes(old.proxy.config, config), time.monotonic() + WORKER_START_TIMEOUT)
        for index in range(self._pending.workers):
            self._spawn("worker", index, generation)

    def _check_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        number = pending.generation.number
        new = [c for c in self.children.values() if c.generation == number and c.role == "worker"]
        if pending.failed is None and time.monotonic() > pending.deadline:
            pending.failed = f"the workers of the new configuration were not serving after {WORKER_START_TIMEOUT:g}s"
        if pending.failed is not None:
            for child in new:
                _kill(child.pid, signal.SIGKILL)
            self._pending = None
            _close(pending.bound)
            self._watched, self._files_seen = pending.candidate.refused_watched, pending.candidate.refused_seen
            self._failed(pending.failed)
            self._again()
        elif len(new) == pending.workers and all(c.ready for c in new):
            self._commit(pending)
            self._again()

    def _commit(self, pending: _Pending) -> None:
        """The new generation serves: the old one drains, the admin child is replaced, the unused sockets close."""
        from proxy.daemon.capacity import capacity_warnings
        from proxy.ops.logs import reconfigure_logging

        old, new = self.current, pending.generation
        self.current, self._pending = new, None
        for pid, child in self.children.items():
            if child.generation != new.number and child.role == "worker" and not child.retiring:
                child.retiring = True
                _kill(pid, signal.SIGTERM)  # drains like a stop: new connections go to the new generation
        _close(old.owns() - new.owns())  # the old workers hold their own copies until they are done
        self.workers = pending.workers
        new.proxy.record_reload_success()
        self._watched, self._files_seen = pending.candidate.watched, pending.candidate.seen
        log.info("reloaded %s: %s; %d workers of generation %d serve, those of generation %d drain",
                 self.config_path, pending.changes, pending.workers, new.number, old.number)
        for i, mat in enumerate(pending.candidate.materials):
            for warning in mat.warnings:
                log.warning("listeners[%d]: %s", i, warning)
        for warning in capacity_warnings(new.proxy.config):
            log.warning("%s", warning)
        if old.proxy.config.log != new.proxy.config.log:
            reconfigure_logging(new.proxy.config.log.level, new.proxy.config.log.format)
        self._replace_admin()

    def _again(self) -> None:
        if self._reload_again and not self.stopping:
            self._reload_again = False
            self._reload()

    def _refused(self, refused: ReloadRefused) -> None:
        if refused.postponed:
            log.warning("reload postponed, still serving the previous configuration: %s; it is tried again at the "
                        "next file check or SIGHUP", refused.error)
            return
        if refused.watched is not None:
            self._watched, self._files_seen = refused.watched, refused.seen
        self._failed(refused.error)

    def _failed(self, error: str, *, logged: bool = False) -> None:
        self.current.proxy.record_reload_failure(error, logged=logged)
        self._replace_admin()  # its /status shows the failure

    def _replace_admin(self) -> None:
        """A new admin child from the current state (its /status is a copy of the supervisor's); the old one stops."""
        for pid, child in self.children.items():
            if child.role == "admin" and not child.retiring:
                child.retiring = True
                _kill(pid, signal.SIGTERM)
        self._spawn("admin", 0, self.current)

    # ---- the children --------------------------------------------------------

    def _spawn(self, role: str, index: int, generation: _Generation) -> None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(ready_w)
            os.set_blocking(ready_r, False)
            self.children[pid] = _Child(role, index, pid, generation.number, ready_fd=ready_r)
            return
        code = 1
        try:
            os.close(ready_r)
            # A process group of its own: a Ctrl-C in the terminal reaches the
            # parent only, which turns it into one orderly drain for all.
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            self._close_inherited(role, generation)
            from proxy.ops.logs import reconfigure_logging

            log_config = generation.proxy.config.log  # forked before the supervisor applies a reload's
            reconfigure_logging(log_config.level, log_config.format)
            if role == "worker":
                trio.run(self._worker_main, generation, ready_w)
            else:
                trio.run(self._admin_main, generation, ready_w)
            code = 0
        except BaseException:
            log.exception("%s %d failed", role, index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _close_inherited(self, role: str, generation: _Generation) -> None:
        """In a new child: close the parent's descriptors it has no use for (other generations' sockets, the
        admin socket in a worker and the listeners in the admin child, the other children's pipes)."""
        for child in self.children.values():
            if child.ready_fd is not None:
                os.close(child.ready_fd)
        keep = {*itertools.chain.from_iterable(generation.sockets)} if role == "worker" else {generation.admin_socket}
        every = self.current.owns() | (self._pending.generation.owns() if self._pending is not None else set())
        _close(every - keep)

    async def _worker_main(self, generation: _Generation, ready_fd: int) -> None:
        from proxy.daemon.lifecycle import run_until_signalled

        proxy = generation.proxy
        listeners = [[SocketListener(s) for s in socks] for socks in generation.sockets]
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
                await run_until_signalled(proxy, sockets=listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_exit_with_parent, proxy.abort)
            await nursery.start(serve)
            _say_ready(ready_fd)
            nursery.start_soon(_publish_failures, proxy, _failures_path(Path(self.metrics_dir), os.getpid()))

    async def _admin_main(self, generation: _Generation, ready_fd: int) -> None:
        from proxy.ops.admin import admin_handler
        from proxy.ops.admin_http import serve_http_on
        from proxy.ops.metrics import multiprocess_registry

        proxy = generation.proxy  # this child's copy: its flags are the admin child's own
        proxy.ready = True
        directory = Path(self.metrics_dir)

        def status() -> dict[str, object]:
            return proxy.status(backend_failures=read_backend_failures(directory))

        handler = admin_handler(multiprocess_registry(), ready=lambda: proxy.ready, status=status)
        stop = trio.Event()

        async def serve(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            await serve_http_on(handler, [SocketListener(generation.admin_socket)], stop=stop,
                                task_status=task_status)
            nursery.cancel_scope.cancel()  # the last response is out: this child is done

        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                _say_ready(ready_fd)
                nursery.start_soon(_exit_with_parent, nursery.cancel_scope.cancel)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        proxy.ready, proxy.draining = False, True
                    elif signum == signal.SIGTERM:
                        # Replaced (a reload) or the end of the drain: the new admin child accepts from the same
                        # socket already, so this one stops accepting and finishes the responses it owes.
                        stop.set()


# ---- the workers' last backend failures, for the admin child's /status ----------------------------------------------


def _failures_path(directory: Path, pid: int) -> Path:
    return directory / f"backend-failures-{pid}.json"


def write_backend_failures(path: Path, failures: Mapping[str, BackendFailure]) -> None:
    """Write ``failures`` to ``path`` whole (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({name: [f.time, f.error] for name, f in failures.items()}))
    os.replace(partial, path)


def read_backend_failures(directory: Path) -> dict[str, BackendFailure]:
    """Each listener's latest backend failure over every worker's file (the retired workers' included)."""
    out: dict[str, BackendFailure] = {}
    for path in directory.glob(_FAILURES_GLOB):
        for name, failure in _read_failures(path).items():
            if name not in out or failure.time > out[name].time:
                out[name] = failure
    return out


def _read_failures(path: Path) -> dict[str, BackendFailure]:
    try:
        document: object = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # gone, or being replaced: the next look sees it
    out: dict[str, BackendFailure] = {}
    if isinstance(document, dict):
        for name, entry in document.items():
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (int, float)):
                out[str(name)] = BackendFailure(float(entry[0]), str(entry[1]))
    return out


def _retire_failures(directory: Path, pid: int) -> None:
    """A worker is gone: fold its last failures into the file of retired workers, so /status keeps them."""
    path = _failures_path(directory, pid)
    if not path.exists():
        return
    retired = directory / "backend-failures-retired.json"
    merged = _read_failures(retired)
    for name, failure in _read_failures(path).items():
        if name not in merged or failure.time > merged[name].time:
            merged[name] = failure
    with contextlib.suppress(OSError):
        write_backend_failures(retired, merged)
        path.unlink()


async def _publish_failures(proxy: Proxy, path: Path, interval: float = FAILURES_INTERVAL) -> None:
    written: dict[str, BackendFailure] = {}
    while True:
        await trio.sleep(interval)
        failures = proxy.backend_failures()
        if failures == written:
            continue
        try:
            write_backend_failures(path, failures)
        except OSError as exc:
            log.warning("cannot write %s for /status: %s", path, exc.strerror or exc)
            continue
        written = failures


# ---- helpers --------------------------------------------------------------------------------------------------------


def _say_ready(fd: int) -> None:
    """Tell the supervisor this child serves."""
    try:
        os.write(fd, b"r")
    finally:
        os.close(fd)


def _close(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


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
