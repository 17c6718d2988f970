"""Certificate rotation in the real daemon process, the way Kubernetes does it:
the kubelet swaps a mounted Secret's `..data` symlink, and nobody sends a signal."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import pytest

from proxy.dev import pki
from tests.conftest import free_port, kubernetes_secret, served_fingerprint
from tests.conftest import poll_until as wait_until
from tests.test_daemon import Daemon

pytestmark = pytest.mark.slow


def client(server_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server_ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def secret_daemon(tmp_path, test_pki, threaded_echo_backend):
    server_ca = pki.make_ca("Secret Server CA")
    (tmp_path / "server-ca.crt").write_bytes(server_ca.cert_pem())
    secret = tmp_path / "secret"
    secret.mkdir()
    first = pki.make_server_cert(server_ca)
    kubernetes_secret(secret, "2026_11_28_01", first, test_pki.client_ca.read_bytes())
    config = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info", "format": "json"},
        "reload": {"watch_interval": 0.2},
        "listeners": [{
            "name": "k8s",
            "listen": f"127.0.0.1:{free_port()}",
            "tls": {"cert": str(secret / "tls.crt"), "key": str(secret / "tls.key")},
            "client_auth": {"mode": "require", "trusted_ca": str(secret / "ca.crt")},
            "backend": {"address": threaded_echo_backend},
        }],
    }
    daemon = Daemon(config, tmp_path).start()
    try:
        yield daemon, secret, server_ca, first
    finally:
        daemon.kill()


def test_secret_swap_rotates_server_cert_and_ca_bundle_under_live_traffic(secret_daemon, test_pki, tmp_path):
    daemon, secret, server_ca, first = secret_daemon
    port = daemon.port()
    alice = client(tmp_path / "server-ca.crt", test_pki.alice.cert, test_pki.alice.key)
    assert served_fingerprint(port, alice) == first.sha256

    # A client from a CA the bundle does not hold yet.
    new_ca = pki.make_ca("Second Client CA", organization="Acme")
    newcomer = pki.make_client_cert(new_ca, common_name="newcomer")
    (tmp_path / "n.crt").write_bytes(newcomer.chain_pem())
    (tmp_path / "n.key").write_bytes(newcomer.key_pem())
    newcomer_ctx = client(tmp_path / "server-ca.crt", tmp_path / "n.crt", tmp_path / "n.key")
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        served_fingerprint(port, newcomer_ctx)

    errors: list[str] = []
    served: set[str] = set()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                served.add(served_fingerprint(port, alice))
            except Exception as exc:  # any failure a client would see
                errors.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        rotated = pki.make_server_cert(server_ca)
        kubernetes_secret(secret, "2026_11_28_02", rotated, test_pki.client_ca.read_bytes() + new_ca.cert_pem())
        wait_until(lambda: daemon.sample("mtls_proxy_reloads_total", result="success") == 1, timeout=10,
                   what="the swap to be reloaded")
        wait_until(lambda: rotated.sha256 in served, timeout=5, what="live clients to see the new certificate")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert errors == []  # no client saw an error across the rotation
    assert served == {first.sha256, rotated.sha256}
    assert served_fingerprint(port, newcomer_ctx) == rotated.sha256  # the new CA is trusted now
    assert daemon.sample("mtls_proxy_certificate_expiry_timestamp_seconds", listener="k8s", role="trusted_ca",
                         subject="CN=Second Client CA,O=Acme") == new_ca.cert.not_valid_after_utc.timestamp()


def test_broken_secret_update_keeps_the_old_material_serving(secret_daemon, test_pki, tmp_path):
    daemon, secret, server_ca, first = secret_daemon
    port = daemon.port()
    alice = client(tmp_path / "server-ca.crt", test_pki.alice.cert, test_pki.alice.key)
    # A certificate with someone else's key: what a botched rotation looks like.
    mismatched = pki.Issued(cert=pki.make_server_cert(server_ca).cert, key=pki.make_server_cert(server_ca).key)
    kubernetes_secret(secret, "2026_11_28_02", mismatched, test_pki.client_ca.read_bytes())
    wait_until(lambda: daemon.sample("mtls_proxy_reloads_total", result="failure") == 1, timeout=10,
               what="the broken swap to be refused")
    assert served_fingerprint(port, alice) == first.sha256
    assert daemon.sample("mtls_proxy_reloads_total", result="success") == 0
    assert "reload failed" in daemon.stderr()
