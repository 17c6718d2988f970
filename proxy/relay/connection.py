"""One client connection: handshake -> identify -> connect -> forward -> close and log.

``handle_connection`` is what the daemon calls for each accepted socket. It runs a :class:`Connection`, which owns
the client's TLS stream, the listener's runtime, the handshake record and what the access-log line will say; each
phase is one of its methods, entered in the order of :class:`Phase`.

Each phase has its own deadline: the handshake timeout covers accept to a verified, authorized client (the allow
rules run inside the handshake, in the verify callback of proxy.tls.context, so a denied client never completes it);
the backend connect has its own timeout; forwarding has the idle timeout. Whatever happens, the connection ends with
both sockets closed, the gauges back where they were, and exactly one access-log line.

What moves the bytes is the listener's forwarding (proxy.relay.forwarders), chosen once from its config: the
TCP data plane, or in HTTP mode the HTTP/1.1 or HTTP/2 relay, as ALPN decided for the connection.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from proxy.config.schema import ListenerConfig, TCPAddress
from proxy.net.backend import BackendError, connect_backend
from proxy.net.sockstream import SocketStream
from proxy.ops.logs import ACCESS
from proxy.ops.metrics import ListenerMetrics
from proxy.policy.identity import PeerIdentity, identity_from_cert
from proxy.protocol import proxyproto
from proxy.relay.forwarders import Forwarder, ListenerForwarder, forwarder_for
from proxy.relay.tcp_forwarder import PumpResult
from proxy.tls.classify import HandshakeFailure, Reason, classify
from proxy.tls.context import HandshakeRecord, ServerTLS
from proxy.tls.stream import TLSStream

log = logging.getLogger("proxy.relay.connection")

# How long closing may take (sending close_notify to a client that does not
# read, the lingering close after an alert or with the client's data unread):
# after this the socket is closed regardless, also when draining for shutdown.
CLOSE_TIMEOUT = 1.0
# A handshake gets its timeout plus up to this much more, at random. Connections accepted in one burst would
# otherwise time out together, and their closes (~140 us each) run in one turn of the scheduler: 1,500 of them
# stalled every other connection for 60-330 ms (bench/burst.py).
HANDSHAKE_JITTER = 0.1
# ended_by of a connection cut while forwarding: the drain deadline passed, or the process is stopping.
CANCELLED = "cancelled"


class Phase(enum.StrEnum):
    """How far a connection got. Entered in this order; a connection may end in any of them."""

    ACCEPTED = "accepted"
    HANDSHAKE = "handshake"  # TLS, verification and the allow rules, under the handshake timeout
    IDENTIFY = "identify"  # who the verified client is; a resumed session gets its identity back
    CONNECT = "connect"  # the backend, under its connect timeout, and the PROXY header
    FORWARD = "forward"  # bytes both ways, under the idle timeout


# The one phase each may be followed by.
_NEXT: dict[Phase, Phase] = {
    Phase.ACCEPTED: Phase.HANDSHAKE,
    Phase.HANDSHAKE: Phase.IDENTIFY,
    Phase.IDENTIFY: Phase.CONNECT,
    Phase.CONNECT: Phase.FORWARD,
}


class PhaseError(RuntimeError):
    """A phase entered out of order: a bug in the caller, never the client's doing."""


class Outcome(enum.StrEnum):
    """The access log's ``outcome``."""

    OK = "ok"
    HANDSHAKE_FAILED = "handshake_failed"  # the reason is a proxy.tls.classify.Reason
    BACKEND_FAILED = "backend_failed"
    ERROR = "error"


class Failure(enum.StrEnum):
    """The access log's ``reason`` for a connection that failed after its handshake."""

    BACKEND_CONNECT = "backend_connect"
    PROXY_PROTOCOL = "proxy_protocol"  # the PROXY header could not be built: fail closed


