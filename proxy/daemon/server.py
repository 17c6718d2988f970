"""Listeners, the accept loops, the connection limit, reload, and the proxy as a whole.

Nurseries: the accept loops live in their own nursery, the connection
handlers in another. Stopping cancels the accept loops only (new connections
are refused once the sockets close), then gives the connections until the
drain deadline, and then closes the rest in batches (docs/architecture.md,
"Drain"). The admin endpoint lives outside both, so `/readyz` can say 503
during the drain.

The accept loop (``proxy.net.accepting``, shared with the admin endpoint)
never handshakes, so a slow client cannot hold up the others
(docs/architecture.md, "Data flow"): it only takes a connection slot, accepts,
and starts a handler task. At ``max_connections``, or when the process's
file-descriptor budget (fdlimit.py) is spent, it stops accepting (clients wait
in the kernel's backlog) instead of accepting and failing. Every listening
socket, the admin endpoint's included, is bound by ``open_listeners``.

Reload (docs/architecture.md, "Reload"). A proxy started from a config file
(``config_path``) reloads the whole file: on SIGHUP, when the file watcher sees
a change, or when ``mtls-proxy reload`` asks (daemon/control.py). All or
nothing, in two halves:

1. Everything that can fail, with nothing changed yet: the file is parsed and
   checked and every file it names loaded (``read_config``), every listener's
   TLS context is built, and sockets are bound for new listen addresses (and a
   moved admin endpoint). A failure closes what was bound, keeps everything as
   it was, and is counted, logged and shown in /status.
2. The swap, which cannot fail: each listener gets a new ``ListenerRuntime``.
   A connection keeps the runtime it was accepted with (``_run_handler`` reads
   it once), so connections in flight finish with their TLS context, allow
   rules, backend, timeouts and forwarder. A listener whose name and address
   are unchanged keeps its sockets and accept loops; a new one starts
   accepting; a removed one stops accepting, closes its sockets and drains as
   SIGTERM drains the process, for that listener alone. A changed address is a
   removal plus an addition; a listener renamed on the same address takes the
   old one's sockets over, so no port is bound twice. Then the admin endpoint
   moves if its address changed, and the log level and format apply.

A proxy built from a config in memory (tests, the demo) has no file to re-read:
its reload re-reads the files the listeners name (``reload_certificates``). In
worker mode the supervisor reloads (daemon/workers.py) and a worker never does.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy import __version__
from proxy.config import schema as cfg
from proxy.config.materials import ListenerMaterials, load_all, load_listener_materials
from proxy.config.schema import Config, ConfigError, ListenerConfig
from proxy.daemon.capacity import capacity_warnings, give_memory_back, open_connections
from proxy.daemon.fdlimit import connection_capacity
from proxy.daemon.watch import (
    RESOURCE_ERRNOS,
    OutOfResources,
    Snapshot,
    changed,
    snapshot,
    subset,
    union,
    watched_paths,
)
from proxy.net.accepting import ListenError as ListenError  # re-exported: the CLI and the workers catch it here
from proxy.net.accepting import accept_loop, format_address, open_listeners
from proxy.net.sockstream import SocketListener, SocketStream
from proxy.ops.admin import admin_handler
from proxy.ops.admin_http import serve_http_on
from proxy.ops.logs import reconfigure_logging
from proxy.ops.metrics import BackendFailure, ListenerMetrics, Metrics
from proxy.relay.connection import ListenerRuntime, handle_connection
from proxy.tls.context import build_server_tls

log = logging.getLogger("proxy.daemon.server")

# Past the drain deadline the connections still open are cancelled this many at a time, each batch closed (and
# logged) before the next is cancelled. Cancelling thousands at once puts them all through each step of closing
# in lockstep: no access-log line is written until nearly the last connection is done, and the admin endpoint
# waits behind all of them. Measured with bench/drain.py (4,000 connections): a batch of 400 closes in 0.10-0.16 s
# (0.3-0.4 ms each, mostly trio's cancellation and the log line); batches of 100 took longer per connection.
CLOSE_BATCH = 400
CLOSE_BATCH_WAIT = 0.5  # seconds; a close that takes longer (up to CLOSE_TIMEOUT) does not hold up the next batch


async def _run_handler(served: ServedListener, connections: OpenConnections, stream: SocketStream) -> None:
    """One connection, from the accept loop (which gives its slots back after this returns)."""
    rt = served.runtime  # the generation current at accept: the connection keeps it to the end, whatever reloads
    with connections.track(served.connections):
        try:
            await handle_connection(stream, rt)
        except Exception:
            # handle_connection catches its own errors; this is the last line of
            # defence, so one connection's bug can never stop the listener.
            log.exception("connection handler failed on listener %s", rt.config.name)
            await trio.aclose_forcefully(stream)


# ---- open connections ----------------------------------------------------------------------------------------


class ConnectionGroup:
    """Open connections, each in a cancel scope of its own: wait until they are gone, or close them in batches.

    Each connection ends in its own cancel scope. Cancelling the handlers' nursery instead would make every
    handler end with a Cancelled that the nursery keeps, traceback and all, until the last one is done: with
    9,900 connections that kept every connection's objects alive through the forced close, and the garbage
    collector's full passes over them took 4.4 of the 8.5 s the drain overran its deadline.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._ended = trio.lowlevel.ParkingLot()
        self.closing = False

    def __len__(self) -> int:
        return len(self._scopes)

    def _add(self, scope: trio.CancelScope) -> None:
        self._scopes.add(scope)

    def _remove(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)
        self._ended.unpark_all()

    async def wait_closed(self, fewer_than: int = 1) -> None:
        """Until fewer than ``fewer_than`` connections are open."""
        while len(self._scopes) >= fewer_than:
            await self._ended.park()

    async def close_all(self, batch: int = CLOSE_BATCH) -> None:
        """Cancel every connection, ``batch`` at a time, each batch closed before the next is cancelled."""
        self.closing = True
        while self._scopes:
            open_now = len(self._scopes)
            for scope in itertools.islice(self._scopes, batch):
                scope.cancel()
            with trio.move_on_after(CLOSE_BATCH_WAIT):
                await self.wait_closed(fewer_than=open_now - batch + 1)


