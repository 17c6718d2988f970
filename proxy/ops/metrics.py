"""Every metric the proxy exports, defined in one place on an injected registry.

The names and labels are a public contract: the Grafana dashboard and the
alert rules in deploy/ query them, and so do operators' own. Extend, never
rename. Tests build a fresh ``CollectorRegistry`` each, so nothing here is
global.

Per-listener children are resolved once (``ListenerMetrics``), so the hot path
does an attribute lookup and an ``inc()``, not a label lookup. Every failure
reason is created at zero up front: ``rate()`` and alert rules then work from
the first scrape, before the first failure of that kind.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.metrics_core import Metric

from proxy import __version__
from proxy.config.materials import ListenerMaterials
from proxy.tls.classify import REASONS

PREFIX = "mtls_proxy_"


# prometheus_client's multiprocess helpers carry no annotations; these are the signatures relied on here.
_get_value_class: Callable[[], object] = values.get_value_class
_merge: Callable[..., Iterable[Metric]] = multiprocess.MultiProcessCollector.merge


def _openssl_version() -> str:
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


# Handshakes take ~1 ms on loopback and up to the handshake timeout (10 s by
# default) when a client stalls.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONNECT_BUCKETS = HANDSHAKE_BUCKETS
# Connections last from milliseconds (one request) to hours (streams).
CONNECTION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# Remaining validity of client certificates: hours to two years, with the
# steps where alerting usually happens (1, 3, 7, 14, 30 days).
_HOUR, _DAY = 3600.0, 86400.0
REMAINING_BUCKETS = (_HOUR, 6 * _HOUR, _DAY, 3 * _DAY, 7 * _DAY, 14 * _DAY, 30 * _DAY, 60 * _DAY, 90 * _DAY,
                     180 * _DAY, 365 * _DAY, 730 * _DAY)


class Metrics:
    """The metric families, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        L = ("listener",)
        self.handshakes = Counter(
            PREFIX + "handshakes", "TLS handshakes by result (authorization included).", (*L, "result"), registry=r
        )
        self.handshake_failures = Counter(
            PREFIX + "handshake_failures", "Failed handshakes by reason.", (*L, "reason"), registry=r
        )
        self.resumption_failures = Counter(
            PREFIX + "resumption_failures",
            "Handshakes that resumed a session and failed, by reason (expired: the client certificate behind the "
            "session has expired since, and the proxy refused the resumption).",
            (*L, "reason"),
            registry=r,
        )
        self.handshake_duration = Histogram(
            PREFIX + "handshake_duration_seconds",
            "Time from accept to a verified, authorized client (or to the failure).",
            (*L, "result"),
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.tls_sessions = Counter(
            PREFIX + "tls_sessions",
            "Successful handshakes by negotiated version, cipher and resumption.",
            (*L, "version", "cipher", "resumed"),
            registry=r,
        )
        self.client_certificates = Counter(
            PREFIX + "client_certificates",
            "Successful handshakes by whether the client presented a certificate.",
            (*L, "presented"),
            registry=r,
        )
        # multiprocess_mode matters only with worker processes (see
        # enable_multiprocess): open connections add up over live workers;
        # the informational gauges take the most recent value any wrote.
        self.active_connections = Gauge(
            PREFIX + "active_connections", "Client connections currently open.", L, registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter(PREFIX + "connections", "Client connections accepted.", L, registry=r)
        self.connection_duration = Histogram(
            PREFIX + "connection_duration_seconds",
            "Lifetime of client connections, accept to close.",
            L,
            buckets=CONNECTION_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            PREFIX + "bytes", "Decrypted bytes forwarded, by direction.", (*L, "direction"), registry=r
        )
        self.backend_connect_failures = Counter(
            PREFIX + "backend_connect_failures", "Backend connections that failed or timed out.", L, registry=r
        )
        self.backend_connect_duration = Histogram(
            PREFIX + "backend_connect_duration_seconds",
            "Time to connect to the backend.",
            L,
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.certificate_expiry = Gauge(
            PREFIX + "certificate_expiry_timestamp_seconds",
            "notAfter of the loaded server certificate and trusted CAs, as a Unix timestamp.",
            (*L, "role", "subject"),
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.crl_next_update = Gauge(
            PREFIX + "crl_next_update_timestamp_seconds",
            "nextUpdate of each loaded CRL, as a Unix timestamp (past it, OpenSSL rejects the CA's clients).",
            (*L, "issuer"),
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.client_certificate_remaining = Histogram(
            PREFIX + "client_certificate_remaining_seconds",
            "Remaining validity of the client certificates of successful handshakes.",
            L,
            buckets=REMAINING_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests forwarded to the backend (backend protocol: http), by the client's HTTP version: http/1.1 "
            "or h2 (one per stream).",
            (*L, "protocol"),
            registry=r,
        )
        self.http2_contained = Counter(
            PREFIX + "http2_contained",
            "HTTP/2 connections ended with GOAWAY because the client attacked: rapid_reset (CVE-2023-44487), "
            "continuation_flood (CVE-2024-27316), header_list_too_large, settings_flood, ping_flood.",
            (*L, "attack"),
            registry=r,
        )
        self.http2_active_streams = Gauge(
            PREFIX + "http2_active_streams",
            "HTTP/2 streams open now, over all the HTTP/2 connections of a listener.",
            L,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.http_responses = Counter(
            PREFIX + "http_responses",
            "HTTP responses sent to clients by status code, the proxy's own errors included (protocol: http).",
            (*L, "code"),
            registry=r,
        )
        self.reloads = Counter(PREFIX + "reloads", "Certificate and configuration reloads.", ("result",), registry=r)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        self.last_reload_success = Gauge(
            PREFIX + "last_reload_success_timestamp_seconds",
            "When the configuration and its certificates were last loaded successfully (start-up counts), as a Unix "
            "timestamp.",
            registry=r,
            multiprocess_mode="mostrecent",
        )

        # The usual *_build_info idiom: a constant 1 whose labels say what is running, so a dashboard or an
        # alert can tell versions apart during a rollout.
        self.build_info = Gauge(
            PREFIX + "build_info",
            "Always 1; the labels name the running mtls-proxy version and the OpenSSL it is linked with.",
            ("version", "openssl"),
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(version=__version__, openssl=_openssl_version()).set(1)

    def for_listener(self, name: str) -> ListenerMetrics:
        return ListenerMetrics(self, name)


def enable_multiprocess(directory: str) -> None:
    """Make metrics created from now on live in shared files under
    ``directory``, so one admin endpoint can serve the sum over worker
    processes (prometheus_client's multiprocess mode)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus_client picks its value class when first imported; metrics
    # look it up on creation, so switching it here is enough.
    values.ValueClass = _get_value_class()


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every worker's files (for the admin process)."""
    registry = CollectorRegistry()
    registry.register(_WorkerFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    return registry


class _WorkerFiles:
    """prometheus_client's multiprocess collector, safe against workers that start and exit during a scrape.

    Its own ``collect`` lists the files, then reads each. A worker that starts creates its files empty and sizes
    them a moment later; one that exits has its gauge files deleted by the supervisor (``proxy.daemon.workers``).
    Either, between the listing and the reading, failed the whole scrape with a 500. So an empty file is left for
    the next scrape, and a listing that names a deleted file is taken again.
    """

    ATTEMPTS = 3

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        for _ in range(self.ATTEMPTS - 1):
            with contextlib.suppress(FileNotFoundError):
                return self._collect()
        return self._collect()

    def _collect(self) -> list[Metric]:
        files = [str(path) for path in self._directory.glob("*.db") if _nonempty(path)]
        return list(_merge(files, accumulate=True))


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


class ListenerMetrics:
    """The children of one listener, resolved once."""

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self.family = metrics
        self.listener = listener
        m = metrics
        self.handshake_success = m.handshakes.labels(listener, "success")
        self.handshake_failure = m.handshakes.labels(listener, "failure")
        # Keyed by str: a Reason is a str, and its value finds the same entry.
        self.failures: dict[str, Counter] = {reason: m.handshake_failures.labels(listener, reason)
                                             for reason in REASONS}
        self.handshake_duration_success = m.handshake_duration.labels(listener, "success")
        self.handshake_duration_failure = m.handshake_duration.labels(listener, "failure")
        self.cert_presented = m.client_certificates.labels(listener, "true")
        self.cert_absent = m.client_certificates.labels(listener, "false")
        self.active = m.active_connections.labels(listener)
        self.connections = m.connections.labels(listener)
        self.connection_duration = m.connection_duration.labels(listener)
        self.bytes_up = m.bytes.labels(listener, "client_to_backend")
        self.bytes_down = m.bytes.labels(listener, "backend_to_client")
        self.backend_failures = m.backend_connect_failures.labels(listener)
        # For /status: the counter says how often, this says what the last failure was and when.
        self.last_backend_failure: BackendFailure | None = None
        self.backend_connect_duration = m.backend_connect_duration.labels(listener)
        self.client_certificate_remaining = m.client_certificate_remaining.labels(listener)
        self.resumption_failures: dict[str, Counter] = {
            reason: m.resumption_failures.labels(listener, reason) for reason in REASONS
        }
        self.recent = RecentFailures()
        self.http_requests = m.http_requests.labels(listener, "http/1.1")
        self.http2_requests = m.http_requests.labels(listener, "h2")
        self.http2_active_streams = m.http2_active_streams.labels(listener)
        self._http2_contained: dict[str, Counter] = {}
        self._http_responses: dict[int, Counter] = {}
        self._sessions: dict[tuple[str, str, bool], Counter] = {}

    def handshake_failed(self, reason: str, seconds: float) -> None:
        self.handshake_failure.inc()
        self.failures[reason].inc()
        self.handshake_duration_failure.observe(seconds)
        self.recent.add(reason)

    def resumption_failed(self, reason: str) -> None:
        """A handshake that failed after OpenSSL had accepted the client's session (also counted as failed)."""
        self.resumption_failures[reason].inc()

    def handshake_succeeded(self, seconds: float, *, version: str, cipher: str, resumed: bool, presented: bool) -> None:
        self.handshake_success.inc()
        self.handshake_duration_success.observe(seconds)
        key = (version, cipher, resumed)
        child = self._sessions.get(key)
        if child is None:
            child = self.family.tls_sessions.labels(self.listener, version, cipher, "true" if resumed else "false")
            self._sessions[key] = child
        child.inc()
        (self.cert_presented if presented else self.cert_absent).inc()

    def backend_failed(self, detail: str) -> None:
        """A backend connect failed or timed out; ``detail`` says how (it becomes /status's last error)."""
        self.backend_failures.inc()
        self.last_backend_failure = BackendFailure(time.time(), detail)

    def http2_attack_contained(self, attack: str) -> None:
        child = self._http2_contained.get(attack)
        if child is None:
            child = self._http2_contained[attack] = self.family.http2_contained.labels(self.listener, attack)
        child.inc()

    def http_response(self, status: int) -> None:
        child = self._http_responses.get(status)
        if child is None:
            child = self._http_responses[status] = self.family.http_responses.labels(self.listener, str(status))
        child.inc()

    def publish_materials(self, materials: ListenerMaterials) -> None:
        """Expiry of the loaded certificates and CRLs, replacing the previous set."""
        expiry = self.family.certificate_expiry
        _remove_listener_children(expiry, self.listener)
        leaf = materials.server.leaf
        expiry.labels(self.listener, "server", leaf.subject.rfc4514_string()).set(_ts(leaf.not_valid_after_utc))
        for ca in materials.trusted_ca:
            expiry.labels(self.listener, "trusted_ca", ca.subject.rfc4514_string()).set(_ts(ca.not_valid_after_utc))
        next_update = self.family.crl_next_update
        _remove_listener_children(next_update, self.listener)
        for crl in materials.crls:
            if crl.next_update_utc is not None:
                next_update.labels(self.listener, crl.issuer.rfc4514_string()).set(_ts(crl.next_update_utc))

    def withdraw_materials(self) -> None:
        """The listener is gone (a reload removed it): its certificates and CRLs no longer expire anywhere.

        Only in this process's registry: in worker mode the supervisor drops a retired worker's gauge files
        instead (proxy.daemon.workers), since a multiprocess gauge forgets nothing it wrote.
        """
        _remove_listener_children(self.family.certificate_expiry, self.listener)
        _remove_listener_children(self.family.crl_next_update, self.listener)


class BackendFailure(NamedTuple):
    """The last failed backend connect of a listener: when (Unix time) and what the connect said."""

    time: float
    error: str


class RecentFailures:
    """Handshake failures of the last few minutes by reason, for /status.

    Prometheus has the full history; this answers "why are clients being
    refused right now?" without a query. Memory is bounded: past ``limit``
    entries the oldest are dropped (the counts then say "at least").
    """

    def __init__(self, window: float = 300.0, limit: int = 10_000) -> None:
        self.window = window
        self._events: deque[tuple[float, str]] = deque(maxlen=limit)

    def add(self, reason: str) -> None:
        self._events.append((time.monotonic(), reason))

    def counts(self) -> dict[str, int]:
        cutoff = time.monotonic() - self.window
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()
        out: dict[str, int] = {}
        for _, reason in self._events:
            out[reason] = out.get(reason, 0) + 1
        return out


def _ts(when: datetime) -> float:
    return when.timestamp()


def _remove_listener_children(gauge: Gauge, listener: str) -> None:
    # prometheus_client keeps children in a private dict; collect() is the
    # public way to enumerate them.
    label_names = None
    stale = []
    for family in gauge.collect():
        for sample in family.samples:
            if sample.labels.get("listener") == listener:
                label_names = label_names or list(sample.labels)
                stale.append(tuple(sample.labels[name] for name in label_names))
    for labels in stale:
        gauge.remove(*labels)
