"""One client connection: handshake -> identify -> authorize -> connect -> pump -> close.

Each phase has its own deadline: the handshake timeout covers accept to a
verified, authorized client; the backend connect has its own timeout; the pump
has the idle timeout. Whatever happens, the connection ends with both sockets
closed, the gauges back where they were, and exactly one access-log line.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime

import trio
from cryptography.hazmat.primitives import hashes, serialization

from proxy.config.schema import ListenerConfig, TCPAddress
from proxy.net.backend import BackendError, connect_backend
from proxy.net.sockstream import SocketStream
from proxy.ops.logs import ACCESS
from proxy.ops.metrics import ListenerMetrics
from proxy.policy.identity import PeerIdentity, identity_from_cert
from proxy.protocol import proxyproto
from proxy.protocol.http1 import HeaderPolicy, HttpRelay
from proxy.relay.http1_forwarder import HttpCounters, relay_http
from proxy.relay.tcp_forwarder import CHUNK_SIZE, PumpResult, pump
from proxy.tls.classify import classify
from proxy.tls.context import HandshakeRecord, ServerTLS
from proxy.tls.stream import TLSStream
import contextlib

log = logging.getLogger("proxy.relay.connection")

# How long closing may take (sending close_notify to a client that does not
# read, the lingering close after an alert or with the client's data unread):
# after this the socket is closed regardless, also when draining for shutdown.
CLOSE_TIMEOUT = 1.0
# A handshake gets its timeout plus up to this much more, at random. Connections accepted in one burst would
# otherwise time out together, and their closes (~140 us each) run in one turn of the scheduler: 1,500 of them
# stalled every other connection for 60-330 ms (bench/burst.py).
HANDSHAKE_JITTER = 0.1


@dataclass
class ListenerRuntime:
    """What a listener's connections need; ``tls`` is swapped on reload."""

    config: ListenerConfig
    tls: ServerTLS
    metrics: ListenerMetrics
    http_policy: HeaderPolicy | None = None

    def __post_init__(self) -> None:
        if self.config.backend.protocol == "http" and self.http_policy is None:
            backend = self.config.backend
            self.http_policy = HeaderPolicy(backend.identity_headers, upgrades=backend.upgrades)


@dataclass
class _Outcome:
    """Everything the access-log line reports, filled in as phases pass."""

    outcome: str = "ok"  # ok | handshake_failed | backend_failed | error
    reason: str | None = None
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


def _now() -> datetime:
    return datetime.now(UTC)