class OpenConnections(ConnectionGroup):
    """The process's open connections: their descriptor budget, and a cancel scope each for the drain.

    A connection is also in its listener's group (``ServedListener.connections``), with the same scope, so a
    listener that a reload removes drains alone.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.budget = trio.Semaphore(capacity)

    @contextmanager
    def track(self, group: ConnectionGroup | None = None) -> Iterator[None]:
        groups = (self,) if group is None else (self, group)
        with trio.CancelScope() as scope:
            if any(g.closing for g in groups):
                scope.cancel()
            for g in groups:
                g._add(scope)
            try:
                yield
            finally:
                for g in groups:
                    g._remove(scope)


# ---- listeners as served -------------------------------------------------------------------------------------


class ServedListener:
    """A listener being served: its sockets and accept loops, the runtime new connections take, its connections.

    A reload swaps ``runtime``; the handler of each new connection reads it once. ``max_connections`` is a
    semaphore the accept loops hold, which cannot be resized, so a reload that changes it restarts the loops with
    a new one; the connections accepted before keep the old one's slots, so until they end the listener may hold
    the old limit and the new together.

    ``generations`` are the runtimes its connections may still hold (weakly: a runtime no connection holds goes),
    so that a drain reaches every one of them (``drain_streams``), not only the current one.
    """

    def __init__(self, runtime: ListenerRuntime, sockets: list[SocketListener]) -> None:
        self.runtime = runtime
        # Keyed by id() (a runtime is a dataclass, equal by value, so not hashable); an entry goes with its runtime.
        self.generations: weakref.WeakValueDictionary[int, ListenerRuntime] = weakref.WeakValueDictionary()
        self.generations[id(runtime)] = runtime
        self.sockets = sockets
        self.addresses = [format_address(s.socket.getsockname()) for s in sockets]
        self.connections = ConnectionGroup()
        self.limit = runtime.config.max_connections
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    @property
    def name(self) -> str:
        return self.runtime.config.name

    def start(self, accepting: trio.Nursery, handlers: trio.Nursery, connections: OpenConnections) -> None:
        """Accept on every socket, in ``accepting``; the handlers run in ``handlers``."""
        scope, done = trio.CancelScope(), trio.Event()
        self._scope, self._done = scope, done
        self.limit = self.runtime.config.max_connections
        # A connection holds one of its listener's slots and one of the process's descriptors.
        slots = (trio.Semaphore(self.limit), connections.budget)
        handler = functools.partial(_run_handler, self, connections)
        accepting.start_soon(self._accept, scope, done, slots, handler, handlers)

    async def _accept(self, scope: trio.CancelScope, done: trio.Event, slots: tuple[trio.Semaphore, ...],
                      handler: Callable[[SocketStream], Awaitable[None]], handlers: trio.Nursery) -> None:
        try:
            with scope:
                async with trio.open_nursery() as loops:
                    for s in self.sockets:
                        loops.start_soon(functools.partial(
                            accept_loop, s, handler, handlers, slots=slots, name=f"listener {self.name}", logger=log,
                        ))
        finally:
            done.set()

    def use(self, runtime: ListenerRuntime) -> None:
        """New connections take ``runtime`` from now on; those accepted before keep theirs."""
        self.runtime = runtime
        self.generations[id(runtime)] = runtime

    def drain_streams(self) -> None:
        """The listener drains: HTTP/2 clients of every generation get GOAWAY (their streams under way finish)."""
        for runtime in list(self.generations.values()):
            runtime.draining.set()

    async def stop_accepting(self) -> None:
        """Cancel the accept loops and wait until they are gone: after this nothing waits on the sockets."""
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()

    async def close_sockets(self) -> None:
        """Close the listening sockets (after ``stop_accepting``): new connections are refused."""
        sockets, self.sockets = self.sockets, []
        for s in sockets:
            await trio.aclose_forcefully(s)


@dataclass(frozen=True)
class ListenerPlan:
    """Where a reload's listeners get their sockets: indexes into the running and the new ``listeners``."""

    same: Mapping[int, int]  # new -> running: the same listener (name and address): its sockets and connections
    takes_over: Mapping[int, int]  # new -> running: a removed listener's sockets, same address under a new name
    bind: tuple[int, ...]  # new listeners that need sockets of their own
    removed: tuple[int, ...]  # running listeners that stop accepting and drain (those taken over included)


