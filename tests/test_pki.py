"""The dev PKI: extensions, chains, validity, CRLs, files on disk, and what the openssl CLI thinks of them."""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.dev import pki

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
needs_openssl = pytest.mark.skipif(not Path(OPENSSL).exists(), reason="openssl CLI not installed")


@pytest.fixture(scope="module")
def root() -> pki.Issued:
    return pki.make_ca("Test Root")


@pytest.fixture(scope="module")
def intermediate(root: pki.Issued) -> pki.Issued:
    return pki.make_ca("Test Intermediate", parent=root)


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def has_ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    try:
        ext(cert, kind)
    except x509.ExtensionNotFound:
        return False
    return True


def ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(ext(cert, x509.ExtendedKeyUsage).value)


def crl_aki(crl: x509.CertificateRevocationList) -> bytes | None:
    return crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def close_to(actual: datetime, expected: datetime) -> bool:
    return abs(actual - expected) < timedelta(minutes=1)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30)


# --- certificate authorities ---------------------------------------------------------------------------------


def test_root_ca_is_a_self_signed_ca(root: pki.Issued) -> None:
    cert = root.cert
    cert.verify_directly_issued_by(cert)
    assert cert.subject.rfc4514_string() == "CN=Test Root,O=mtls-proxy dev"
    assert cert.issuer == cert.subject
    assert root.chain == ()

    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length is None
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        root.key.public_key()
    )


def test_ca_organization_and_path_length_are_honoured() -> None:
    ca = pki.make_ca("Narrow CA", organization="Acme", path_length=0)
    assert ca.cert.subject.rfc4514_string() == "CN=Narrow CA,O=Acme"
    assert ext(ca.cert, x509.BasicConstraints).value.path_length == 0


def test_intermediate_is_signed_by_its_parent(root: pki.Issued, intermediate: pki.Issued) -> None:
    cert = intermediate.cert
    cert.verify_directly_issued_by(root.cert)
    assert cert.issuer == root.cert.subject
    assert ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.KeyUsage).value.key_cert_sign
    # AKI names the parent's key exactly as the parent's SKI does: what OpenSSL matches to build the chain.
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root.cert, x509.SubjectKeyIdentifier).value.digest
    # Nothing lies between a first-level intermediate and the root.
    assert intermediate.chain == ()


def test_two_level_intermediates_chain_nearest_first(root: pki.Issued, intermediate: pki.Issued) -> None:
    second = pki.make_ca("Second Intermediate", parent=intermediate)
    leaf = pki.make_client_cert(second, common_name="deep")

    assert second.chain == (intermediate.cert,)
    assert leaf.chain == (second.cert, intermediate.cert)
    # Walk leaf -> second -> first -> root, checking each signature with the next certificate's public key.
    path = [leaf.cert, *leaf.chain, root.cert]
    for child, parent in itertools.pairwise(path):
        child.verify_directly_issued_by(parent)
    assert len(path) == 4


def test_intermediate_named_like_its_root_is_still_an_intermediate(root: pki.Issued) -> None:
    # Same subject as the root, different key: only the signature tells it is not self-signed.
    impostor = pki.make_ca("Test Root", parent=root)
    leaf = pki.make_server_cert(impostor)
    assert impostor.cert.subject == impostor.cert.issuer
    assert leaf.chain == (impostor.cert,)


def test_leaf_under_a_root_carries_no_chain(root: pki.Issued) -> None:
    leaf = pki.make_server_cert(root)
    assert leaf.chain == ()
    assert leaf.chain_pem() == leaf.cert_pem()


def test_chain_pem_is_leaf_then_intermediates(intermediate: pki.Issued) -> None:
    leaf = pki.make_server_cert(intermediate)
    loaded = x509.load_pem_x509_certificates(leaf.chain_pem())
    assert loaded == [leaf.cert, intermediate.cert]
    assert x509.load_pem_x509_certificates(leaf.cert_pem()) == [leaf.cert]


# --- leaf certificates ---------------------------------------------------------------------------------------


