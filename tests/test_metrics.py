"""proxy.ops.metrics on its own: the families and their labels (a public contract: dashboards, alert rules and the
README name them), the series created up front, what each recording method counts, build_info, the replacement of
a listener's certificate series, and multiprocess mode (worker processes) in a temporary folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, values

from proxy import __version__
from proxy.config.materials import ListenerMaterials, load_all
from proxy.config.schema import parse
from proxy.ops import metrics as metrics_module
from proxy.ops.metrics import PREFIX, ListenerMetrics, Metrics
from proxy.tls.classify import REASONS
from tests.conftest import listener_config

REPO = Path(__file__).resolve().parent.parent
L = "listener"

# Extend, never rename: every family here must stay, with this type and these labels. New families may be added.
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "handshakes": ("counter", {L, "result"}),
    "handshake_failures": ("counter", {L, "reason"}),
    "resumption_failures": ("counter", {L, "reason"}),
    "handshake_duration_seconds": ("histogram", {L, "result"}),
    "tls_sessions": ("counter", {L, "version", "cipher", "resumed"}),
    "client_certificates": ("counter", {L, "presented"}),
    "active_connections": ("gauge", {L}),
    "connections": ("counter", {L}),
    "connection_duration_seconds": ("histogram", {L}),
    "bytes": ("counter", {L, "direction"}),
    "backend_connect_failures": ("counter", {L}),
    "backend_connect_duration_seconds": ("histogram", {L}),
    "certificate_expiry_timestamp_seconds": ("gauge", {L, "role", "subject"}),
    "crl_next_update_timestamp_seconds": ("gauge", {L, "issuer"}),
    "client_certificate_remaining_seconds": ("histogram", {L}),
    "http_requests": ("counter", {L, "protocol"}),
    "http2_active_streams": ("gauge", {L}),
    "http2_contained": ("counter", {L, "attack"}),
    "http_responses": ("counter", {L, "code"}),
    "reloads": ("counter", {"result"}),
    "last_reload_success_timestamp_seconds": ("gauge", set()),
    "build_info": ("gauge", {"version", "openssl"}),
}

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}


def load_materials(test_pki, **overrides) -> ListenerMaterials:
    config = parse({"listeners": [listener_config(test_pki, "127.0.0.1:1", **overrides)]}, source="test")
    return load_all(config)[0]


def exercised(test_pki) -> Metrics:
    """Metrics with a listener that has recorded one of everything, so every family has series."""
    metrics = Metrics(CollectorRegistry())
    m = metrics.for_listener("api")
    m.publish_materials(load_materials(test_pki, client_auth={"crl": None}))
    m.handshake_succeeded(0.01, version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", resumed=False, presented=True)
    m.handshake_failed("expired", 0.02)
    m.resumption_failed("expired")
    m.http_response(200)
    m.http2_attack_contained("rapid_reset")
    m.client_certificate_remaining.observe(86400)
    metrics.crl_next_update.labels("api", "CN=Test Client CA,O=Acme").set(1)
    return metrics


def families(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for family in registry.collect():
        labels = {name for sample in family.samples for name in sample.labels if name != "le"}
        out[family.name.removeprefix(PREFIX)] = (family.type, labels)
    return out


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(PREFIX + name, labels)


# ---- the contract ------------------------------------------------------------------------------------------------


def test_every_family_of_the_contract_is_there_with_its_type_and_labels(test_pki):
    found = families(exercised(test_pki).registry)
    for name, (kind, labels) in CONTRACT.items():
        assert name in found, f"{PREFIX}{name} is gone (renamed?)"
        assert found[name] == (kind, labels), name
    assert all(family.name.startswith(PREFIX) for family in Metrics(CollectorRegistry()).registry.collect())


def referenced_names() -> dict[str, set[str]]:
    """Every ``mtls_proxy_*`` name the README, the Grafana dashboard and the alert rules use, by file."""
    out: dict[str, set[str]] = {}
    files = [REPO / "README.md", *sorted((REPO / "deploy/grafana").glob("*.json")),
             *sorted((REPO / "deploy/prometheus").glob("*.yaml"))]
    for path in files:
        text = path.read_text()
        names = set(re.findall(r"\b(mtls_proxy_[a-z0-9_]+)", text))
        if path.name == "README.md":  # the metrics table gives names without the prefix
            names |= {PREFIX + short for short in re.findall(r"^\| `([a-z0-9_]+)` \| (?:counter|gauge|histogram) \|",
                                                             text, re.MULTILINE)}
        out[str(path.relative_to(REPO))] = names
    return out


def test_every_name_the_readme_dashboards_and_alerts_use_is_exported():
    exported = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        exported.add(family.name)
        exported.update(family.name + suffix for suffix in SUFFIXES[family.type])
    referenced = referenced_names()
    assert referenced["deploy/grafana/mtls-proxy.json"] and referenced["deploy/prometheus/alerts.yaml"]
    assert len(referenced["README.md"]) >= len(CONTRACT)
    missing = {path: sorted(names - exported) for path, names in referenced.items() if names - exported}
    assert missing == {}


# ---- series and counting ---------------------------------------------------------------------------------------


def test_a_listeners_series_exist_at_zero_before_anything_happens():
    metrics = Metrics(CollectorRegistry())
    metrics.for_listener("api")
    r = metrics.registry
    for reason in REASONS:
        assert sample(r, "handshake_failures_total", listener="api", reason=reason) == 0, reason
        assert sample(r, "resumption_failures_total", listener="api", reason=reason) == 0, reason
    for result in ("success", "failure"):
        assert sample(r, "handshakes_total", listener="api", result=result) == 0
        assert sample(r, "handshake_duration_seconds_count", listener="api", result=result) == 0
        assert sample(r, "reloads_total", result=result) == 0
    for direction in ("client_to_backend", "backend_to_client"):
        assert sample(r, "bytes_total", listener="api", direction=direction) == 0
    for presented in ("true", "false"):
        assert sample(r, "client_certificates_total", listener="api", presented=presented) == 0
    for name in ("connections_total", "backend_connect_failures_total", "http2_active_streams"):
        assert sample(r, name, listener="api") == 0, name
    for protocol in ("http/1.1", "h2"):
        assert sample(r, "http_requests_total", listener="api", protocol=protocol) == 0
    assert sample(r, "active_connections", listener="api") == 0


def test_the_recording_methods_count_into_their_own_listeners_series():
    metrics = Metrics(CollectorRegistry())
    api, other = metrics.for_listener("api"), metrics.for_listener("other")
    r = metrics.registry
    api.handshake_failed("expired", 0.02)
    api.handshake_failed("expired", 0.03)
    api.handshake_failed("unknown_ca", 0.5)
    api.resumption_failed("expired")
    for resumed in (False, True, True):
        api.handshake_succeeded(0.001, version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", resumed=resumed,
                                presented=not resumed)
    api.http_response(200)
    api.http_response(200)
    api.http_response(502)

    assert sample(r, "handshake_failures_total", listener="api", reason="expired") == 2
    assert sample(r, "handshake_failures_total", listener="api", reason="unknown_ca") == 1
    assert sample(r, "handshakes_total", listener="api", result="failure") == 3
    assert sample(r, "handshake_duration_seconds_sum", listener="api", result="failure") == pytest.approx(0.55)
    assert sample(r, "resumption_failures_total", listener="api", reason="expired") == 1
    assert api.recent.counts() == {"expired": 2, "unknown_ca": 1}
    session = {"listener": "api", "version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"}
    assert sample(r, "tls_sessions_total", **session, resumed="false") == 1
    assert sample(r, "tls_sessions_total", **session, resumed="true") == 2
    assert sample(r, "client_certificates_total", listener="api", presented="true") == 1
    assert sample(r, "client_certificates_total", listener="api", presented="false") == 2
    assert sample(r, "http_responses_total", listener="api", code="200") == 2
    assert sample(r, "http_responses_total", listener="api", code="502") == 1
    assert sample(r, "handshakes_total", listener="other", result="failure") == 0
    assert other.recent.counts() == {}


def test_build_info_is_one_series_naming_the_version_and_the_linked_openssl():
    registry = Metrics(CollectorRegistry()).registry
    (family,) = [f for f in registry.collect() if f.name == PREFIX + "build_info"]
    (only,) = family.samples
    assert only.value == 1
    assert only.labels == {"version": __version__,
                           "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}
    assert re.search(r"\d+\.\d+\.\d+", only.labels["openssl"]), only.labels


def test_publishing_materials_replaces_that_listeners_certificate_series_only(test_pki):
    metrics = Metrics(CollectorRegistry())
    api, other = metrics.for_listener("api"), metrics.for_listener("other")
    r = metrics.registry
    client_ca, other_ca = "CN=Test Client CA,O=Acme", "CN=Other CA,O=Elsewhere"
    api.publish_materials(load_materials(test_pki))
    other.publish_materials(load_materials(test_pki))
    expiry = "certificate_expiry_timestamp_seconds"
    assert sample(r, expiry, listener="api", role="trusted_ca", subject=client_ca) is not None

    fresh = load_materials(test_pki, client_auth={"trusted_ca": str(test_pki.other_ca)})
    api.publish_materials(fresh)
    assert sample(r, expiry, listener="api", role="trusted_ca", subject=client_ca) is None  # gone, not stale
    assert sample(r, expiry, listener="api", role="trusted_ca", subject=other_ca) == \
        fresh.trusted_ca[0].not_valid_after_utc.timestamp()
    assert sample(r, expiry, listener="other", role="trusted_ca", subject=client_ca) is not None
    server = fresh.server.leaf
    assert sample(r, expiry, listener="api", role="server", subject=server.subject.rfc4514_string()) == \
        server.not_valid_after_utc.timestamp()


# ---- multiprocess mode -----------------------------------------------------------------------------------------


def test_multiprocess_mode_writes_to_the_folder_and_the_admin_registry_reads_it(tmp_path, monkeypatch):
    # Process-wide switches: put them back afterwards, so later tests get ordinary metrics.
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics_module.enable_multiprocess(str(tmp_path))

    worker = Metrics(CollectorRegistry())
    api: ListenerMetrics = worker.for_listener("api")
    api.connections.inc(3)
    api.active.inc(2)
    api.handshake_failed("forbidden", 0.01)
    worker.last_reload_success.set(1234.0)
    assert list(tmp_path.glob("*.db"))  # the values live in the folder's files, where the admin process reads them

    admin = metrics_module.multiprocess_registry()
    assert sample(admin, "connections_total", listener="api") == 3
    assert sample(admin, "active_connections", listener="api") == 2  # livesum: this process is alive
    assert sample(admin, "handshake_failures_total", listener="api", reason="forbidden") == 1
    assert sample(admin, "handshake_duration_seconds_count", listener="api", result="failure") == 1
    assert sample(admin, "last_reload_success_timestamp_seconds") == 1234.0
    assert sample(admin, "build_info", version=__version__,
                  openssl=SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()) == 1


def test_a_scrape_passes_over_the_files_of_a_worker_starting_or_exiting(tmp_path, monkeypatch):
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics_module.enable_multiprocess(str(tmp_path))
    Metrics(CollectorRegistry()).for_listener("api").connections.inc(3)
    (tmp_path / "counter_99999.db").touch()  # a starting worker has created its file but not yet sized it
    admin = metrics_module.multiprocess_registry()
    assert sample(admin, "connections_total", listener="api") == 3

    # An exiting worker's file deleted between the listing and the reading: the listing is taken again.
    doomed = tmp_path / "gauge_all_99998.db"
    doomed.write_bytes((tmp_path / f"counter_{os.getpid()}.db").read_bytes())
    real_merge = metrics_module._merge
    calls = []

    def merge_after_the_exit(files, accumulate=True):
        calls.append(files)
        if len(calls) == 1:
            doomed.unlink()
        return real_merge(files, accumulate=accumulate)

    monkeypatch.setattr(metrics_module, "_merge", merge_after_the_exit)
    assert sample(admin, "connections_total", listener="api") == 3
    assert str(doomed) in calls[0] and str(doomed) not in calls[1]


def test_after_multiprocess_mode_metrics_are_ordinary_again(tmp_path):
    # The test above restored the switches: a metric made now lives in this process only.
    assert values.ValueClass is values.MutexValue
    Metrics(CollectorRegistry()).for_listener("api").connections.inc()
    assert list(tmp_path.iterdir()) == []