def plan_listeners(running: Sequence[ListenerConfig], new: Sequence[ListenerConfig]) -> ListenerPlan:
    """Match a reload's listeners to the running ones.

    A listener is the same when its name and its listen address are: it keeps its sockets (with port 0, the
    port it got) and its open connections. A new listener whose address a removed one holds (port 0 aside)
    takes those sockets over, so a rename needs no second bind of one port. Every other new listener is bound.
    """
    by_name = {listener.name: i for i, listener in enumerate(running)}
    same: dict[int, int] = {}
    for j, listener in enumerate(new):
        i = by_name.get(listener.name)
        if i is not None and running[i].listen == listener.listen:
            same[j] = i
    kept = set(same.values())
    free = {running[i].listen: i for i in range(len(running)) if i not in kept and running[i].listen.port != 0}
    takes_over: dict[int, int] = {}
    for j, listener in enumerate(new):
        if j not in same and listener.listen.port != 0 and listener.listen in free:
            takes_over[j] = free.pop(listener.listen)
    return ListenerPlan(
        same=same,
        takes_over=takes_over,
        bind=tuple(j for j in range(len(new)) if j not in same and j not in takes_over),
        removed=tuple(i for i in range(len(running)) if i not in kept),
    )


def describe_changes(running: Config, new: Config) -> str:
    """What a reload changes, for its log line: ``added: b; removed: c; moved: a (...); changed: d; ...``."""
    before = {listener.name: listener for listener in running.listeners}
    after = {listener.name: listener for listener in new.listeners}
    parts = []
    for word, names in (("added", [n for n in after if n not in before]),
                        ("removed", [n for n in before if n not in after])):
        if names:
            parts.append(f"listeners {word}: {', '.join(names)}")
    moved = [f"{n} ({before[n].listen} -> {after[n].listen})" for n in after
             if n in before and before[n].listen != after[n].listen]
    if moved:
        parts.append(f"moved: {', '.join(moved)}")
    edited = [n for n in after if n in before and before[n].listen == after[n].listen and before[n] != after[n]]
    if edited:
        parts.append(f"changed: {', '.join(edited)}")
    if running.admin != new.admin:
        parts.append(f"admin endpoint: {new.admin.listen}")
    if running.log != new.log:
        parts.append(f"log: {new.log.level}, {new.log.format}")
    return "; ".join(parts) if parts else "no listener changed; files re-read"


# ---- reading a config for a reload ---------------------------------------------------------------------------


class ReloadRefused(Exception):
    """A reload that changes nothing: why, whether it is only postponed, and what to watch for the next try.

    A failure is counted; a postponement (the process was out of descriptors or memory: that says nothing about
    the files) is not, and the files stay as they were seen, so the next file check tries again.
    """

    def __init__(self, error: str, *, postponed: bool = False, watched: list[Path] | None = None,
                 seen: Snapshot = ()) -> None:
        super().__init__(error)
        self.error = error
        self.postponed = postponed
        self.watched = watched
        self.seen = seen


def refusal(exc: ConfigError, watched: list[Path], seen: Snapshot) -> ReloadRefused:
    """The ReloadRefused for a ConfigError: postponed if it came from a lack of descriptors or memory."""
    if _for_want_of_resources(exc):
        return ReloadRefused(str(exc), postponed=True)
    return ReloadRefused(str(exc), watched=watched, seen=seen)


@dataclass(frozen=True)
class Candidate:
    """A config file read and checked, with every file it names, not in use yet."""

    config: Config
    materials: tuple[ListenerMaterials, ...]
    watched: list[Path]  # to watch once it is in use: the config file, then every file it names
    seen: Snapshot  # their state just before they were read
    refused_watched: list[Path]  # to watch should it be refused after all: its files and those watched before
    refused_seen: Snapshot


def read_config(path: Path, watching: Sequence[Path]) -> Candidate:
    """Read, parse and check ``path`` and every file it names (what ``mtls-proxy check`` does, but for the TLS
    contexts: ``build_runtimes``); raise ReloadRefused.

    ``watching`` are the files watched now. Each file's state is taken before it is read, so a write that lands
    while it is read is a new change. A refused config leaves the watch on its own files as well as the old ones:
    a config that names a certificate not written yet is tried again once it appears.
    """
    try:
        seen = snapshot([path])
        try:
            config = cfg.load(path)
        except ConfigError as exc:
            others = [p for p in watching if p != path]
            raise refusal(exc, [path, *others], seen + snapshot(others)) from None
        paths = watched_paths(config, path)
        both = union(paths, watching)
        seen += snapshot(both[1:])  # both[0] is the config file
        try:
            materials = load_all(config, source=str(path))
        except ConfigError as exc:
            raise refusal(exc, both, seen) from None
    except OutOfResources as exc:
        raise ReloadRefused(str(exc), postponed=True) from None
    return Candidate(config, materials, paths, subset(seen, paths), both, seen)


