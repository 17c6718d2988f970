"""The handshake through a real proxy on loopback: who gets in, who does not, and why.

Every scenario runs real TLS (stdlib ``ssl`` or pyOpenSSL clients in threads,
raw trio sockets for non-TLS input) against an in-process proxy, and checks
both what the client saw and what the proxy counted and logged. The access-log
record is written last, after the connection's sockets are closed and its
gauges restored, so waiting for it is the barrier after which every metric of
that connection is final.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import trio
from OpenSSL import SSL

from proxy.dev import pki
from proxy.tls.classify import REASONS
from tests.conftest import AccessLog, Cred, RunningProxy, client_context, exchange, start_proxy, wait_for

VERSIONS = ("1.2", "1.3")
OPENSSL_VERSION_NAME = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}

ALICE_DN = "CN=alice,OU=payments,O=Acme"
ROOT_DN = "CN=Test Client CA,O=Acme"
INTERMEDIATE_DN = "CN=Test Client Intermediate,O=Acme"


# ---- helpers -------------------------------------------------------------------


@dataclass
class Outcome:
    """What a stdlib TLS client saw, in more detail than conftest's ClientResult."""

    ok: bool = False
    data: bytes = b""
    error: str = ""
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    reused: bool = False
    session: ssl.SSLSession | None = None
    local: str = ""  # the client's address as the proxy sees it: "127.0.0.1:port"


