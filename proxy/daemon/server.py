"""Listeners, the accept loops, the connection limit, and the proxy as a whole.

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
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy import __version__
from proxy.config.materials import ListenerMaterials, load_listener_materials
from proxy.config.schema import Config, ConfigError
from proxy.daemon.capacity import give_memory_back, open_connections
from proxy.daemon.fdlimit import connection_capacity
from proxy.daemon.watch import RESOURCE_ERRNOS, OutOfResources, changed, snapshot, watched_paths
from proxy.net.accepting import ListenError as ListenError  # re-exported: the CLI and the workers catch it here
from proxy.net.accepting import accept_loop, format_address, open_listeners
from proxy.net.sockstream import SocketListener, SocketStream
from proxy.ops.admin import admin_handler
from proxy.ops.admin_http import serve_http_on
from proxy.ops.metrics import Metrics
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


async def _run_handler(rt: ListenerRuntime, connections: OpenConnections, stream: SocketStream) -> None:
    """One connection, from the accept loop (which gives its slots back after this returns)."""
    with connections.track():
        try:
            await handle_connection(stream, rt)
        except Exception:
            # handle_connection catches its own errors; this is the last line of
            # defence, so one connection's bug can never stop the listener.
            log.exception("connection handler failed on listener %s", rt.config.name)
            await trio.aclose_forcefully(stream)


class OpenConnections:
    """The process's open connections: their descriptor budget, and a cancel scope each for the drain.

    Each connection ends in its own cancel scope. Cancelling the handlers' nursery instead would make every
    handler end with a Cancelled that the nursery keeps, traceback and all, until the last one is done: with
    9,900 connections that kept every connection's objects alive through the forced close, and the garbage
    collector's full passes over them took 4.4 of the 8.5 s the drain overran its deadline.
    """

    def __init__(self, capacity: int) -> None:
        self.budget = trio.Semaphore(capacity)
        self._scopes: set[trio.CancelScope] = set()
        self._ended = trio.lowlevel.ParkingLot()
        self._closing = False

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def track(self) -> Iterator[None]:
        with trio.CancelScope() as scope:
            if self._closing:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)
                self._ended.unpark_all()

    async def wait_closed(self, fewer_than: int = 1) -> None:
        """Until fewer than ``fewer_than`` connections are open."""
        while len(self._scopes) >= fewer_than:
            await self._ended.park()

    async def close_all(self, batch: int = CLOSE_BATCH) -> None:
        """Cancel every connection, ``batch`` at a time, each batch closed before the next is cancelled."""
        self._closing = True
        while self._scopes:
            open_now = len(self._scopes)
            for scope in itertools.islice(self._scopes, batch):
                scope.cancel()
            with trio.move_on_after(CLOSE_BATCH_WAIT):
                await self.wait_closed(fewer_than=open_now - batch + 1)


class LastReload(TypedDict):
    """The outcome of the last reload (start-up counts as a success), for /status."""

    result: str  # "success" | "failure"
    time: float  # Unix time
    error: str | None


@dataclass
class Bound:
    """Where the proxy ended up listening (ports may have been 0)."""

    listeners: dict[str, list[str]] = field(default_factory=dict)
    admin: str | None = None


class Proxy:
    """The whole daemon: listeners, handlers, admin endpoint, reload, drain."""

    def __init__(
        self,
        config: Config,
        materials: tuple[ListenerMaterials, ...],
        *,
        metrics: Metrics | None = None,
        admin: bool = True,
    ) -> None:
        self.config = config
        # Taken before the contexts are built; the materials were read just
        # before this, so a change from here on triggers a reload.
        self._watched = watched_paths(config)
        self._files_seen = snapshot(self._watched)
        self.metrics = metrics or Metrics()
        self.drain_timeout = config.drain_timeout
        self.admin_enabled = admin
        self.ready = False
        self.draining = False
        self.runtimes = [
            ListenerRuntime(config=lc, tls=build_server_tls(lc, mat, index=i),
                            metrics=self.metrics.for_listener(lc.name))
            for i, (lc, mat) in enumerate(zip(config.listeners, materials, strict=True))
        ]
        for rt in self.runtimes:
            rt.metrics.publish_materials(rt.tls.materials)
        self.last_reload = LastReload(result="success", time=time.time(), error=None)
        self.metrics.last_reload_success.set(self.last_reload["time"])
        self._accepting: trio.CancelScope | None = None
        self._grace: trio.CancelScope | None = None
        self._aborted = False
        self.connections: OpenConnections | None = None

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
        bound = Bound(listeners={rt.config.name: [format_address(s.socket.getsockname()) for s in ls]
                                 for rt, ls in zip(self.runtimes, sockets, strict=False)})
        admin: list[SocketListener] = []
        try:
            if self.admin_enabled:
                addr = self.config.admin.listen
                admin = await open_listeners(addr.host, addr.port, what="admin")
            async with trio.open_nursery() as outer:
                if admin:
                    handler = admin_handler(self.metrics.registry, ready=lambda: self.ready, status=self.status)
                    bound.admin = format_address(await outer.start(serve_http_on, handler, admin))
                if self.config.reload.watch_interval > 0:
                    outer.start_soon(self._watch_files, self.config.reload.watch_interval)
                outer.start_soon(give_memory_back, lambda: open_connections(self.metrics))
                await self._serve(sockets, bound, task_status)
                outer.cancel_scope.cancel()  # the drain is over: stop the admin endpoint
        finally:
            for listener in [*admin, *itertools.chain.from_iterable(sockets)]:
                await trio.aclose_forcefully(listener)

    async def _serve(self, sockets: list[list[SocketListener]], bound: Bound,
                     task_status: trio.TaskStatus[Bound]) -> None:
        connections = self.connections = OpenConnections(connection_capacity())
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                self._accepting = accepting.cancel_scope
                for rt, ls in zip(self.runtimes, sockets, strict=False):
                    # A connection holds one of its listener's slots and one of the process's descriptors.
                    slots = (trio.Semaphore(rt.config.max_connections), connections.budget)
                    handler = functools.partial(_run_handler, rt, connections)
                    for s in ls:
                        accepting.start_soon(functools.partial(
                            accept_loop, s, handler, handlers, slots=slots, name=f"listener {rt.config.name}",
                            logger=log,
                        ))
                    log.info("listener %s on %s -> %s", rt.config.name, ", ".join(bound.listeners[rt.config.name]),
                             rt.config.backend.address, extra={"fields": {"listener": rt.config.name}})
                self.ready = True
                task_status.started(bound)
            # stop() was called: refuse new connections, let the others finish.
            for ls in sockets:
                for s in ls:
                    await trio.aclose_forcefully(s)
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

    def stop(self) -> None:
        """Begin a graceful drain (idempotent)."""
        if not self.draining:
            # What lives now lives until the process exits, give or take the drain: out of the collector's
            # sight, its full passes (0.1-1.3 s each with 9,900 connections, freeing nothing) stay short.
            gc.freeze()
        self.ready = False
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()

    def abort(self) -> None:
        """Stop now: cancel every connection."""
        self.stop()
        self._aborted = True
        if self._grace is not None:
            self._grace.cancel()

    # ---- reload -----------------------------------------------------------

    def reload_certificates(self) -> bool:
        """Re-read every listener's files; swap all or none. True on success.

        New connections take the new material; open ones keep theirs. On
        failure the old material keeps serving (a half-written or mismatched
        file must never take the proxy down), and so it does when the error is
        a bug of ours. A reload the process has no descriptors or memory for
        is not a failure of the files: it is postponed, uncounted.
        """
        if self.draining:
            return False
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
            return self._reload_failed(str(exc))
        except Exception as exc:
            log.error("reload failed unexpectedly, still serving the previous certificates", exc_info=True)
            return self._reload_failed(f"{type(exc).__name__}: {exc}", logged=True)
        self._files_seen = seen
        for rt, tls in zip(self.runtimes, fresh, strict=False):
            rt.tls = tls
            rt.metrics.publish_materials(tls.materials)
            for warning in tls.materials.warnings:
                log.warning("%s", warning)
        self.metrics.reloads.labels(result="success").inc()
        self.last_reload = LastReload(result="success", time=time.time(), error=None)
        self.metrics.last_reload_success.set(self.last_reload["time"])
        log.info("reloaded certificates for %d listener(s)", len(fresh))
        return True

    def _reload_failed(self, error: str, *, logged: bool = False) -> bool:
        self.metrics.reloads.labels(result="failure").inc()
        self.last_reload = LastReload(result="failure", time=time.time(), error=error)
        if not logged:
            log.error("reload failed, still serving the previous certificates: %s", error)
        return False

    def _reload_postponed(self, error: str) -> bool:
        # _files_seen is left as it was: the next file check sees the change again and retries.
        log.warning("reload postponed, still serving the previous certificates: %s; "
                    "it is tried again at the next file check or SIGHUP", error)
        return False

    async def _watch_files(self, interval: float) -> None:
        short_of_resources = False
        while True:
            await trio.sleep(interval)
            try:
                current = snapshot(self._watched)
            except OutOfResources as exc:
                if not short_of_resources:  # once per episode: at the fd limit this repeats every interval
                    log.warning("cannot check the certificate files: %s; trying again every %gs", exc, interval)
                short_of_resources = True
                continue
            if short_of_resources:
                log.info("certificate files readable again")
                short_of_resources = False
            if current != self._files_seen:
                log.info("files changed: %s; reloading", ", ".join(changed(self._files_seen, current)))
                self.reload_certificates()

    def status(self) -> dict[str, object]:
        return {
            "version": __version__,
            "ready": self.ready,
            "draining": self.draining,
            "last_reload": {
                "result": self.last_reload["result"],
                "time": _iso(self.last_reload["time"]),
                "error": self.last_reload["error"],
            },
            "listeners": [_listener_status(rt, self) for rt in self.runtimes],
        }


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


def _listener_status(rt: ListenerRuntime, proxy: Proxy) -> dict[str, object]:
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
        "state": "draining" if proxy.draining else ("accepting" if proxy.ready else "starting"),
        "listen": str(rt.config.listen),
        "backend": str(rt.config.backend.address),
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