def build_runtimes(
    config: Config,
    materials: Sequence[ListenerMaterials],
    metrics_for: Callable[[str], ListenerMetrics],
    *,
    source: str | None = None,
) -> list[ListenerRuntime]:
    """A runtime per listener, each with its TLS context built: settings OpenSSL refuses (a cipher string, say)
    are a ConfigError here, whose source is ``source`` when given."""
    try:
        return [ListenerRuntime(config=lc, tls=build_server_tls(lc, mat, index=i), metrics=metrics_for(lc.name))
                for i, (lc, mat) in enumerate(zip(config.listeners, materials, strict=True))]
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(source, exc.problems) from None


def check_config(path: Path) -> Config:
    """Everything ``mtls-proxy check`` checks: the file, every file it names, every TLS context; or ConfigError."""
    config = cfg.load(path)
    materials = load_all(config, source=str(path))
    build_runtimes(config, materials, Metrics().for_listener, source=str(path))
    return config


# ---- the proxy -----------------------------------------------------------------------------------------------


class LastReload(TypedDict):
    """The outcome of the last reload (start-up counts as a success), for /status."""

    result: str  # "success" | "failure"
    time: float  # Unix time
    error: str | None
    attempt: int  # reloads tried since start-up (0: none yet); `mtls-proxy reload` waits for it to move


@dataclass
class Bound:
    """Where the proxy listens (ports may have been 0); reloads keep it up to date."""

    listeners: dict[str, list[str]] = field(default_factory=dict)
    admin: str | None = None