def test_server_cert_defaults(root: pki.Issued) -> None:
    server = pki.make_server_cert(root)
    cert = server.cert
    cert.verify_directly_issued_by(root.cert)
    assert cert.subject.rfc4514_string() == "CN=localhost"

    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert ekus(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]

    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(root.cert, x509.SubjectKeyIdentifier).value.digest
    )


def test_server_cert_custom_names(root: pki.Issued) -> None:
    server = pki.make_server_cert(
        root, common_name="api.internal", dns_names=("api.internal", "*.api.internal"), ip_addresses=("10.0.0.7",)
    )
    sans = ext(server.cert, x509.SubjectAlternativeName).value
    assert server.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.internal"
    assert sans.get_values_for_type(x509.DNSName) == ["api.internal", "*.api.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_client_cert_subject_sans_and_eku(root: pki.Issued) -> None:
    client = pki.make_client_cert(
        root,
        common_name="alice",
        organizational_unit="payments",
        organization="Acme",
        dns_names=("alice.prod.svc",),
        uris=("spiffe://acme/ns/prod/alice",),
        emails=("alice@acme.example",),
    )
    cert = client.cert
    assert cert.subject.rfc4514_string() == "CN=alice,OU=payments,O=Acme"
    assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.KeyUsage).value.digital_signature

    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["alice.prod.svc"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://acme/ns/prod/alice"]
    assert sans.get_values_for_type(x509.RFC822Name) == ["alice@acme.example"]


def test_client_cert_without_sans_has_no_san_extension(root: pki.Issued) -> None:
    client = pki.make_client_cert(root, common_name="bob")
    assert client.cert.subject.rfc4514_string() == "CN=bob"
    assert not has_ext(client.cert, x509.SubjectAlternativeName)


def test_server_only_eku_client_cert_has_only_server_auth(root: pki.Issued) -> None:
    client = pki.make_client_cert(root, common_name="mallory", extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert ekus(client.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_empty_eku_leaves_the_extension_out(root: pki.Issued) -> None:
    client = pki.make_client_cert(root, common_name="anything", extended_key_usage=())
    assert not has_ext(client.cert, x509.ExtendedKeyUsage)


def test_leaf_signed_by_a_leaf_is_allowed_for_negative_tests(root: pki.Issued) -> None:
    not_a_ca = pki.make_server_cert(root)
    forged = pki.make_client_cert(not_a_ca, common_name="forged")
    forged.cert.verify_directly_issued_by(not_a_ca.cert)
    assert forged.chain == (not_a_ca.cert,)


# --- keys, serials, fingerprints -----------------------------------------------------------------------------


def test_keys_are_p256_and_signatures_sha256(root: pki.Issued, intermediate: pki.Issued) -> None:
    for issued in (root, intermediate, pki.make_server_cert(intermediate)):
        assert isinstance(issued.key.curve, ec.SECP256R1)
        assert isinstance(issued.cert.signature_hash_algorithm, hashes.SHA256)


def test_key_pem_is_unencrypted_pkcs8_matching_the_cert(root: pki.Issued) -> None:
    client = pki.make_client_cert(root, common_name="carol")
    pem = client.key_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not "EC PRIVATE KEY" (SEC1)
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert loaded.public_key() == client.cert.public_key()


def test_serials_are_random_and_fingerprint_is_lowercase_hex(root: pki.Issued) -> None:
    a = pki.make_client_cert(root, common_name="a")
    b = pki.make_client_cert(root, common_name="a")
    assert a.cert.serial_number != b.cert.serial_number
    assert a.cert.serial_number.bit_length() > 64
    assert a.sha256 == a.cert.fingerprint(hashes.SHA256()).hex()
    assert len(a.sha256) == 64 and a.sha256 == a.sha256.lower()
    assert a.sha256 != b.sha256


# --- validity windows ----------------------------------------------------------------------------------------


def test_default_validity_windows(root: pki.Issued) -> None:
    now = datetime.now(UTC)
    leaf = pki.make_client_cert(root, common_name="d").cert
    assert close_to(leaf.not_valid_before_utc, now - timedelta(hours=1))
    assert close_to(leaf.not_valid_after_utc, now + timedelta(days=365))
    ca = pki.make_ca("Fresh CA").cert
    assert close_to(ca.not_valid_before_utc, now - timedelta(hours=1))
    assert close_to(ca.not_valid_after_utc, now + timedelta(days=3650))


def test_explicit_validity_windows_are_honoured(root: pki.Issued) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    expired = pki.make_client_cert(
        root, common_name="old", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    ).cert
    future = pki.make_server_cert(root, not_before=now + timedelta(days=1), not_after=now + timedelta(days=2)).cert
    ca = pki.make_ca("Short CA", not_before=now - timedelta(days=1), not_after=now + timedelta(days=1)).cert

    assert (expired.not_valid_before_utc, expired.not_valid_after_utc) == (
        now - timedelta(days=10),
        now - timedelta(days=1),
    )
    assert future.not_valid_before_utc == now + timedelta(days=1)
    assert ca.not_valid_after_utc == now + timedelta(days=1)


# --- CRLs ----------------------------------------------------------------------------------------------------


def test_crl_lists_the_serials_and_is_signed_by_the_ca(root: pki.Issued) -> None:
    revoked = pki.make_client_cert(root, common_name="revoked")
    kept = pki.make_client_cert(root, common_name="kept")
    crl = pki.make_crl(root, [revoked.cert.serial_number, 42])

    assert crl.is_signature_valid(root.cert.public_key())
    assert not crl.is_signature_valid(pki.make_ca("Other").cert.public_key())
    assert crl.issuer == root.cert.subject
    assert {entry.serial_number for entry in crl} == {revoked.cert.serial_number, 42}
    assert crl.get_revoked_certificate_by_serial_number(kept.cert.serial_number) is None
    assert crl_aki(crl) == ext(root.cert, x509.SubjectKeyIdentifier).value.digest
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)


def test_crl_update_times(root: pki.Issued) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    default = pki.make_crl(root, [])
    explicit = pki.make_crl(root, [], last_update=now - timedelta(days=3), next_update=now - timedelta(days=1))

    assert len(default) == 0
    assert close_to(default.last_update_utc, now - timedelta(hours=1))
    assert default.next_update_utc is not None and default.next_update_utc > now + timedelta(days=7)
    assert (explicit.last_update_utc, explicit.next_update_utc) == (now - timedelta(days=3), now - timedelta(days=1))


def test_crl_pem_round_trips(root: pki.Issued) -> None:
    crl = pki.make_crl(root, [7])
    pem = pki.crl_pem(crl)
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    assert x509.load_pem_x509_crl(pem) == crl


# --- the dev PKI on disk -------------------------------------------------------------------------------------

FILE_NAMES = {"ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_write_dev_pki_writes_six_files_with_private_keys(tmp_path: Path) -> None:
    target = tmp_path / "new" / "pki"
    paths = pki.write_dev_pki(target)

    assert paths.dir == target
    assert {p.name for p in target.iterdir()} == FILE_NAMES
    assert [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.client_cert, paths.client_key] == [
        target / name for name in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")
    ]
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert mode(key) == 0o600
    for cert in (paths.ca_cert, paths.server_cert, paths.client_cert):
        assert mode(cert) == 0o644 & ~current_umask()  # certificates are public


def test_write_dev_pki_contents(tmp_path: Path) -> None:
    paths = pki.write_dev_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificates(paths.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(paths.client_cert.read_bytes())

    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mtls-proxy dev CA"
    # One CA signs both sides.
    server[0].verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert len(server) == 1

    assert client.subject.rfc4514_string() == "CN=demo-client,OU=dev"
    sans = ext(client, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mtls-proxy.dev/client/demo-client"]

    for cert_path, key_path in [(paths.server_cert, paths.server_key), (paths.client_cert, paths.client_key)]:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()


def test_write_dev_pki_custom_names(tmp_path: Path) -> None:
    paths = pki.write_dev_pki(
        tmp_path, server_names=("proxy.test", "alt.test"), server_ips=("192.0.2.1",), client_name="ci"
    )
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(paths.client_cert.read_bytes())
    server_sans = ext(server, x509.SubjectAlternativeName).value

    assert server.subject.rfc4514_string() == "CN=proxy.test"
    assert server_sans.get_values_for_type(x509.DNSName) == ["proxy.test", "alt.test"]
    assert server_sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]
    assert client.subject.rfc4514_string() == "CN=ci,OU=dev"


def test_write_dev_pki_refuses_to_overwrite_before_writing_anything(tmp_path: Path) -> None:
    existing = tmp_path / "client.key"
    existing.write_bytes(b"precious")

    with pytest.raises(FileExistsError) as caught:
        pki.write_dev_pki(tmp_path)

    assert caught.value.filename == str(existing)
    assert str(existing) in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["client.key"]
    assert existing.read_bytes() == b"precious"


def test_write_dev_pki_overwrite_replaces_files_and_tightens_key_mode(tmp_path: Path) -> None:
    first = pki.write_dev_pki(tmp_path)
    old_ca = first.ca_cert.read_bytes()
    first.server_key.chmod(0o644)  # a key someone loosened by hand

    second = pki.write_dev_pki(tmp_path, overwrite=True)

    assert second.ca_cert.read_bytes() != old_ca
    assert mode(second.server_key) == 0o600


# --- the openssl CLI agrees ----------------------------------------------------------------------------------


@needs_openssl
def test_openssl_verifies_the_written_dev_pki(tmp_path: Path) -> None:
    paths = pki.write_dev_pki(tmp_path)
    as_client = openssl("verify", "-CAfile", paths.ca_cert, "-purpose", "sslclient", paths.client_cert)
    as_server = openssl("verify", "-CAfile", paths.ca_cert, "-purpose", "sslserver", paths.server_cert)
    assert as_client.returncode == 0, as_client.stdout + as_client.stderr
    assert as_server.returncode == 0, as_server.stdout + as_server.stderr
    assert as_client.stdout.strip().endswith(": OK")


@needs_openssl
def test_openssl_rejects_the_wrong_purpose(tmp_path: Path) -> None:
    # Shows the purpose checks above are real: each certificate is good for its own side only.
    paths = pki.write_dev_pki(tmp_path)
    client_as_server = openssl("verify", "-CAfile", paths.ca_cert, "-purpose", "sslserver", paths.client_cert)
    server_as_client = openssl("verify", "-CAfile", paths.ca_cert, "-purpose", "sslclient", paths.server_cert)
    # 26 = X509_V_ERR_INVALID_PURPOSE at the leaf; the number is stable where the wording differs by version.
    for result in (client_as_server, server_as_client):
        assert result.returncode != 0
        assert "error 26 at 0 depth" in result.stdout + result.stderr


@needs_openssl
def test_openssl_verifies_a_chain_through_intermediates(tmp_path: Path) -> None:
    root = pki.make_ca("Chain Root")
    first = pki.make_ca("Chain Intermediate 1", parent=root)
    second = pki.make_ca("Chain Intermediate 2", parent=first)
    leaf = pki.make_client_cert(second, common_name="deep")
    (tmp_path / "root.pem").write_bytes(root.cert_pem())
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem())
    (tmp_path / "untrusted.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in leaf.chain))

    result = openssl(
        "verify", "-x509_strict", "-CAfile", tmp_path / "root.pem", "-untrusted", tmp_path / "untrusted.pem",
        "-purpose", "sslclient", tmp_path / "leaf.pem",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@needs_openssl
def test_openssl_honours_the_crl(tmp_path: Path) -> None:
    ca = pki.make_ca("CRL CA")
    revoked = pki.make_client_cert(ca, common_name="revoked")
    kept = pki.make_client_cert(ca, common_name="kept")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "crl.pem").write_bytes(pki.crl_pem(pki.make_crl(ca, [revoked.cert.serial_number])))
    (tmp_path / "revoked.pem").write_bytes(revoked.cert_pem())
    (tmp_path / "kept.pem").write_bytes(kept.cert_pem())

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        return openssl(
            "verify", "-crl_check", "-CAfile", tmp_path / "ca.pem", "-CRLfile", tmp_path / "crl.pem",
            "-purpose", "sslclient", tmp_path / name,
        )  # fmt: skip

    assert verify("kept.pem").returncode == 0
    rejected = verify("revoked.pem")
    assert rejected.returncode != 0
    assert "certificate revoked" in rejected.stdout + rejected.stderr