def tls_client(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", *,
               session: ssl.SSLSession | None = None, timeout: float = 10.0) -> Outcome:
    """Blocking (run it in a thread): handshake, send payload, read it back, keep the session."""
    out = Outcome()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            host, lport = raw.getsockname()[:2]
            out.local = f"{host}:{lport}"
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                out.version, out.cipher = tls.version(), tls.cipher()[0]
                out.alpn, out.reused = tls.selected_alpn_protocol(), tls.session_reused
                tls.sendall(payload)
                got = bytearray()
                while len(got) < len(payload):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                out.data = bytes(got)
                # With TLS 1.3 the tickets arrived ahead of the echoed data.
                out.session = tls.session
                if len(got) < len(payload):
                    out.error = "connection closed early"
                    return out
                out.ok = True
    except (OSError, ssl.SSLError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def connect(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", **kw) -> Outcome:
    return await trio.to_thread.run_sync(lambda: tls_client(port, ctx, payload, **kw))


def pyopenssl_ca_names(port: int, cred: Cred | None, server_ca) -> tuple[list[str], bool]:
    """Blocking: handshake with pyOpenSSL as the client and return the CA names the
    server's CertificateRequest listed (empty when it sent none) and whether
    application data then made the round trip."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(server_ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    if cred is not None:
        ctx.use_certificate_chain_file(str(cred.cert))
        ctx.use_privatekey_file(str(cred.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(None)  # pyOpenSSL needs a blocking socket (a timeout makes it non-blocking)
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        names = [_x509name_to_rfc4514(n) for n in conn.get_client_ca_list()]
        conn.sendall(b"ping")
        got = b""
        try:
            while len(got) < 4:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (SSL.Error, OSError):
            pass
        return names, got == b"ping"


def _x509name_to_rfc4514(name) -> str:
    """RFC 4514 text of an OpenSSL.crypto.X509Name (most specific attribute first)."""
    parts = [f"{k.decode()}={v.decode()}" for k, v in name.get_components()]
    return ",".join(reversed(parts))


def failure_total(p: RunningProxy) -> float:
    return sum(p.failures(reason) for reason in REASONS)


async def assert_rejected(p: RunningProxy, access_log: AccessLog, backend, reason: str) -> dict:
    """One connection, failed with ``reason`` and nothing else; returns its log fields."""
    fields = (await access_log.wait(1))[-1]
    assert fields["outcome"] == "handshake_failed", fields
    assert fields["reason"] == reason, fields
    assert p.failures(reason) == 1
    assert failure_total(p) == 1, {r: p.failures(r) for r in REASONS if p.failures(r)}
    assert p.metric("mtls_proxy_handshakes_total", result="failure") == 1
    assert p.metric("mtls_proxy_handshakes_total", result="success") == 0
    assert p.metric("mtls_proxy_handshake_duration_seconds_count", result="failure") == 1
    assert p.metric("mtls_proxy_handshake_duration_seconds_count", result="success") == 0
    assert p.metric("mtls_proxy_active_connections") == 0
    assert p.metric("mtls_proxy_connections_total") == 1
    assert backend.accepted == 0
    return fields


async def assert_admitted(p: RunningProxy, access_log: AccessLog, backend, *, count: int = 1,
                          presented: bool = True) -> list[dict]:
    """``count`` connections, all admitted and forwarded; returns their log fields."""
    fields = await access_log.wait(count)
    assert [f["outcome"] for f in fields] == ["ok"] * count, fields
    assert failure_total(p) == 0
    assert p.metric("mtls_proxy_handshakes_total", result="success") == count
    assert p.metric("mtls_proxy_handshakes_total", result="failure") == 0
    assert p.metric("mtls_proxy_handshake_duration_seconds_count", result="success") == count
    assert p.metric("mtls_proxy_client_certificates_total", presented=str(presented).lower()) == count
    assert p.metric("mtls_proxy_client_certificates_total", presented=str(not presented).lower()) == 0
    assert p.metric("mtls_proxy_active_connections") == 0
    assert backend.accepted == count
    return fields


def version_ctx(test_pki, cred: Cred | None, version: str) -> ssl.SSLContext:
    """A client that speaks exactly ``version``."""
    ctx = client_context(test_pki, cred, version=version)
    if version == "1.2":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


# ---- valid clients ---------------------------------------------------------------


async def test_valid_client_round_trips_one_mebibyte(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    payload = bytes(range(256)) * 4096  # 1 MiB
    result = await exchange(p.port, client_context(test_pki, test_pki.alice), payload)
    assert result.ok, result.error
    assert result.data == payload
    await wait_for(lambda: p.metric("mtls_proxy_bytes_total", direction="backend_to_client") == len(payload))
    assert p.metric("mtls_proxy_bytes_total", direction="client_to_backend") == len(payload)
    assert p.metric("mtls_proxy_handshakes_total", result="success") == 1
    assert p.metric("mtls_proxy_client_certificates_total", presented="true") == 1


async def test_a_reconnecting_client_is_verified_again_but_its_chain_parsed_once(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    tls = p.proxy.runtimes[0].tls
    for who in (test_pki.alice, test_pki.alice, test_pki.bob):
        result = await exchange(p.port, client_context(test_pki, who), b"hi")  # a new session each time
        assert result.ok, result.error
    assert p.metric("mtls_proxy_handshakes_total", result="success") == 3
    assert len(tls.chains) == 2  # alice's chain and bob's
    subjects = sorted(facts.identity.subject for facts in tls.chains.values())
    assert subjects == sorted([ALICE_DN, "CN=bob,OU=support,O=Acme"])


@pytest.mark.parametrize("version", VERSIONS)
async def test_valid_client_counted_by_negotiated_version_and_cipher(nursery, test_pki, echo_backend, access_log,
                                                                    version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    out = await connect(p.port, version_ctx(test_pki, test_pki.alice, version), b"hello")
    assert out.ok, out.error
    assert out.data == b"hello"
    assert out.version == OPENSSL_VERSION_NAME[version]
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert p.metric("mtls_proxy_tls_sessions_total", version=out.version, cipher=out.cipher, resumed="false") == 1
    assert p.metric("mtls_proxy_tls_sessions_total", version=out.version, cipher=out.cipher, resumed="true") == 0
    assert fields["tls_version"] == out.version
    assert fields["cipher"] == out.cipher
    assert fields["resumed"] is False
    assert fields["client_subject"] == ALICE_DN
    assert fields["client"] == out.local
    assert echo_backend.received == b"hello"


async def test_handshake_duration_counts_every_success(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    for n in (1, 2, 3):
        out = await connect(p.port, client_context(test_pki, test_pki.alice))
        assert out.ok, out.error
        await access_log.wait(n)
        assert p.metric("mtls_proxy_handshake_duration_seconds_count", result="success") == n
        assert p.metric("mtls_proxy_active_connections") == 0
    # Loopback handshakes take milliseconds, far below the 10 s top bucket.
    assert 0 < p.metric("mtls_proxy_handshake_duration_seconds_sum", result="success") < 3
    assert p.metric("mtls_proxy_handshake_duration_seconds_bucket", result="success", le="1.0") == 3
    assert p.metric("mtls_proxy_connections_total") == 3
    await assert_admitted(p, access_log, echo_backend, count=3)


# ---- require mode: rejected certificates ---------------------------------------

# (certificate, reason counted, the alert the client must be told: TLS 1.2, TLS 1.3)
REJECTED = [
    pytest.param(None, "no_client_cert", "handshake failure", "certificate required", id="no_cert"),
    pytest.param("untrusted", "unknown_ca", "unknown ca", "unknown ca", id="untrusted_ca"),
    pytest.param("expired", "expired", "certificate expired", "certificate expired", id="expired"),
    pytest.param("not_yet_valid", "not_yet_valid", "bad certificate", "bad certificate", id="not_yet_valid"),
    pytest.param("server_eku", "bad_certificate", "unsupported certificate", "unsupported certificate",
                 id="server_eku"),
]
REJECTION_FIELDS = ("cred_name", "reason", "alert12", "alert13")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(REJECTION_FIELDS, REJECTED)
async def test_require_mode_rejects_with_precise_reason(nursery, test_pki, echo_backend, access_log,
                                                        cred_name, reason, alert12, alert13, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    cred = getattr(test_pki, cred_name) if cred_name else None
    result = await exchange(p.port, version_ctx(test_pki, cred, version))
    assert not result.ok
    assert result.data == b""
    # The alert reaches the client before the close (with TLS 1.3, on its first read).
    assert f"alert {alert12 if version == '1.2' else alert13}" in result.error
    fields = await assert_rejected(p, access_log, echo_backend, reason)
    assert p.metric("mtls_proxy_client_certificates_total", presented="true") == 0
    if cred is None:
        assert "client_subject" not in fields
    else:
        assert fields["client_sha256"] == cred.issued.sha256


@pytest.mark.parametrize("version", VERSIONS)
async def test_client_issued_by_intermediate_is_accepted(nursery, test_pki, echo_backend, access_log, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    out = await connect(p.port, version_ctx(test_pki, test_pki.carol, version))
    assert out.ok, out.error
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert fields["client_subject"] == "CN=carol,OU=payments,O=Acme"
    assert fields["client_issuer"] == INTERMEDIATE_DN


def _write_cred(dir, name: str, issued: pki.Issued) -> Cred:
    cert, key = dir / f"{name}.crt", dir / f"{name}.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem())
    return Cred(cert, key, issued)


@pytest.fixture(scope="module")
def dave(test_pki, tmp_path_factory) -> Cred:
    """Two intermediates below the root: dave -> sub-intermediate -> intermediate -> root (presents both)."""
    sub = pki.make_ca("Test Client Sub-Intermediate", organization="Acme", parent=test_pki.intermediate)
    issued = pki.make_client_cert(sub, common_name="dave", organization="Acme", organizational_unit="payments")
    return _write_cred(tmp_path_factory.mktemp("dave"), "dave", issued)


@pytest.fixture(scope="module")
def erin(test_pki, tmp_path_factory) -> Cred:
    """A valid leaf under an intermediate that has expired: erin -> expired intermediate -> root."""
    now = datetime.now(UTC)
    stale = pki.make_ca("Test Client Stale Intermediate", organization="Acme", parent=test_pki.client_ca_issued,
                        not_before=now - timedelta(days=60), not_after=now - timedelta(days=1))
    issued = pki.make_client_cert(stale, common_name="erin", organization="Acme",
                                  not_before=now - timedelta(days=30), not_after=now + timedelta(days=30))
    return _write_cred(tmp_path_factory.mktemp("erin"), "erin", issued)


# OpenSSL's verify depth is the number of intermediate CAs allowed between the
# leaf and the trust anchor (SSL_CTX_set_verify_depth(3): "depth 2 allows the
# levels 0, 1, 2 and 3, 0 being the end-entity and 3 the trust-anchor").
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("depth", "cred_name"), [
    pytest.param(1, "alice", id="depth1-no_intermediate"),
    pytest.param(1, "carol", id="depth1-one_intermediate"),
    pytest.param(2, "dave", id="depth2-two_intermediates"),
])
async def test_chain_within_verify_depth_is_accepted(nursery, test_pki, echo_backend, access_log, dave,
                                                     depth, cred_name, version):
    cred = dave if cred_name == "dave" else getattr(test_pki, cred_name)
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"verify_depth": depth})
    out = await connect(p.port, version_ctx(test_pki, cred, version))
    assert out.ok, out.error
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert fields["client_subject"] == cred.issued.cert.subject.rfc4514_string()


@pytest.mark.parametrize("version", VERSIONS)
async def test_chain_longer_than_verify_depth_is_rejected(nursery, test_pki, echo_backend, access_log, dave, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"verify_depth": 1})
    result = await exchange(p.port, version_ctx(test_pki, dave, version))
    assert not result.ok
    fields = await assert_rejected(p, access_log, echo_backend, "bad_certificate")
    assert "verify_depth" in fields["detail"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_expired_intermediate_is_expired(nursery, test_pki, echo_backend, access_log, erin, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    result = await exchange(p.port, version_ctx(test_pki, erin, version))
    assert not result.ok
    fields = await assert_rejected(p, access_log, echo_backend, "expired")
    assert "depth 1" in fields["detail"]


# README.md's feature list: the client's subject, issuer, serial and fingerprint
# are logged "also for rejected certificates", not only when the leaf itself is
# the certificate that failed.
@pytest.mark.parametrize("case", ["chain_too_long", "expired_intermediate"])
async def test_certificate_rejected_for_its_chain_is_named_in_the_access_log(nursery, test_pki, echo_backend,
                                                                             access_log, dave, erin, case):
    cred, reason, auth = {
        "chain_too_long": (dave, "bad_certificate", {"verify_depth": 1}),
        "expired_intermediate": (erin, "expired", {}),
    }[case]
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=auth)
    out = await connect(p.port, client_context(test_pki, cred))
    assert not out.ok
    fields = await assert_rejected(p, access_log, echo_backend, reason)
    assert fields.get("client_subject") == cred.issued.cert.subject.rfc4514_string(), fields
    assert fields.get("client_issuer") == cred.issued.cert.issuer.rfc4514_string()
    assert fields.get("client_sha256") == cred.issued.sha256


@pytest.mark.parametrize("version", VERSIONS)
async def test_rejected_certificate_is_named_in_the_access_log(nursery, test_pki, echo_backend, access_log, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    out = await connect(p.port, version_ctx(test_pki, test_pki.expired, version))
    assert not out.ok
    fields = await assert_rejected(p, access_log, echo_backend, "expired")
    record = access_log.records[-1]
    assert record.levelno == logging.WARNING
    expired = test_pki.expired.issued.cert
    assert fields["client"] == out.local
    assert fields["listener"] == "test"
    assert fields["client_subject"] == expired.subject.rfc4514_string() == "CN=expired,O=Acme"
    assert fields["client_issuer"] == ROOT_DN
    assert fields["client_sha256"] == test_pki.expired.issued.sha256
    assert fields["client_serial"] == format(expired.serial_number, "x")
    assert "expired" in fields["detail"]
    assert "bytes_up" in fields and fields["bytes_up"] == 0


async def test_require_mode_advertises_the_trusted_ca_names(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    names, round_trip = await trio.to_thread.run_sync(
        lambda: pyopenssl_ca_names(p.port, test_pki.alice, test_pki.server_ca))
    assert names == [ROOT_DN]
    assert round_trip
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert fields["client_subject"] == ALICE_DN


# ---- optional and none modes ------------------------------------------------------

OPTIONAL = {"mode": "optional"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_optional_mode_admits_anonymous_client(nursery, test_pki, echo_backend, access_log, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=OPTIONAL)
    out = await connect(p.port, version_ctx(test_pki, None, version))
    assert out.ok, out.error
    (fields,) = await assert_admitted(p, access_log, echo_backend, presented=False)
    assert "client_subject" not in fields
    assert p.metric("mtls_proxy_tls_sessions_total", version=out.version, cipher=out.cipher, resumed="false") == 1


@pytest.mark.parametrize("version", VERSIONS)
async def test_optional_mode_admits_valid_certificate(nursery, test_pki, echo_backend, access_log, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=OPTIONAL)
    out = await connect(p.port, version_ctx(test_pki, test_pki.alice, version))
    assert out.ok, out.error
    (fields,) = await assert_admitted(p, access_log, echo_backend, presented=True)
    assert fields["client_subject"] == ALICE_DN


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(REJECTION_FIELDS, [p for p in REJECTED if p.values[0] is not None])
async def test_optional_mode_still_rejects_bad_certificates(nursery, test_pki, echo_backend, access_log,
                                                            cred_name, reason, alert12, alert13, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=OPTIONAL)
    result = await exchange(p.port, version_ctx(test_pki, getattr(test_pki, cred_name), version))
    assert not result.ok
    assert f"alert {alert12 if version == '1.2' else alert13}" in result.error
    await assert_rejected(p, access_log, echo_backend, reason)
    assert p.metric("mtls_proxy_client_certificates_total", presented="false") == 0


async def test_optional_mode_applies_allow_rules_to_presented_certificates(nursery, test_pki, echo_backend,
                                                                           access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          client_auth={"mode": "optional", "allow": {"common_names": ["alice"]}})
    result = await exchange(p.port, client_context(test_pki, test_pki.bob))
    assert not result.ok
    await assert_rejected(p, access_log, echo_backend, "forbidden")


NONE = {"mode": "none", "trusted_ca": None}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cred_name", [None, "alice", "untrusted", "expired"])
async def test_none_mode_admits_any_client_without_asking_for_a_certificate(nursery, test_pki, echo_backend,
                                                                            access_log, cred_name, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=NONE)
    cred = getattr(test_pki, cred_name) if cred_name else None
    out = await connect(p.port, version_ctx(test_pki, cred, version))
    assert out.ok, out.error
    (fields,) = await assert_admitted(p, access_log, echo_backend, presented=False)
    # No CertificateRequest, so the client never sent its certificate.
    assert "client_subject" not in fields


async def test_none_mode_sends_no_certificate_request(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth=NONE)
    names, round_trip = await trio.to_thread.run_sync(
        lambda: pyopenssl_ca_names(p.port, test_pki.alice, test_pki.server_ca))
    assert names == []
    assert round_trip
    await assert_admitted(p, access_log, echo_backend, presented=False)


# ---- allow rules ------------------------------------------------------------------

ALLOW_CASES = [
    pytest.param({"subjects": [ALICE_DN]}, "alice", True, id="subject-alice"),
    pytest.param({"subjects": [ALICE_DN]}, "bob", False, id="subject-bob"),
    pytest.param({"issuers": [INTERMEDIATE_DN]}, "carol", True, id="intermediate-issuer-carol"),
    pytest.param({"issuers": [INTERMEDIATE_DN]}, "alice", False, id="intermediate-issuer-alice"),
    pytest.param({"issuers": [ROOT_DN]}, "alice", True, id="root-issuer-alice"),
    pytest.param({"issuers": [ROOT_DN]}, "carol", True, id="root-issuer-carol"),
    pytest.param({"common_names": ["bob"]}, "bob", True, id="cn-bob"),
    pytest.param({"common_names": ["bob"]}, "alice", False, id="cn-alice"),
    pytest.param({"organizational_units": ["payments"]}, "alice", True, id="ou-alice"),
    pytest.param({"organizational_units": ["payments"]}, "carol", True, id="ou-carol"),
    pytest.param({"organizational_units": ["payments"]}, "bob", False, id="ou-bob"),
    pytest.param({"uri_sans": ["spiffe://acme/ns/prod/*"]}, "alice", True, id="uri-alice"),
    pytest.param({"uri_sans": ["spiffe://acme/ns/prod/*"]}, "bob", False, id="uri-bob"),
    pytest.param({"dns_sans": ["*.prod.svc"]}, "alice", True, id="dns-alice"),
    pytest.param({"dns_sans": ["*.prod.svc"]}, "bob", False, id="dns-bob"),
    pytest.param({"sha256_fingerprints": ["ALICE"]}, "alice", True, id="sha256-alice"),
    pytest.param({"sha256_fingerprints": ["ALICE"]}, "bob", False, id="sha256-bob"),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("allow", "cred_name", "admitted"), ALLOW_CASES)
async def test_allow_rules(nursery, test_pki, echo_backend, access_log, allow, cred_name, admitted, version):
    if allow.get("sha256_fingerprints") == ["ALICE"]:
        allow = {"sha256_fingerprints": [test_pki.alice.issued.sha256]}
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"allow": allow})
    cred: Cred = getattr(test_pki, cred_name)
    out = await connect(p.port, version_ctx(test_pki, cred, version))
    if admitted:
        assert out.ok, out.error
        assert out.data == b"ping"
        (fields,) = await assert_admitted(p, access_log, echo_backend)
    else:
        assert not out.ok
        assert out.data == b""
        fields = await assert_rejected(p, access_log, echo_backend, "forbidden")
        assert echo_backend.received == b""
    assert fields["client_subject"] == cred.issued.cert.subject.rfc4514_string()
    assert fields["client_sha256"] == cred.issued.sha256


@pytest.mark.parametrize("version", VERSIONS)
async def test_denied_client_is_not_told_internal_error(nursery, test_pki, echo_backend, access_log, version):
    # A refusal by the allow rules is the client's problem, not a proxy fault:
    # RFC 8446 6.2 has access_denied for exactly this ("a valid certificate or
    # PSK was received, but when access control was applied, the sender decided
    # not to proceed"). internal_error sends the client's operators hunting a
    # proxy bug. Any alert that describes a refusal is acceptable here.
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"allow": {"common_names": ["alice"]}})
    result = await exchange(p.port, version_ctx(test_pki, test_pki.bob, version))
    assert not result.ok
    await assert_rejected(p, access_log, echo_backend, "forbidden")
    assert " alert " in result.error, result.error
    assert "internal error" not in result.error, result.error


# ---- not TLS, closed, silent -------------------------------------------------------


async def raw_send_and_read_to_eof(port: int, data: bytes) -> bytes:
    """Send raw bytes and read until the proxy closes (a reset counts as closed)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(5):  # the proxy must close; it must not wait for the timeout
            try:
                while chunk := await stream.receive_some(65536):
                    got += chunk
            except trio.BrokenResourceError:
                pass
    return got


@pytest.mark.parametrize("data", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"),
    pytest.param(b"\x00\x9f\xe3\x11 random bytes \xff\xfe\x01" * 8, id="junk"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
])
async def test_non_tls_input_is_not_tls_and_closed(nursery, test_pki, echo_backend, access_log, data):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    await raw_send_and_read_to_eof(p.port, data)
    fields = await assert_rejected(p, access_log, echo_backend, "not_tls")
    assert "client_subject" not in fields
    assert fields["client"].startswith("127.0.0.1:")


async def test_client_closing_before_sending_is_client_closed(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    stream = await trio.open_tcp_stream("127.0.0.1", p.port)
    await stream.aclose()
    await assert_rejected(p, access_log, echo_backend, "client_closed")


async def test_client_closing_mid_handshake_is_client_closed(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    stream = await trio.open_tcp_stream("127.0.0.1", p.port)
    # The first bytes of a ClientHello record, then EOF.
    await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    await stream.aclose()
    await assert_rejected(p, access_log, echo_backend, "client_closed")


# Virtual time: the proxy and this client share the test's trio loop, so the
# autojump clock skips the 5 s wait as soon as everyone is blocked on I/O. The
# only deadline pending while the client waits is the proxy's handshake
# deadline, which is what the clock jumps to.
@pytest.mark.parametrize("sent", [
    pytest.param(b"", id="silent"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="partial_client_hello"),
])
async def test_stalled_client_is_cut_at_the_handshake_timeout(autojump_clock, nursery, test_pki, echo_backend,
                                                              access_log, sent):
    p = await start_proxy(nursery, test_pki, echo_backend.address, timeouts={"handshake": 5})
    stream = await trio.open_tcp_stream("127.0.0.1", p.port)
    async with stream:
        if sent:
            await stream.send_all(sent)
        started = trio.current_time()
        with trio.fail_after(60):
            assert await stream.receive_some(65536) == b""  # the proxy closed
        waited = trio.current_time() - started
    assert 5 <= waited < 5.5
    fields = await assert_rejected(p, access_log, echo_backend, "timeout")
    assert ("nothing" if not sent else "incomplete") in fields["detail"]
    duration = p.metric("mtls_proxy_handshake_duration_seconds_sum", result="failure")
    assert 5 <= duration < 5.5
    assert p.metric("mtls_proxy_handshake_duration_seconds_bucket", result="failure", le="2.5") == 0
    assert p.metric("mtls_proxy_handshake_duration_seconds_bucket", result="failure", le="10.0") == 1


# ---- version and cipher mismatch ------------------------------------------------------


@pytest.mark.parametrize(("tls", "client_version"), [
    pytest.param({"min_version": "1.3"}, "1.2", id="server_1.3_client_1.2"),
    pytest.param({"max_version": "1.2"}, "1.3", id="server_1.2_client_1.3"),
])
async def test_version_mismatch_is_protocol_version(nursery, test_pki, echo_backend, access_log, tls, client_version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, tls=tls)
    result = await exchange(p.port, version_ctx(test_pki, test_pki.alice, client_version))
    assert not result.ok
    assert "version" in result.error.lower()
    await assert_rejected(p, access_log, echo_backend, "protocol_version")


async def test_no_common_cipher_is_no_shared_cipher(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          tls={"max_version": "1.2", "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"})
    ctx = version_ctx(test_pki, test_pki.alice, "1.2")
    ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
    result = await exchange(p.port, ctx)
    assert not result.ok
    await assert_rejected(p, access_log, echo_backend, "no_shared_cipher")


async def test_configured_cipher_is_the_one_negotiated(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address,
                          tls={"max_version": "1.2", "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"})
    out = await connect(p.port, client_context(test_pki, test_pki.alice))
    assert out.ok, out.error
    assert (out.version, out.cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    await assert_admitted(p, access_log, echo_backend)
    assert p.metric("mtls_proxy_tls_sessions_total", version="TLSv1.2", cipher="ECDHE-ECDSA-AES128-GCM-SHA256",
                    resumed="false") == 1


# ---- session resumption -----------------------------------------------------------


async def resume_twice(port: int, ctx: ssl.SSLContext) -> tuple[Outcome, Outcome]:
    first = await connect(port, ctx)
    assert first.ok, first.error
    assert first.session is not None
    second = await connect(port, ctx, session=first.session)
    return first, second


@pytest.mark.parametrize("version", VERSIONS)
async def test_resumed_session_is_counted_and_keeps_its_identity(nursery, test_pki, echo_backend, access_log,
                                                                 version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    first, second = await resume_twice(p.port, version_ctx(test_pki, test_pki.alice, version))
    assert not first.reused
    assert second.ok, second.error
    assert second.reused
    fields = await assert_admitted(p, access_log, echo_backend, count=2)
    labels = {"version": OPENSSL_VERSION_NAME[version], "cipher": second.cipher}
    assert p.metric("mtls_proxy_tls_sessions_total", resumed="false", **labels) == 1
    assert p.metric("mtls_proxy_tls_sessions_total", resumed="true", **labels) == 1
    assert [f["resumed"] for f in fields] == [False, True]
    assert [f["client_subject"] for f in fields] == [ALICE_DN, ALICE_DN]
    assert fields[1]["client_sha256"] == test_pki.alice.issued.sha256


async def test_a_resumed_session_whose_identity_left_the_cache_is_named_by_its_leaf(
        nursery, test_pki, echo_backend, access_log, monkeypatch):
    from proxy.tls import context

    monkeypatch.setattr(context, "IDENTITY_CACHE_SIZE", 0)  # every identity is dropped as soon as it is cached
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    _first, second = await resume_twice(p.port, version_ctx(test_pki, test_pki.alice, "1.3"))
    assert second.reused
    assert second.ok, second.error
    fields = await assert_admitted(p, access_log, echo_backend, count=2)
    assert [f["resumed"] for f in fields] == [False, True]
    assert fields[1]["client_subject"] == ALICE_DN
    assert fields[1]["client_sha256"] == test_pki.alice.issued.sha256


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("issuer", [pytest.param(INTERMEDIATE_DN, id="intermediate"),
                                    pytest.param(ROOT_DN, id="root")])
async def test_resumed_session_is_admitted_by_the_issuer_rule_that_admitted_it(nursery, test_pki, echo_backend,
                                                                               access_log, issuer, version):
    # The allow rule `issuers` matches "any CA in the verified chain". A session
    # that was admitted by it must be admitted again when it resumes.
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"allow": {"issuers": [issuer]}})
    _first, second = await resume_twice(p.port, version_ctx(test_pki, test_pki.carol, version))
    assert second.reused
    assert second.ok, second.error
    fields = await assert_admitted(p, access_log, echo_backend, count=2)
    assert [f["resumed"] for f in fields] == [False, True]
    assert p.metric("mtls_proxy_tls_sessions_total", resumed="true", version=OPENSSL_VERSION_NAME[version],
                    cipher=second.cipher) == 1


# ---- ALPN ------------------------------------------------------------------------


@pytest.mark.parametrize(("offered", "expected"), [
    pytest.param(["http/1.1"], "http/1.1", id="http1-only"),
    pytest.param(["http/1.1", "h2"], "h2", id="server-preference"),
    pytest.param(["spdy/3"], None, id="no-overlap"),
])
async def test_alpn(nursery, test_pki, echo_backend, access_log, offered, expected):
    p = await start_proxy(nursery, test_pki, echo_backend.address, tls={"alpn": ["h2", "http/1.1"]})
    ctx = client_context(test_pki, test_pki.alice)
    ctx.set_alpn_protocols(offered)
    out = await connect(p.port, ctx)
    assert out.ok, out.error
    assert out.alpn == expected
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert fields.get("alpn") == expected


async def test_no_alpn_configured_selects_none(nursery, test_pki, echo_backend, access_log):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    ctx = client_context(test_pki, test_pki.alice)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    out = await connect(p.port, ctx)
    assert out.ok, out.error
    assert out.alpn is None
    (fields,) = await assert_admitted(p, access_log, echo_backend)
    assert "alpn" not in fields
