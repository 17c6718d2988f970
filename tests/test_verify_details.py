"""The detail of a certificate failure is OpenSSL's own text, and the reason table fits the linked OpenSSL.

X509 error numbers move between OpenSSL versions (24 was "invalid CA certificate" until 1.1.1; in 3.0 and later
it is "issuer certificate doesn't have a public key" and invalid CA is 79). The expected text here comes from
pyOpenSSL's public verification API (X509StoreContext), an independent path into the same library.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import crypto

from proxy.dev import pki
from proxy.tls._openssl import verify_error_text
from proxy.tls.classify import X509_REASONS, describe_x509_error
from tests.conftest import Cred, _write, start_proxy
from tests.test_handshake import assert_rejected, connect, version_ctx


def openssl_verdict(trusted: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> tuple[int, int, str]:
    """(X509 error, depth, text) as OpenSSL itself reports the verification of ``chain`` (leaf first)."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(trusted))
    leaf, *intermediates = (crypto.X509.from_cryptography(cert) for cert in chain)
    with pytest.raises(crypto.X509StoreContextError) as info:
        crypto.X509StoreContext(store, leaf, chain=intermediates).verify_certificate()
    code, depth, text = info.value.errors
    return code, depth, text


@pytest.fixture(scope="module")
def leaf_of_a_leaf(test_pki, tmp_path_factory) -> Cred:
    """A client certificate signed by alice's key, presented with alice's certificate as its "CA"."""
    directory: Path = tmp_path_factory.mktemp("verify-details")
    return _write(directory, "leaf-of-a-leaf", pki.make_client_cert(test_pki.alice.issued, common_name="eve"))


@pytest.mark.parametrize(
    ("case", "reason", "where"),
    [
        ("expired", "expired", "client certificate"),
        ("untrusted", "unknown_ca", "client certificate"),
        ("leaf_of_a_leaf", "bad_certificate", "CA certificate at depth 1"),
    ],
)
async def test_detail_is_openssls_own_text(nursery, test_pki, echo_backend, access_log, leaf_of_a_leaf,
                                           case, reason, where):
    cred = leaf_of_a_leaf if case == "leaf_of_a_leaf" else getattr(test_pki, case)
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    out = await connect(p.port, version_ctx(test_pki, cred, "1.3"))
    assert not out.ok
    fields = await assert_rejected(p, access_log, echo_backend, reason)

    code, depth, text = openssl_verdict(test_pki.client_ca_issued.cert, (cred.issued.cert, *cred.issued.chain))
    assert fields["detail"] == f"{text} ({where}, X509 error {code})"
    assert (depth == 0) == (where == "client certificate")


def test_a_leaf_signed_by_a_leaf_is_not_described_with_the_number_of_another_error():
    # The table used to call 24 "invalid CA certificate"; the linked OpenSSL calls a non-CA issuer 79.
    ca = pki.make_ca("Details CA")
    alice = pki.make_client_cert(ca, common_name="alice")
    eve = pki.make_client_cert(alice, common_name="eve")
    code, depth, text = openssl_verdict(ca.cert, (eve.cert, alice.cert))
    assert text == "invalid CA certificate"
    assert describe_x509_error(code, depth) == ("bad_certificate", f"invalid CA certificate (CA certificate at "
                                                                   f"depth 1, X509 error {code})")


# Each reason, and words OpenSSL's text for each of its codes must contain: this checks the numbers of the table
# against the linked library's meaning of them, not against our memory of x509_vfy.h.
REASON_WORDS = {
    "expired": ("expired",),
    "not_yet_valid": ("not yet valid",),
    "revoked": ("revoked",),
    "unknown_ca": ("issuer", "self-signed", "first certificate"),
}


@pytest.mark.parametrize("code", sorted(X509_REASONS))
def test_every_reason_in_the_table_fits_openssls_text_for_its_code(code):
    words = REASON_WORDS[X509_REASONS[code]]
    assert any(word in verify_error_text(code) for word in words), (code, verify_error_text(code))


def test_codes_outside_the_table_are_bad_certificate_with_openssls_text():
    for code in (24, 47, 66, 68, 79):
        reason, detail = describe_x509_error(code, 0)
        assert reason == "bad_certificate"
        assert detail == f"{verify_error_text(code)} (client certificate, X509 error {code})"
        assert not detail.startswith("certificate verification failed")