class Proxy:
    """The whole daemon: listeners, handlers, admin endpoint, reload, drain.

    ``config_path``: the file the config came from; with it a reload re-reads the whole file. ``supervisor``:
    the pid of the supervisor this proxy runs under as a worker (daemon/workers.py), which does the reloading.
    ``last_reload``: carried over from the proxy this one replaces (a supervisor's reload); by default start-up
    counts as a successful reload.
    """

    def __init__(
        self,
        config: Config,
        materials: tuple[ListenerMaterials, ...],
        *,
        metrics: Metrics | None = None,
        admin: bool = True,
        config_path: Path | str | None = None,
        supervisor: int | None = None,
        last_reload: LastReload | None = None,
    ) -> None:
        self.config = config
        self.config_path = None if config_path is None else Path(config_path).absolute()
        self.supervisor = supervisor
        # The process that takes SIGHUP, for /status (`mtls-proxy reload` signals it): this one, or a supervisor.
        self.signal_pid = supervisor
        # Taken before the contexts are built; the files were read just before this, so a change from here on
        # triggers a reload.
        self._watched = watched_paths(config, self.config_path)
        self._files_seen = snapshot(self._watched)
        self.metrics = metrics or Metrics()
        self._drain_timeout: float | None = None
        self.admin_enabled = admin
        self.ready = False
        self.draining = False
        self._listener_metrics: dict[str, ListenerMetrics] = {}
        self.runtimes = build_runtimes(config, materials, self._metrics_for)
        if last_reload is None:
            last_reload = LastReload(result="success", time=time.time(), error=None, attempt=0)
            self.metrics.last_reload_success.set(last_reload["time"])
        self.last_reload = last_reload
        self.bound = Bound()
        self.connections: OpenConnections | None = None
        self._served: list[ServedListener] = []
        self._retiring: list[ServedListener] = []
        self._outer: trio.Nursery | None = None
        self._handlers: trio.Nursery | None = None
        self._accepting_nursery: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None
        self._grace: trio.CancelScope | None = None
        self._aborted = False
        self._admin_stop: trio.Event | None = None
        self._admin_sockets: list[SocketListener] = []
        self._serving = trio.Event()
        self._stopped = trio.Event()
        self._reload_wanted = trio.Event()
        self._reloading = False
        self._config_applied = trio.Event()

    @property
    def drain_timeout(self) -> float:
        """``run --drain-timeout`` when given, else the config's ``drain_timeout`` (which a reload may change)."""
        return self.config.drain_timeout if self._drain_timeout is None else self._drain_timeout

    @drain_timeout.setter
    def drain_timeout(self, seconds: float) -> None:
        self._drain_timeout = seconds

    def _metrics_for(self, name: str) -> ListenerMetrics:
        """A listener's metric children, kept across reloads (its last backend failure with them)."""
        found = self._listener_metrics.get(name)
        if found is None:
            found = self._listener_metrics[name] = self.metrics.for_listener(name)
        return found

    # ---- lifecycle --------------------------------------------------------

    async def run(self, *, sockets: list[list[SocketListener]] | None = None,
                  task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; then drain and return.

        ``sockets`` are listening sockets bound already, one list per
        listener (worker processes get them from their parent); by default
        the proxy binds its own.
        """
        if sockets is None:
            sockets = await self._bind_all()
        self._served = [ServedListener(rt, ls) for rt, ls in zip(self.runtimes, sockets, strict=False)]
        self.bound.listeners.update({served.name: served.addresses for served in self._served})
        for rt in self.runtimes:
            self._publish(rt)
        admin: list[SocketListener] = []
        try:
            if self.admin_enabled:
                addr = self.config.admin.listen
                admin = await open_listeners(addr.host, addr.port, what="admin")
            async with trio.open_nursery() as outer:
                self._outer = outer
                if self.admin_enabled:
                    await self._start_admin(admin)
                outer.start_soon(self._watch_files)
                outer.start_soon(self._reloader)
                outer.start_soon(give_memory_back, lambda: open_connections(self.metrics))
                await self._serve(task_status)
                outer.cancel_scope.cancel()  # the drain is over: stop the admin endpoint and the reloads
        finally:
            every = [*self._admin_sockets, *itertools.chain.from_iterable(sockets),
                     *itertools.chain.from_iterable(s.sockets for s in [*self._served, *self._retiring])]
            for listener in every:
                await trio.aclose_forcefully(listener)

    async def _serve(self, task_status: trio.TaskStatus[Bound]) -> None:
        connections = self.connections = OpenConnections(connection_capacity())
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with trio.open_nursery() as accepting:
                self._accepting, self._accepting_nursery = accepting.cancel_scope, accepting
                for served in self._served:
                    served.start(accepting, handlers, connections)
                    _log_listening(served)
                self.ready = not self.draining
                self._serving.set()
                task_status.started(self.bound)
                await self._stopped.wait()  # reloads add and remove accept loops meanwhile
                accepting.cancel_scope.cancel()
            # stop() was called: refuse new connections, let the others finish.
            for served in self._served:
                await served.close_sockets()
            with trio.move_on_after(0 if self._aborted else self.drain_timeout) as self._grace:
                await connections.wait_closed()
            await connections.close_all()

    async def _bind_all(self) -> list[list[SocketListener]]:
        out: list[list[SocketListener]] = []
        try:
            for rt in self.runtimes:
                addr = rt.config.listen
                out.append(await open_listeners(addr.host, addr.port, what=f"listener {rt.config.name}"))
        except BaseException:
            for ls in out:
                for s in ls:
                    await trio.aclose_forcefully(s)
            raise
        return out

    async def _start_admin(self, listeners: list[SocketListener]) -> None:
        """Serve the admin endpoint on ``listeners``, in place of where it was served."""
        assert self._outer is not None
        self._admin_sockets += listeners
        stop, address = await self._outer.start(self._serve_admin, listeners)
        previous, self._admin_stop = self._admin_stop, stop
        self.bound.admin = format_address(address)
        if previous is not None:
            previous.set()  # the old endpoint finishes the responses it owes, then closes its sockets

    async def _serve_admin(self, listeners: list[SocketListener], *,
                           task_status: trio.TaskStatus[tuple[trio.Event, tuple[str, int]]]) -> None:
        handler = admin_handler(self.metrics.registry, ready=lambda: self.ready, status=self.status)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            address: tuple[str, int] = await nursery.start(functools.partial(serve_http_on, handler, listeners,
                                                                             stop=stop))
            task_status.started((stop, address))

    def stop(self) -> None:
        """Begin a graceful drain (idempotent)."""
        if not self.draining:
            # What lives now lives until the process exits, give or take the drain: out of the collector's
            # sight, its full passes (0.1-1.3 s each with 9,900 connections, freeing nothing) stay short.
            gc.freeze()
        self.ready = False
        self.draining = True
        for rt in self.runtimes:
            rt.draining.set()  # HTTP/2 clients get GOAWAY: the streams under way finish, no new ones open
        for served in [*self._served, *self._retiring]:
            served.drain_streams()  # and so do those of a generation before a reload
        self._stopped.set()
        if self._accepting is not None:
            self._accepting.cancel()

    def abort(self) -> None:
        """Stop now: cancel every connection."""
        self.stop()
        self._aborted = True
        if self._grace is not None:
            self._grace.cancel()

    # ---- reload: entry points -----------------------------------------------

    def request_reload(self) -> None:
        """Ask for a reload (SIGHUP, the file watcher). It runs in a task of its own, one at a time; requests that
        arrive while one runs make one more after it."""
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        await self._serving.wait()
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()
            await self.reload()

    async def reload(self) -> bool:
        """Reload what the proxy was started from: the whole config file, or (without one) the files the listeners
        name. True on success; a failure keeps everything as it was."""
        if self.supervisor is not None:
            log.warning("reloads are the supervisor's: send SIGHUP to pid %d", self.supervisor)
            return False
        if self.draining:
            return False
        if self.config_path is None:
            return self.reload_certificates()
        self._reloading = True
        try:
            return await self._reload_config(self.config_path)
        finally:
            self._reloading = False

    def reload_certificates(self) -> bool:
        """Re-read every listener's files; swap all or none. True on success.

        SIGHUP's entry point (daemon/lifecycle.py). A proxy started from a config file reloads the whole file
        instead, which needs the event loop (binding new listeners): this asks for that reload
        (``request_reload``) and returns True; the outcome is counted and shown in /status as any reload's.

        New connections take the new material; open ones keep theirs. On
        failure the old material keeps serving (a half-written or mismatched
        file must never take the proxy down), and so it does when the error is
        a bug of ours. A reload the process has no descriptors or memory for
        is not a failure of the files: it is postponed, uncounted.
        """
        if self.draining:
            return False
        if self.supervisor is not None:
            log.warning("reloads are the supervisor's: send SIGHUP to pid %d", self.supervisor)
            return False
        if self.config_path is not None:
            self.request_reload()
            return True
        try:
            seen = snapshot(self._watched)  # before reading: a later change is a new change
            fresh = [
                build_server_tls(rt.config, load_listener_materials(rt.config, i), index=i)
                for i, rt in enumerate(self.runtimes)
            ]
        except OutOfResources as exc:
            return self._reload_postponed(str(exc))
        except ConfigError as exc:
            if _for_want_of_resources(exc):
                return self._reload_postponed(str(exc))
            self._files_seen = seen
            return self.record_reload_failure(str(exc))
        except Exception as exc:
            log.error("reload failed unexpectedly, still serving the previous certificates", exc_info=True)
            return self.record_reload_failure(f"{type(exc).__name__}: {exc}", logged=True)
        self._files_seen = seen
        for rt, tls in zip(self.runtimes, fresh, strict=False):
            rt.tls = tls
            rt.metrics.publish_materials(tls.materials)
            for warning in tls.materials.warnings:
                log.warning("%s", warning)
        self.record_reload_success()
        log.info("reloaded certificates for %d listener(s)", len(fresh))
        return True

    # ---- reload: the whole config file ----------------------------------------

    async def _reload_config(self, path: Path) -> bool:
        try:
            candidate = read_config(path, self._watched)
            try:
                runtimes = build_runtimes(candidate.config, candidate.materials, self._metrics_for, source=str(path))
            except ConfigError as exc:
                raise refusal(exc, candidate.refused_watched, candidate.refused_seen) from None
        except ReloadRefused as refused:
            return self._refused(refused)
        except Exception as exc:  # a bug of ours: the old config serves on
            log.error("reload failed unexpectedly, still serving the previous configuration", exc_info=True)
            return self.record_reload_failure(f"{type(exc).__name__}: {exc}", logged=True)
        config = candidate.config
        plan = plan_listeners(self.config.listeners, config.listeners)
        bound = await self._bind_for(config, plan)
        if bound is None:  # a port in use: counted; nothing changed
            self._watched, self._files_seen = candidate.refused_watched, candidate.refused_seen
            return False
        new_sockets, admin = bound
        if self.draining:  # a stop came while binding: nothing to change any more
            for s in [*itertools.chain.from_iterable(new_sockets.values()), *admin]:
                await trio.aclose_forcefully(s)
            return False
        running = self.config
        self.config = config  # first: what drains below drains with the new drain_timeout
        if not await self._swap_listeners(running, runtimes, plan, new_sockets):
            for s in admin:
                await trio.aclose_forcefully(s)
            return False  # a stop came: the drain takes it from here
        if admin:
            await self._start_admin(admin)
        self._watched, self._files_seen = candidate.watched, candidate.seen
        self.record_reload_success()
        log.info("reloaded %s: %s", path, describe_changes(running, config))
        self._warn_after_reload(candidate)
        if running.log != config.log:  # last, so the lines above are written at the level they were asked at
            reconfigure_logging(config.log.level, config.log.format)
        applied, self._config_applied = self._config_applied, trio.Event()
        applied.set()
        return True

    async def _bind_for(self, config: Config, plan: ListenerPlan,
                        ) -> tuple[dict[int, list[SocketListener]], list[SocketListener]] | None:
        """Sockets for the new listener addresses and a moved admin endpoint; None (counted) if one cannot be
        bound, with whatever was bound closed again."""
        new_sockets: dict[int, list[SocketListener]] = {}
        admin: list[SocketListener] = []
        try:
            for j in plan.bind:
                listener = config.listeners[j]
                addr = listener.listen
                new_sockets[j] = await open_listeners(addr.host, addr.port, what=f"listener {listener.name}")
            if self.admin_enabled and config.admin.listen != self.config.admin.listen:
                addr = config.admin.listen
                admin = await open_listeners(addr.host, addr.port, what="admin")
        except BaseException as exc:
            for s in [*itertools.chain.from_iterable(new_sockets.values()), *admin]:
                await trio.aclose_forcefully(s)
            if isinstance(exc, ListenError):
                self.record_reload_failure(str(exc))
                return None
            raise
        return new_sockets, admin

    async def _swap_listeners(self, running: Config, runtimes: list[ListenerRuntime], plan: ListenerPlan,
                              new_sockets: dict[int, list[SocketListener]]) -> bool:
        """The new runtimes in, listeners added and removed as ``plan`` says. Nothing here can fail; a stop that
        comes meanwhile ends it (False), and the drain closes everything."""
        old = self._served
        assert self._accepting_nursery is not None and self._handlers is not None and self.connections is not None
        accepting, handlers, connections = self._accepting_nursery, self._handlers, self.connections
        # Two accept loops must never wait on one socket: what hands its sockets over, or restarts with a new
        # max_connections, stops first.
        restart = {j for j, i in plan.same.items() if old[i].limit != runtimes[j].config.max_connections}
        for i in [*plan.takes_over.values(), *(plan.same[j] for j in restart)]:
            await old[i].stop_accepting()
        if self.draining:  # the accept loops' nursery may be closed already: start nothing in it
            for s in itertools.chain.from_iterable(new_sockets.values()):
                await trio.aclose_forcefully(s)
            return False
        # From here to the end of the loop nothing awaits, so the nurseries are still open.
        served: list[ServedListener] = []
        for j, rt in enumerate(runtimes):
            if j in plan.same:
                listener = old[plan.same[j]]
                listener.use(rt)
                if j in restart:
                    listener.start(accepting, handlers, connections)
            else:
                if j in plan.takes_over:
                    donor = old[plan.takes_over[j]]
                    sockets, donor.sockets = donor.sockets, []
                else:
                    sockets = new_sockets[j]
                listener = ServedListener(rt, sockets)
                listener.start(accepting, handlers, connections)
                _log_listening(listener)
            served.append(listener)
            self._publish(rt)
        self._served, self.runtimes = served, runtimes
        self.bound.listeners.clear()
        self.bound.listeners.update({listener.name: listener.addresses for listener in served})
        kept = {rt.config.name for rt in runtimes}
        for name in {listener.name for listener in running.listeners} - kept:
            self._metrics_for(name).withdraw_materials()
        for i in plan.removed:
            gone = old[i]
            self._retiring.append(gone)
            await gone.stop_accepting()
            await gone.close_sockets()  # new connections are refused from here on
            if not self.draining:  # else the process's drain has its connections
                handlers.start_soon(self._drain_removed, gone)
        return True

    async def _drain_removed(self, gone: ServedListener) -> None:
        """A listener a reload removed: its connections get ``drain_timeout`` to finish, as in a SIGTERM drain,
        then what is still open is closed."""
        open_at_start = len(gone.connections)
        gone.drain_streams()
        with trio.move_on_after(self.drain_timeout):
            await gone.connections.wait_closed()
        forced = len(gone.connections)
        await gone.connections.close_all()
        self._retiring.remove(gone)
        log.info("listener %s removed: %d connection(s) drained, %d closed at the drain deadline",
                 gone.name, open_at_start - forced, forced,
                 extra={"fields": {"listener": gone.name, "drained": open_at_start - forced, "forced": forced}})

    def _warn_after_reload(self, candidate: Candidate) -> None:
        for i, mat in enumerate(candidate.materials):
            for warning in mat.warnings:
                log.warning("listeners[%d]: %s", i, warning)
        for warning in capacity_warnings(candidate.config):
            log.warning("%s", warning)
        workers = candidate.config.workers
        if workers != 1:
            # One process cannot become several: the supervisor forks its workers only at start.
            log.warning("workers: %s takes a restart; this process goes on serving alone", workers)

    def _publish(self, rt: ListenerRuntime) -> None:
        rt.metrics.publish_materials(rt.tls.materials)

    # ---- reload: bookkeeping -------------------------------------------------

    def _refused(self, refused: ReloadRefused) -> bool:
        if refused.postponed:
            return self._reload_postponed(refused.error)
        if refused.watched is not None:
            self._watched, self._files_seen = refused.watched, refused.seen
        return self.record_reload_failure(refused.error)

    @property
    def _what(self) -> str:
        return "certificates" if self.config_path is None else "configuration"

    def record_reload_failure(self, error: str, *, logged: bool = False) -> bool:
        """Count, log and remember (for /status) a reload that failed; False."""
        self.metrics.reloads.labels(result="failure").inc()
        self.last_reload = LastReload(result="failure", time=time.time(), error=error,
                                      attempt=self.last_reload["attempt"] + 1)
        if not logged:
            log.error("reload failed, still serving the previous %s: %s", self._what, error)
        return False

    def record_reload_success(self) -> None:
        """Count and remember a reload that took effect."""
        self.metrics.reloads.labels(result="success").inc()
        self.last_reload = LastReload(result="success", time=time.time(), error=None,
                                      attempt=self.last_reload["attempt"] + 1)
        self.metrics.last_reload_success.set(self.last_reload["time"])

    def _reload_postponed(self, error: str) -> bool:
        # _files_seen is left as it was: the next file check sees the change again and retries.
        log.warning("reload postponed, still serving the previous %s: %s; "
                    "it is tried again at the next file check or SIGHUP", self._what, error)
        return False

    async def _watch_files(self) -> None:
        if self.supervisor is not None:
            return  # the supervisor watches
        short_of_resources = False
        while True:
            interval = self.config.reload.watch_interval
            if interval <= 0:
                await self._config_applied.wait()  # a reload may turn the watch on
                continue
            await trio.sleep(interval)
            if self._reloading or self._reload_wanted.is_set() or self.draining:
                continue
            try:
                current = snapshot(self._watched)
            except OutOfResources as exc:
                if not short_of_resources:  # once per episode: at the fd limit this repeats every interval
                    log.warning("cannot check the watched files: %s; trying again every %gs", exc, interval)
                short_of_resources = True
                continue
            if short_of_resources:
                log.info("watched files readable again")
                short_of_resources = False
            if current != self._files_seen:
                log.info("files changed: %s; reloading", ", ".join(changed(self._files_seen, current)))
                if self.config_path is None:
                    self.reload_certificates()
                else:
                    self.request_reload()

    # ---- /status ---------------------------------------------------------------

    def backend_failures(self) -> dict[str, BackendFailure]:
        """Each listener's last failed backend connect, in this process."""
        return {name: m.last_backend_failure for name, m in self._listener_metrics.items()
                if m.last_backend_failure is not None}

    def status(self, backend_failures: Mapping[str, BackendFailure] | None = None) -> dict[str, object]:
        """The /status document. ``backend_failures``: gathered from the workers, in worker mode."""
        failures = self.backend_failures() if backend_failures is None else backend_failures
        state = "draining" if self.draining else ("accepting" if self.ready else "starting")
        return {
            "version": __version__,
            "pid": self.signal_pid if self.signal_pid is not None else os.getpid(),
            "config_file": None if self.config_path is None else str(self.config_path),
            "ready": self.ready,
            "draining": self.draining,
            "last_reload": {
                "result": self.last_reload["result"],
                "time": _iso(self.last_reload["time"]),
                "error": self.last_reload["error"],
                "attempt": self.last_reload["attempt"],
            },
            "listeners": [
                *(_listener_status(rt, state, failures.get(rt.config.name)) for rt in self.runtimes),
                # Removed by a reload, still draining their connections.
                *(_listener_status(gone.runtime, "removed", failures.get(gone.name)) for gone in self._retiring),
            ],
        }


def _log_listening(served: ServedListener) -> None:
    rt = served.runtime
    log.info("listener %s on %s -> %s", served.name, ", ".join(served.addresses), rt.config.backend.address,
             extra={"fields": {"listener": served.name}})


# The CertificateRequest carries the CA names in a list with a 16-bit length
# (RFC 8446 4.2.4, RFC 5246 7.4.4): each name costs its DER plus 2 bytes.
CA_NAMES_LIMIT = 2**16 - 1


def _for_want_of_resources(exc: ConfigError) -> bool:
    """Whether a file failed to load because the process was out of descriptors or memory. The materials report
    a read error by its text only ("cannot read: Too many open files"), so the text is what there is to match."""
    reasons = [os.strerror(number) for number in RESOURCE_ERRNOS]
    return any(reason in problem for problem in exc.problems for reason in reasons)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _listener_status(rt: ListenerRuntime, state: str, backend_failure: BackendFailure | None) -> dict[str, object]:
    mat = rt.tls.materials
    leaf = mat.server.leaf
    names = [ca.subject for ca in mat.advertised_ca]
    names_size = sum(len(name.public_bytes()) + 2 for name in names)
    warnings = list(mat.warnings)
    if rt.tls.client_auth != "none" and not names:
        warnings.append("no CA names are advertised: clients get no hint which certificate to send")
    if names_size > CA_NAMES_LIMIT:
        warnings.append(f"the advertised CA names take {names_size} bytes, over the {CA_NAMES_LIMIT}-byte limit "
                        "of the CertificateRequest: handshakes will fail; set client_auth.advertised_ca")
    return {
        "name": rt.config.name,
        "state": state,
        "listen": str(rt.config.listen),
        "backend": str(rt.config.backend.address),
        # The last failed connect to the backend (in any worker) and when: a backend that is down shows here.
        "last_backend_error": None if backend_failure is None else {
            "time": _iso(backend_failure.time), "error": backend_failure.error},
        "client_auth": rt.tls.client_auth,
        "server_certificate": {
            "subject": leaf.subject.rfc4514_string(),
            "dns_sans": _dns_sans(leaf),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "sha256": leaf.fingerprint(hashes.SHA256()).hex(),
        },
        "advertised_ca": [name.rfc4514_string() for name in names],
        "advertised_ca_bytes": names_size,
        "crls": [
            {"issuer": crl.issuer.rfc4514_string(),
             "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None}
            for crl in mat.crls
        ],
        "recent_handshake_failures": rt.metrics.recent.counts(),
        "warnings": warnings,
    }


def _dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.DNSName)
