"""Operating the proxy: certificate rotation, broken rotations, Kubernetes
Secret updates, revocation, and what /status and the metrics say about them."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from proxy.dev import pki
from tests.conftest import client_context, exchange, kubernetes_secret, served_fingerprint, start_proxy, wait_for


def write_cred(cert_path: Path, key_path: Path, issued: pki.Issued) -> None:
    cert_path.write_bytes(issued.chain_pem())
    key_path.write_bytes(issued.key_pem())


@pytest.fixture
def server_ca():
    return pki.make_ca("Rotation Server CA")


@pytest.fixture
def rotation_dir(tmp_path, server_ca, test_pki):
    """Server credentials in files of their own, trusted via their own CA file."""
    d = tmp_path / "live"
    d.mkdir()
    write_cred(d / "server.crt", d / "server.key", pki.make_server_cert(server_ca))
    (d / "server-ca.crt").write_bytes(server_ca.cert_pem())
    shutil.copy(test_pki.client_ca, d / "client-ca.crt")
    return d


def rotation_client(test_pki, d: Path, cred=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "server-ca.crt"))
    cred = cred or test_pki.alice
    ctx.load_cert_chain(str(cred.cert), str(cred.key))
    return ctx


def rotation_overrides(d: Path) -> dict:
    return {
        "tls": {"cert": str(d / "server.crt"), "key": str(d / "server.key")},
        "client_auth": {"mode": "require", "trusted_ca": str(d / "client-ca.crt")},
    }


# ---- server certificate rotation ------------------------------------------------


async def test_server_certificate_rotates_under_live_traffic(nursery, test_pki, echo_backend, rotation_dir, server_ca):
    p = await start_proxy(nursery, test_pki, echo_backend.address, **rotation_overrides(rotation_dir))
    ctx = rotation_client(test_pki, rotation_dir)
    before = await trio.to_thread.run_sync(served_fingerprint, p.port, ctx)

    results: list = []
    stop = trio.Event()

    async def traffic():
        while not stop.is_set():
            results.append(await exchange(p.port, ctx, b"hello" * 100))

    async with trio.open_nursery() as clients:
        for _ in range(3):
            clients.start_soon(traffic)
        await trio.sleep(0.2)
        new = pki.make_server_cert(server_ca)
        write_cred(rotation_dir / "server.crt", rotation_dir / "server.key", new)
        assert p.proxy.reload_certificates()
        await trio.sleep(0.2)
        stop.set()

    assert len(results) > 6
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    after = await trio.to_thread.run_sync(served_fingerprint, p.port, ctx)
    assert before != after == new.sha256
    assert p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "success"}) == 1
    expiry = p.metric("mtls_proxy_certificate_expiry_timestamp_seconds", role="server", subject="CN=localhost")
    assert expiry == new.cert.not_valid_after_utc.timestamp()


async def test_broken_rotation_keeps_the_old_certificate_serving(nursery, test_pki, echo_backend, rotation_dir):
    p = await start_proxy(nursery, test_pki, echo_backend.address, admin=True, **rotation_overrides(rotation_dir))
    ctx = rotation_client(test_pki, rotation_dir)
    before = await trio.to_thread.run_sync(served_fingerprint, p.port, ctx)

    # A key that does not match the certificate (a rotation caught half-way).
    (rotation_dir / "server.key").write_bytes(pki.make_server_cert(pki.make_ca("Other")).key_pem())
    assert not p.proxy.reload_certificates()

    assert await trio.to_thread.run_sync(served_fingerprint, p.port, ctx) == before
    assert p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "failure"}) == 1
    assert p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "success"}) == 0
    status = await trio.to_thread.run_sync(fetch_json, f"http://{p.admin}/status")
    assert status["last_reload"]["result"] == "failure"
    assert "does not match" in status["last_reload"]["error"]


async def test_trusted_ca_bundle_rotation_admits_the_new_ca(nursery, test_pki, echo_backend, rotation_dir, tmp_path):
    p = await start_proxy(nursery, test_pki, echo_backend.address, **rotation_overrides(rotation_dir))
    new_ca = pki.make_ca("Second Client CA", organization="Acme")
    newcomer = pki.make_client_cert(new_ca, common_name="newcomer")
    write_cred(tmp_path / "n.crt", tmp_path / "n.key", newcomer)

    def newcomer_ctx():
        ctx = ssl.create_default_context(cafile=str(rotation_dir / "server-ca.crt"))
        ctx.load_cert_chain(str(tmp_path / "n.crt"), str(tmp_path / "n.key"))
        return ctx

    refused = await exchange(p.port, newcomer_ctx())
    assert not refused.ok
    await wait_for(lambda: p.failures("unknown_ca") == 1)

    bundle = rotation_dir / "client-ca.crt"
    bundle.write_bytes(bundle.read_bytes() + new_ca.cert_pem())
    assert p.proxy.reload_certificates()

    assert (await exchange(p.port, newcomer_ctx())).ok
    assert (await exchange(p.port, rotation_client(test_pki, rotation_dir))).ok  # the old CA still works
    assert p.metric("mtls_proxy_certificate_expiry_timestamp_seconds", role="trusted_ca",
                    subject="CN=Second Client CA,O=Acme") == new_ca.cert.not_valid_after_utc.timestamp()


# ---- file watching ---------------------------------------------------------------


async def test_kubernetes_secret_symlink_swap_is_picked_up_without_a_signal(
    nursery, test_pki, echo_backend, tmp_path, server_ca
):
    secret = tmp_path / "secret"
    secret.mkdir()
    client_ca_pem = test_pki.client_ca.read_bytes()
    kubernetes_secret(secret, "2026_11_28_01", pki.make_server_cert(server_ca), client_ca_pem)
    (tmp_path / "server-ca.crt").write_bytes(server_ca.cert_pem())
    p = await start_proxy(
        nursery, test_pki, echo_backend.address,
        top={"reload": {"watch_interval": 0.05}},
        tls={"cert": str(secret / "tls.crt"), "key": str(secret / "tls.key")},
        client_auth={"mode": "require", "trusted_ca": str(secret / "ca.crt")},
    )
    ctx = rotation_client(test_pki, tmp_path)
    before = await trio.to_thread.run_sync(served_fingerprint, p.port, ctx)

    rotated = pki.make_server_cert(server_ca)
    kubernetes_secret(secret, "2026_11_28_02", rotated, client_ca_pem)
    await wait_for(lambda: p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "success"}) == 1)

    after = await trio.to_thread.run_sync(served_fingerprint, p.port, ctx)
    assert before != after == rotated.sha256
    assert p.registry.get_sample_value("mtls_proxy_last_reload_success_timestamp_seconds") > 0


async def test_half_written_file_fails_then_the_finished_write_reloads(
    nursery, test_pki, echo_backend, rotation_dir, server_ca
):
    p = await start_proxy(nursery, test_pki, echo_backend.address, top={"reload": {"watch_interval": 0.05}},
                          **rotation_overrides(rotation_dir))
    ctx = rotation_client(test_pki, rotation_dir)
    new = pki.make_server_cert(server_ca)
    pem = new.chain_pem()
    (rotation_dir / "server.crt").write_bytes(pem[: len(pem) // 2])
    await wait_for(lambda: p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "failure"}) >= 1)
    assert (await exchange(p.port, ctx)).ok  # still serving the old certificate

    write_cred(rotation_dir / "server.crt", rotation_dir / "server.key", new)
    await wait_for(lambda: p.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "success"}) >= 1)
    assert await trio.to_thread.run_sync(served_fingerprint, p.port, ctx) == new.sha256


# ---- revocation ------------------------------------------------------------------


def write_crl(path: Path, ca: pki.Issued, serials, **kw) -> None:
    path.write_bytes(pki.crl_pem(pki.make_crl(ca, serials, **kw)))


async def test_revoked_client_is_refused_and_others_admitted(nursery, test_pki, echo_backend, tmp_path):
    crl = tmp_path / "client.crl"
    write_crl(crl, test_pki.client_ca_issued, [test_pki.alice.issued.cert.serial_number])
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          client_auth={"mode": "require", "trusted_ca": str(test_pki.client_ca), "crl": str(crl)})
    for version in ("1.2", "1.3"):
        assert not (await exchange(p.port, client_context(test_pki, test_pki.alice, version=version))).ok
        assert (await exchange(p.port, client_context(test_pki, test_pki.bob, version=version))).ok
    await wait_for(lambda: p.failures("revoked") == 2)
    assert echo_backend.accepted == 2  # only bob's connections reached the backend
    assert p.metric("mtls_proxy_crl_next_update_timestamp_seconds", issuer="CN=Test Client CA,O=Acme") > 0


async def test_revoked_intermediate_refuses_the_clients_it_issued(nursery, test_pki, echo_backend, tmp_path):
    crl = tmp_path / "root.crl"
    write_crl(crl, test_pki.client_ca_issued, [test_pki.intermediate.cert.serial_number])
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          client_auth={"mode": "require", "trusted_ca": str(test_pki.client_ca), "crl": str(crl)})
    # carol's intermediate has no CRL of its own: only what is given is checked.
    assert not (await exchange(p.port, client_context(test_pki, test_pki.carol))).ok
    assert (await exchange(p.port, client_context(test_pki, test_pki.alice))).ok
    await wait_for(lambda: p.failures("revoked") == 1)


async def test_crl_reload_revokes_from_then_on(nursery, test_pki, echo_backend, tmp_path):
    crl = tmp_path / "client.crl"
    write_crl(crl, test_pki.client_ca_issued, [])
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          client_auth={"mode": "require", "trusted_ca": str(test_pki.client_ca), "crl": str(crl)})
    bob = client_context(test_pki, test_pki.bob)
    assert (await exchange(p.port, bob)).ok
    write_crl(crl, test_pki.client_ca_issued, [test_pki.bob.issued.cert.serial_number])
    assert p.proxy.reload_certificates()
    assert not (await exchange(p.port, client_context(test_pki, test_pki.bob))).ok
    await wait_for(lambda: p.failures("revoked") == 1)


async def test_stale_crl_is_reported(nursery, test_pki, echo_backend, tmp_path):
    crl = tmp_path / "stale.crl"
    past = datetime.now(UTC) - timedelta(days=2)
    write_crl(crl, test_pki.client_ca_issued, [], last_update=past - timedelta(days=7), next_update=past)
    p = await start_proxy(nursery, test_pki, echo_backend.address, admin=True,
                          client_auth={"mode": "require", "trusted_ca": str(test_pki.client_ca), "crl": str(crl)})
    status = await trio.to_thread.run_sync(fetch_json, f"http://{p.admin}/status")
    assert any("out of date" in w for w in status["listeners"][0]["warnings"])
    assert p.metric("mtls_proxy_crl_next_update_timestamp_seconds",
                    issuer="CN=Test Client CA,O=Acme") == pytest.approx(past.timestamp(), abs=1)
    # OpenSSL refuses clients of a CA whose CRL is stale: the reason says why.
    assert not (await exchange(p.port, client_context(test_pki, test_pki.alice))).ok
    await wait_for(lambda: p.failures("bad_certificate") == 1)


# ---- the operator's view ------------------------------------------------------------


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def test_status_reports_listener_certificate_ca_names_and_recent_failures(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address, admin=True,
                          client_auth={"mode": "require", "trusted_ca": str(test_pki.both_cas)})
    assert not (await exchange(p.port, client_context(test_pki, None))).ok
    assert not (await exchange(p.port, client_context(test_pki, test_pki.expired))).ok
    await wait_for(lambda: p.failures("expired") == 1 and p.failures("no_client_cert") == 1)

    status = await trio.to_thread.run_sync(fetch_json, f"http://{p.admin}/status")
    (listener,) = status["listeners"]
    assert listener["state"] == "accepting"
    assert listener["advertised_ca"] == ["CN=Test Client CA,O=Acme", "CN=Other CA,O=Elsewhere"]
    assert 0 < listener["advertised_ca_bytes"] < 2**16
    assert listener["server_certificate"]["sha256"] == test_pki.server.issued.sha256
    assert listener["server_certificate"]["dns_sans"] == ["localhost"]
    assert listener["recent_handshake_failures"] == {"no_client_cert": 1, "expired": 1}
    assert status["last_reload"]["result"] == "success"


async def test_the_running_version_is_in_status_and_in_the_build_info_metric(nursery, test_pki, echo_backend):
    from importlib.metadata import version

    from OpenSSL import SSL

    p = await start_proxy(nursery, test_pki, echo_backend.address, admin=True)
    status = await trio.to_thread.run_sync(fetch_json, f"http://{p.admin}/status")
    assert status["version"] == version("mtls-proxy")
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    labels = {"version": version("mtls-proxy"), "openssl": openssl}
    assert p.registry.get_sample_value("mtls_proxy_build_info", labels) == 1


async def test_client_certificate_remaining_validity_is_observed(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    assert (await exchange(p.port, client_context(test_pki, test_pki.alice))).ok
    await wait_for(lambda: p.metric("mtls_proxy_client_certificate_remaining_seconds_count") == 1)
    remaining = (test_pki.alice.issued.cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
    assert p.metric("mtls_proxy_client_certificate_remaining_seconds_sum") == pytest.approx(remaining, abs=60)
    # Under a year left: not in the 180-day bucket, in the 365-day one.
    assert p.metric("mtls_proxy_client_certificate_remaining_seconds_bucket", le="1.5552e+07") == 0
    assert p.metric("mtls_proxy_client_certificate_remaining_seconds_bucket", le="3.1536e+07") == 1


async def test_drain_refuses_new_connections_and_lets_open_ones_finish(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    ctx = client_context(test_pki, test_pki.alice)
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    tls = await trio.to_thread.run_sync(lambda: ctx.wrap_socket(raw, server_hostname="localhost"))
    try:
        await trio.to_thread.run_sync(tls.sendall, b"before")
        assert await trio.to_thread.run_sync(tls.recv, 6) == b"before"
        p.proxy.stop()
        assert not p.proxy.ready
        await wait_for(lambda: not _accepts(p.port))
        await trio.to_thread.run_sync(tls.sendall, b"during")
        assert await trio.to_thread.run_sync(tls.recv, 6) == b"during"
    finally:
        tls.close()
    await wait_for(lambda: p.metric("mtls_proxy_active_connections") == 0)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