def _peer(stream: SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return str(TCPAddress(addr[0], addr[1])) if isinstance(addr, tuple) else str(addr) or "unix"


async def handle_connection(transport: SocketStream, rt: ListenerRuntime) -> None:
    m = rt.metrics
    started = trio.current_time()
    client = _peer(transport)
    tls = rt.tls  # the generation current at accept; a reload does not touch us
    closing: trio.abc.AsyncResource = transport
    out = _Outcome()
    m.connections.inc()
    m.active.inc()
    try:
        conn, record = tls.new_connection()
        stream = closing = TLSStream(transport, conn, delay_session_tickets=False)  # a socket has a buffer
        await _serve(stream, record, tls, rt, out)
    except Exception as exc:  # a bug: log it, never let it reach the server
        out.outcome, out.reason, out.detail = "error", "other", f"{type(exc).__name__}: {exc}"
        log.exception("connection from %s failed unexpectedly", client)
    finally:
        cancelled = trio.current_effective_deadline() == -math.inf  # a drain's deadline passed, say
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True  # closing must happen even when we are cancelled
            if cancelled:
                scope.cancel()  # but then without close_notify: just close the socket
            await closing.aclose()
        m.active.dec()
        elapsed = trio.current_time() - started
        m.connection_duration.observe(elapsed)
        _log_access(rt.config.name, client, out, elapsed)


async def _serve(stream: TLSStream, record: HandshakeRecord, tls: ServerTLS, rt: ListenerRuntime, out: _Outcome) -> None:
    if not await _handshake(stream, record, tls, rt, out):
        return
    cfg = rt.config
    header = b""
    if cfg.backend.proxy_protocol:
        try:
            header = _proxy_header(stream, record, cfg)
        except ValueError as exc:  # e.g. a client certificate too large for the header: fail closed
            out.outcome, out.reason, out.detail = "error", "proxy_protocol", str(exc)
            return
    backend = await _connect(stream, record, rt, out)
    if backend is None:
        return
    try:
        if header:
            await backend.send_all(header)
        result = await _forward(stream, backend, record, rt)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await backend.aclose()
    if result.backend_cut:
        stream.forgo_close_notify()
    out.ended_by, out.bytes_up, out.bytes_down = result.ended_by, result.bytes_up, result.bytes_down


async def _handshake(stream: TLSStream, record: HandshakeRecord, tls: ServerTLS, rt: ListenerRuntime, out: _Outcome) -> bool:
    """Handshake, verification and authorization under one deadline; count the outcome."""
    m = rt.metrics
    started = trio.current_time()
    try:
        with trio.fail_after(rt.config.timeouts.handshake * (1 + HANDSHAKE_JITTER * random.random())):
            await stream.do_handshake()
    except Exception as exc:  # trio.Cancelled is not an Exception: shutdown passes through
        failure = classify(exc, record, stream.first_bytes)
    else:
        failure = None
        if stream.resumed:
            _identify_resumed(stream, record, tls)
        elif record.identity is not None:
            record.identity = tls.remember(record.identity)
        record.release_certificates()
    elapsed = trio.current_time() - started
    out.handshake_seconds = elapsed
    out.identity = record.identity or _rejected_identity(record)
    if failure is not None:
        out.outcome, out.reason, out.detail = "handshake_failed", failure.reason, failure.detail
        m.handshake_failed(failure.reason, elapsed)
        if stream.resumed:  # OpenSSL took the session; the resumption check refused it, or the client left
            m.resumption_failed(failure.reason)
        return False
    out.version, out.cipher, out.resumed, out.alpn = stream.version, stream.cipher, stream.resumed, stream.alpn_protocol
    m.handshake_succeeded(
        elapsed, version=out.version, cipher=out.cipher or "", resumed=out.resumed, presented=record.identity is not None
    )
    if record.identity is not None:
        m.client_certificate_remaining.observe(max(0.0, record.identity.remaining_seconds(_now())))
    return True


async def _connect(stream: TLSStream, record: HandshakeRecord, rt: ListenerRuntime, out: _Outcome):
    """The backend stream, or None after counting (and, in HTTP mode, answering) the failure."""
    cfg = rt.config
    started = trio.current_time()
    try:
        backend = await connect_backend(cfg.backend.address, cfg.backend.connect_timeout)
    except BackendError as exc:
        rt.metrics.backend_failures.inc()
        out.outcome, out.reason, out.detail = "backend_failed", "backend_connect", str(exc)
        if cfg.backend.protocol == "http":
            await _answer_backend_failure(stream, _http_relay(stream, record, rt), rt, 504 if exc.timed_out else 502)
        return None
    rt.metrics.backend_connect_duration.observe(trio.current_time() - started)
    return backend


def _forward(stream: TLSStream, backend, record: HandshakeRecord, rt: ListenerRuntime) -> Awaitable[PumpResult]:
    # Not a coroutine itself: it hands back the relay's, so the relay's frames
    # are not nested one deeper for the life of the connection.
    m = rt.metrics
    idle = rt.config.timeouts.idle
    if rt.config.backend.protocol == "http":
        counters = HttpCounters(requests=m.http_requests.inc, status=m.http_response, up=m.bytes_up.inc,
                                down=m.bytes_down.inc)
        return relay_http(stream, backend, _http_relay(stream, record, rt), idle_timeout=idle, counters=counters)
    return pump(stream, backend, idle_timeout=idle, on_up=m.bytes_up.inc, on_down=m.bytes_down.inc)


def _http_relay(stream: TLSStream, record: HandshakeRecord, rt: ListenerRuntime) -> HttpRelay:
    policy = rt.http_policy
    leaf_der = None
    if policy.needs_leaf_der and record.identity is not None:
        leaf = stream.connection.get_peer_certificate(as_cryptography=True)
        leaf_der = leaf.public_bytes(serialization.Encoding.DER) if leaf is not None else None
    client_ip = stream.transport_stream.socket.getpeername()[0]
    return HttpRelay(policy, client_ip=client_ip, identity=record.identity, leaf_der=leaf_der)


async def _answer_backend_failure(stream: TLSStream, relay: HttpRelay, rt: ListenerRuntime, status: int) -> None:
    """Read the client's request (briefly), then answer it 502/504 as an HTTP proxy does."""
    with trio.move_on_after(rt.config.timeouts.handshake):
        try:
            data = await stream.receive_some(CHUNK_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        relay.from_client(data)
    step = relay.fail(status)
    for code in step.statuses:
        rt.metrics.http_response(code)
    if step.to_client:
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(step.to_client)


def _identify_resumed(stream: TLSStream, record: HandshakeRecord, tls: ServerTLS) -> None:
    """Give a resumed session its identity back; it skipped verification.

    No need to authorize again: a session resumes only under the Context that
    established it (a reload builds a new Context, whose new session keys
    cannot open older sessions), and there it passed verification and the
    same allow rules. Nor has its certificate expired since: the resumption
    check (tls/resumption.py) refused that handshake already. The identity
    with the whole chain comes from the Context's cache; if it was evicted,
    the leaf alone still names the client.
    """
    if record.identity is not None or tls.client_auth == "none":
        return
    cert = stream.connection.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return  # optional mode, anonymous client
    sha256 = cert.fingerprint(hashes.SHA256()).hex()
    record.identity = tls.recall(sha256) or identity_from_cert(cert)


def _proxy_header(stream: TLSStream, record: HandshakeRecord, cfg: ListenerConfig) -> bytes:
    """The PROXY protocol header that tells a TCP backend who the client is."""
    sock = stream.transport_stream.socket
    source, destination = sock.getpeername()[:2], sock.getsockname()[:2]
    if cfg.backend.proxy_protocol == "v1":
        return proxyproto.encode_v1(source, destination)
    identity = record.identity
    leaf = stream.connection.get_peer_certificate(as_cryptography=True) if identity is not None else None
    sni = stream.connection.get_servername()
    tls = proxyproto.TLSInfo(
        version=stream.version,
        cipher=stream.cipher,
        sni=sni.decode("idna") if sni else None,
        alpn=stream.alpn_protocol,
        client_cert_presented=identity is not None,
        client_cert_verified=True,  # we only get here after verification passed
        common_name=identity.common_names[0] if identity and identity.common_names else None,
        client_cert_der=leaf.public_bytes(serialization.Encoding.DER) if leaf is not None else None,
    )
    return proxyproto.encode_v2(source, destination, tls, include_cert=cfg.backend.proxy_protocol_client_cert)


def _rejected_identity(record: HandshakeRecord) -> PeerIdentity | None:
    """The identity of a certificate that failed verification, for the log."""
    if record.leaf is None:
        return None
    try:
        return identity_from_cert(record.leaf)
    except Exception:
        return None


def _log_access(listener: str, client: str, out: _Outcome, elapsed: float) -> None:
    level = logging.INFO if out.outcome == "ok" else logging.WARNING
    if not ACCESS.isEnabledFor(level):
        return  # e.g. log.level: warning: the line is dropped, so do not build it
    fields = {
        "listener": listener,
        "client": client,
        "outcome": out.outcome,
        "reason": out.reason,
        "detail": out.detail,
        "tls_version": out.version,
        "cipher": out.cipher,
        "resumed": out.resumed,
        "alpn": out.alpn,
    }
    if out.identity is not None:
        fields.update({f"client_{k}": v for k, v in out.identity.log_fields().items()})
    fields.update(
        {
            "bytes_up": out.bytes_up,
            "bytes_down": out.bytes_down,
            "ended_by": out.ended_by,
            "handshake_ms": None if out.handshake_seconds is None else round(out.handshake_seconds * 1000, 3),
            "duration_ms": round(elapsed * 1000, 3),
        }
    )
    fields = {k: v for k, v in fields.items() if v is not None}
    ACCESS.log(level, "connection closed", extra={"fields": fields})