@dataclass(slots=True)
class AccessLine:
    """Everything the access-log line reports, filled in as phases pass."""

    outcome: Outcome = Outcome.OK
    reason: Reason | Failure | None = None
    detail: str | None = None
    version: str | None = None
    cipher: str | None = None
    resumed: bool | None = None
    alpn: str | None = None
    identity: PeerIdentity | None = None
    handshake_seconds: float | None = None
    ended_by: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    streams: int | None = None  # HTTP/2: the streams the client opened

    def failed(self, outcome: Outcome, reason: Reason | Failure, detail: str) -> None:
        self.outcome, self.reason, self.detail = outcome, reason, detail

    def fields(self, listener: str, client: str, elapsed: float) -> dict[str, object]:
        fields: dict[str, object] = {
            "listener": listener,
            "client": client,
            "outcome": self.outcome,
            "reason": self.reason,
            "detail": self.detail,
            "tls_version": self.version,
            "cipher": self.cipher,
            "resumed": self.resumed,
            "alpn": self.alpn,
        }
        if self.identity is not None:
            fields.update({f"client_{k}": v for k, v in self.identity.log_fields().items()})
        fields.update(
            {
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "ended_by": self.ended_by,
                "streams": self.streams,
                "handshake_ms": None if self.handshake_seconds is None else round(self.handshake_seconds * 1000, 3),
                "duration_ms": round(elapsed * 1000, 3),
            }
        )
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class ListenerRuntime:
    """What a listener's connections need; ``tls`` is swapped on reload."""

    config: ListenerConfig
    tls: ServerTLS
    metrics: ListenerMetrics
    forwarder: ListenerForwarder = field(init=False)
    # Set when the listener starts draining: HTTP/2 clients get a GOAWAY, so they open no new streams.
    draining: trio.Event = field(init=False, default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.forwarder = forwarder_for(self.config, self.metrics)


# ---- the connection ------------------------------------------------------------------------------------------------


def handle_connection(transport: SocketStream, rt: ListenerRuntime) -> Coroutine[Any, Any, None]:
    """Serve one accepted client to the end; never raises (an unexpected error is logged and counted).

    Hands back the connection's coroutine rather than being one, for the same reason as Forwarder.forward.
    """
    return Connection(transport, rt).run()


class Connection:
    """One accepted client, from its first byte to its access-log line."""

    # Thousands of connections can sit idle at once: no per-instance dict.
    __slots__ = ("_handshake_seconds", "_session", "client", "line", "peer", "phase", "rt", "started", "tls",
                 "transport")

    def __init__(self, transport: trio.abc.Stream, rt: ListenerRuntime) -> None:
        self.started = trio.current_time()
        self.rt = rt
        self.tls = rt.tls  # the generation current at accept; a reload does not touch us
        self.phase = Phase.ACCEPTED
        self.line = AccessLine()
        self.transport = transport
        self.peer = _peer_address(transport)  # read at accept: once the client is gone its socket no longer knows
        self.client = _address_text(self.peer)
        self._session: tuple[TLSStream, HandshakeRecord] | None = None
        self._handshake_seconds = 0.0

    @property
    def stream(self) -> TLSStream:
        return self._open()[0]

    @property
    def record(self) -> HandshakeRecord:
        """What the verify callback saw: the client's identity, or why it was refused."""
        return self._open()[1]

    def _open(self) -> tuple[TLSStream, HandshakeRecord]:
        if self._session is None:
            # Made on first use rather than in __init__, so that OpenSSL failing to make a session is one more
            # error run() counts and logs.
            conn, record = self.tls.new_connection()
            # A socket buffers (no need to hold the session tickets back), and OpenSSL can drive it itself.
            stream = TLSStream(self.transport, conn, delay_session_tickets=False, handshake_on_socket=True)
            self._session = stream, record
        return self._session

    def _enter(self, phase: Phase) -> None:
        if _NEXT.get(self.phase) is not phase:
            raise PhaseError(f"the {phase} phase cannot follow the {self.phase} phase")
        self.phase = phase

    async def run(self) -> None:
        """All the phases, then close and log."""
        m = self.rt.metrics
        m.connections.inc()
        m.active.inc()
        try:
            await self._serve()
        except Exception as exc:  # a bug: log it, never let it reach the server
            self.line.failed(Outcome.ERROR, Reason.OTHER, f"{type(exc).__name__}: {exc}")
            log.exception("connection from %s failed unexpectedly", self.client)
        finally:
            await self.close()
            m.active.dec()
            elapsed = trio.current_time() - self.started
            m.connection_duration.observe(elapsed)
            self.log(elapsed)

    async def _serve(self) -> None:
        if not await self.handshake():
            return
        self.identify()
        forwarder = self.rt.forwarder.choose(self)  # HTTP mode: h2 or HTTP/1.1, as ALPN decided
        if forwarder.opens_backends is True:
            # HTTP/2: the relay opens its backend connections as the client's streams need them, and answers a
            # backend that cannot be reached on each stream.
            self._enter(Phase.CONNECT)
            self._enter(Phase.FORWARD)
            try:
                self.forwarded(await forwarder.relay(self, self.open_backend))
            except trio.Cancelled:
                self.line.ended_by = CANCELLED
                raise
            return
        backend = await self.connect(forwarder)
        if backend is None:
            return
        try:
            result = await self.forward(forwarder, backend)  # not nested in a coroutine of ours: see Forwarder
        except trio.Cancelled:
            self.line.ended_by = CANCELLED  # the drain deadline passed, or the process is stopping
            raise
        finally:
            backend.close()
        self.forwarded(result)

    async def handshake(self) -> bool:
        """The TLS handshake, verification and the allow rules, under one deadline; a failure is counted here."""
        self._enter(Phase.HANDSHAKE)
        stream, record = self.stream, self.record
        started = trio.current_time()
        failure: HandshakeFailure | None = None
        try:
            with trio.fail_after(self.rt.config.timeouts.handshake * (1 + HANDSHAKE_JITTER * random.random())):
                await stream.do_handshake()
        except Exception as exc:  # trio.Cancelled is not an Exception: shutdown passes through
            failure = classify(exc, record, stream.first_bytes)
        elapsed = self.line.handshake_seconds = self._handshake_seconds = trio.current_time() - started
        if failure is None:
            return True
        self.line.identity = record.identity or _rejected_identity(record)
        self.line.failed(Outcome.HANDSHAKE_FAILED, failure.reason, failure.detail)
        m = self.rt.metrics
        m.handshake_failed(failure.reason, elapsed)
        if stream.resumed:  # OpenSSL took the session; the resumption check refused it, or the client left
            m.resumption_failed(failure.reason)
        return False

    def identify(self) -> None:
        """Who the client is, now that the handshake passed; count the handshake's success."""
        self._enter(Phase.IDENTIFY)
        stream, record, line = self.stream, self.record, self.line
        if stream.resumed:
            self._identify_resumed()
        elif record.identity is not None:
            record.identity = self.tls.remember(record.identity)
        record.release_certificates()
        line.identity = record.identity
        line.version, line.cipher, line.resumed, line.alpn = (
            stream.version, stream.cipher, stream.resumed, stream.alpn_protocol)
        m = self.rt.metrics
        m.handshake_succeeded(self._handshake_seconds, version=line.version, cipher=line.cipher or "",
                              resumed=line.resumed, presented=record.identity is not None)
        if record.identity is not None:
            m.client_certificate_remaining.observe(max(0.0, record.identity.remaining_seconds(datetime.now(UTC))))

    def _identify_resumed(self) -> None:
        """Give a resumed session its identity back; it skipped verification.

        No need to authorize again: a session resumes only under the Context that
        established it (a reload builds a new Context, whose new session keys
        cannot open older sessions), and there it passed verification and the
        same allow rules. Nor has its certificate expired since: the resumption
        check (tls/resumption.py) refused that handshake already. The identity
        with the whole chain comes from the Context's cache; if it was evicted,
        the leaf alone still names the client.
        """
        record = self.record
        if record.identity is not None or self.tls.client_auth == "none":
            return
        sha256 = self.stream.peer_certificate_sha256()
        if sha256 is None:
            return  # optional mode, anonymous client
        record.identity = self.tls.recall(sha256)
        if record.identity is None and (cert := self.stream.peer_certificate()) is not None:
            record.identity = identity_from_cert(cert)

    async def connect(self, forwarder: Forwarder) -> SocketStream | None:
        """The backend, with the PROXY header sent if the listener wants one; None once a failure is counted."""
        self._enter(Phase.CONNECT)
        cfg = self.rt.config.backend
        header = b""
        if cfg.proxy_protocol:
            try:
                header = self.proxy_header()
            except ValueError as exc:  # e.g. a client certificate too large for the header
                self.line.failed(Outcome.ERROR, Failure.PROXY_PROTOCOL, str(exc))
                return None
        try:
            backend = await self.open_backend()
        except BackendError as exc:
            self.line.failed(Outcome.BACKEND_FAILED, Failure.BACKEND_CONNECT, str(exc))
            await forwarder.backend_unreachable(self, timed_out=exc.timed_out)
            return None
        if header:
            try:
                await backend.send_all(header)
            except BaseException:
                backend.close()
                raise
        return backend

    def forward(self, forwarder: Forwarder, backend: SocketStream) -> Awaitable[PumpResult]:
        """The forwarder, between the client and ``backend``.

        Hands back the forwarder's coroutine, as Forwarder.forward does: _serve() awaits it.
        """
        self._enter(Phase.FORWARD)
        return forwarder.forward(self, backend)

    async def open_backend(self) -> SocketStream:
        """A backend connection, its connect time observed; a failure is counted (and recorded for /status), then
        raised. ``connect`` uses it, and so does a forwarder that opens its own (HTTP/2)."""
        cfg = self.rt.config.backend
        started = trio.current_time()
        try:
            backend = await connect_backend(cfg.address, cfg.connect_timeout)
        except BackendError as exc:
            self.rt.metrics.backend_failed(str(exc))
            raise
        self.rt.metrics.backend_connect_duration.observe(trio.current_time() - started)
        return backend

    def forwarded(self, result: PumpResult) -> None:
        """Record how forwarding ended."""
        if result.backend_cut:
            # What reached the client may be cut short: end its side without close_notify.
            self.stream.forgo_close_notify()
        line = self.line
        line.ended_by, line.bytes_up, line.bytes_down = result.ended_by, result.bytes_up, result.bytes_down

    async def close(self) -> None:
        """Close the client's side: close_notify if we can, within CLOSE_TIMEOUT; at once when cancelled."""
        if self._session is not None and self.stream.handed_over:
            return  # the data plane's relay closed it (forward_on_plane)
        cancelled = trio.current_effective_deadline() == -math.inf  # a drain's deadline passed, say
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True  # closing must happen even when we are cancelled
            if cancelled:
                scope.cancel()  # but then without close_notify: just close the socket
            if self._session is None:
                await self.transport.aclose()
            else:
                await self.stream.aclose()

    def log(self, elapsed: float) -> None:
        level = logging.INFO if self.line.outcome is Outcome.OK else logging.WARNING
        if not ACCESS.isEnabledFor(level):
            return  # e.g. log.level: warning: the line is dropped, so do not build it
        ACCESS.log(level, "connection closed", extra={"fields": self.line.fields(self.rt.config.name, self.client,
                                                                                  elapsed)})

    # ---- what the backend is told about the client ------------------------------------------------------------------

    def client_host(self) -> str:
        """The client's IP address, for the HTTP relay's headers."""
        return self.peer[0] if isinstance(self.peer, tuple) else ""

    def proxy_header(self) -> bytes:
        """The PROXY protocol header that tells a TCP backend who the client is."""
        stream, cfg = self.stream, self.rt.config.backend
        source, destination = self.peer, stream.local_address()
        if not (isinstance(source, tuple) and isinstance(destination, tuple)):
            raise ValueError("the client is not connected over TCP")
        if cfg.proxy_protocol == "v1":
            return proxyproto.encode_v1(source, destination)
        identity = self.record.identity
        leaf = stream.peer_certificate() if identity is not None else None
        tls = proxyproto.TLSInfo(
            version=stream.version,
            cipher=stream.cipher,
            sni=stream.server_name,
            alpn=stream.alpn_protocol,
            client_cert_presented=identity is not None,
            client_cert_verified=True,  # we only get here after verification passed
            common_name=identity.common_names[0] if identity and identity.common_names else None,
            client_cert_der=leaf.public_bytes(serialization.Encoding.DER) if leaf is not None else None,
        )
        return proxyproto.encode_v2(source, destination, tls, include_cert=cfg.proxy_protocol_client_cert)


def _peer_address(transport: trio.abc.Stream) -> tuple[str, int] | str | None:
    """The client's address: (host, port) over TCP, a path over a Unix socket; None if unknown."""
    if not isinstance(transport, SocketStream):
        return None
    addr = transport.peer_address
    if addr is None:
        try:
            addr = transport.socket.getpeername()
        except OSError:
            return None
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    return addr.decode("utf-8", "replace") if isinstance(addr, bytes) else str(addr)


def _address_text(peer: tuple[str, int] | str | None) -> str:
    """The client's address for the log."""
    if peer is None:
        return "unknown"
    return str(TCPAddress(peer[0], peer[1])) if isinstance(peer, tuple) else peer or "unix"


def _rejected_identity(record: HandshakeRecord) -> PeerIdentity | None:
    """The identity of a certificate that failed verification, for the log."""
    if record.leaf is None:
        return None
    try:
        return identity_from_cert(record.leaf)
    except Exception:
        return None
