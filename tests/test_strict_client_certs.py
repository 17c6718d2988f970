"""client_auth.strict: leaves OpenSSL accepts by default but no client certificate should be.

A client leaf marked CA:TRUE, or one whose keyUsage lacks digitalSignature, is refused in the handshake with a
bad_certificate alert, counted under `bad_certificate`, and logged with the rule it broke. `strict: false`
restores OpenSSL's behaviour, which admits both. Real TLS: stdlib ``ssl`` clients against an in-process proxy.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.dev import pki
from tests.conftest import Cred, _write, start_proxy
from tests.test_handshake import VERSIONS, assert_admitted, assert_rejected, connect, version_ctx

CA_LEAF_RULE = "client certificate is a CA certificate (basicConstraints CA:TRUE)"
KEY_USAGE_RULE = "client certificate keyUsage lacks digitalSignature"


def _usage(*, digital_signature: bool = False, key_agreement: bool = False,
           key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=key_agreement, key_cert_sign=key_cert_sign, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def _client_leaf(ca: pki.Issued, common_name: str, *, is_ca: bool, usage: x509.KeyUsage | None) -> pki.Issued:
    """A clientAuth certificate from ``ca`` with the given basicConstraints and keyUsage (None: no extension)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return pki.Issued(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


@pytest.fixture(scope="module")
def odd_clients(test_pki, tmp_path_factory) -> dict[str, Cred]:
    directory: Path = tmp_path_factory.mktemp("strict")
    ca = test_pki.client_ca_issued
    return {
        "ca_leaf": _write(directory, "ca-leaf", _client_leaf(
            ca, "ca-leaf", is_ca=True, usage=_usage(digital_signature=True, key_cert_sign=True))),
        "no_digital_signature": _write(directory, "key-agreement-only", _client_leaf(
            ca, "key-agreement-only", is_ca=False, usage=_usage(key_agreement=True))),
        "no_key_usage": _write(directory, "no-key-usage", _client_leaf(ca, "no-key-usage", is_ca=False, usage=None)),
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("client", "rule"), [("ca_leaf", CA_LEAF_RULE), ("no_digital_signature", KEY_USAGE_RULE)])
async def test_strict_refuses_the_leaf_with_a_bad_certificate_alert(nursery, test_pki, echo_backend, access_log,
                                                                     odd_clients, client, rule, version):
    cred = odd_clients[client]
    p = await start_proxy(nursery, test_pki, echo_backend.address)  # strict is the default
    out = await connect(p.port, version_ctx(test_pki, cred, version))
    assert not out.ok
    assert "alert bad certificate" in out.error, out.error
    fields = await assert_rejected(p, access_log, echo_backend, "bad_certificate")
    assert fields["detail"] == rule
    assert fields["client_subject"] == cred.issued.cert.subject.rfc4514_string()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("client", ["ca_leaf", "no_digital_signature"])
async def test_strict_false_restores_openssls_acceptance(nursery, test_pki, echo_backend, access_log, odd_clients,
                                                         client, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"strict": False})
    out = await connect(p.port, version_ctx(test_pki, odd_clients[client], version))
    assert out.ok, out.error
    await assert_admitted(p, access_log, echo_backend)


async def test_strict_admits_a_leaf_without_key_usage(nursery, test_pki, echo_backend, access_log, odd_clients):
    # The keyUsage rule applies only when the extension is present: without it, any usage is allowed (RFC 5280).
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    out = await connect(p.port, version_ctx(test_pki, odd_clients["no_key_usage"], "1.3"))
    assert out.ok, out.error
    await assert_admitted(p, access_log, echo_backend)
