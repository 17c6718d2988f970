"""A development PKI: certificate authorities, server and client certificates, CRLs.

Used by ``mtls-proxy certs init DIR``, by ``mtls-proxy demo`` and by the test suite, which needs many kinds of
good and deliberately bad certificates. Pure: it uses ``cryptography`` only, never sockets or trio.

Every key is ECDSA P-256 (generating one takes microseconds, where RSA-2048 takes tens of milliseconds, and the
test suite makes hundreds) and every signature is SHA-256.

Chains: an :class:`Issued` carries the intermediates that sit between its certificate and the root, nearest
first, without the root. That is exactly what a TLS peer must send after its leaf, so ``chain_pem()`` is what a
server or client presents, and a root alone is what the other side trusts.

The issuer passed to ``make_*`` is not checked for being a CA: tests use that to forge invalid chains (a leaf
signed by another leaf) and expect the proxy to reject them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DevPKI",
    "Issued",
    "crl_pem",
    "make_ca",
    "make_client_cert",
    "make_crl",
    "make_server_cert",
    "write_dev_pki",
]

# Certificates start an hour in the past so that a peer whose clock runs a little behind ours still accepts them.
CLOCK_SKEW = timedelta(hours=1)
LEAF_LIFETIME = timedelta(days=365)
CA_LIFETIME = timedelta(days=3650)
# A CRL is re-issued long before this in real life; a dev CRL should simply not expire during a demo or a test run.
CRL_LIFETIME = timedelta(days=30)

DEV_CA_NAME = "mtls-proxy dev CA"
DEV_ORGANIZATION = "mtls-proxy dev"
DEV_SPIFFE_PREFIX = "spiffe://mtls-proxy.dev/client/"


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the intermediates that must be sent with it.

    ``chain`` holds the intermediates between ``cert`` and the root, nearest first, never the root itself.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """The certificate alone, PEM."""
        return _pem(self.cert)

    def chain_pem(self) -> bytes:
        """The certificate followed by its intermediates: what a server or a client presents."""
        return b"".join(_pem(cert) for cert in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        """The private key, PKCS#8 PEM, unencrypted (dev keys; the files are protected by their mode)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the certificate's DER, the form the allow rules and the logs use."""
        return self.cert.fingerprint(hashes.SHA256()).hex()


# --- certificate authorities ---------------------------------------------------------------------------------


def make_ca(
    common_name: str,
    *,
    organization: str = DEV_ORGANIZATION,
    parent: Issued | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    path_length: int | None = None,
) -> Issued:
    """A self-signed root CA, or an intermediate CA signed by ``parent``.

    ``path_length`` limits how many intermediates may follow this CA (None = no limit).
    """
    key = _new_key()
    subject = _name(organization=organization, common_name=common_name)
    # A root signs itself: it is its own issuer, with its own key.
    issuer_name, issuer_key = (subject, key) if parent is None else (parent.cert.subject, parent.key)

    builder = _base_builder(subject, issuer_name, key, _validity(not_before, not_after, CA_LIFETIME))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    builder = builder.add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    if parent is not None:
        builder = builder.add_extension(_authority_key_id(parent), critical=False)

    cert = _sign(builder, issuer_key)
    chain = () if parent is None else _chain_below(parent)
    return Issued(cert=cert, key=key, chain=chain)


# --- leaf certificates ---------------------------------------------------------------------------------------


def make_server_cert(
    ca: Issued,
    *,
    common_name: str = "localhost",
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1", "::1"),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extended_key_usage: Iterable[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> Issued:
    """A TLS server certificate (EKU serverAuth by default) for the given DNS names and IP addresses.

    ``extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,)`` makes a certificate every TLS client refuses from a
    server, which ``check`` must catch; ``()`` leaves the EKU extension out (any purpose).
    """
    return _make_leaf(
        ca,
        _name(common_name=common_name),
        sans=[*_dns_sans(dns_names), *_ip_sans(ip_addresses)],
        extended_key_usage=tuple(extended_key_usage),
        validity=_validity(not_before, not_after, LEAF_LIFETIME),
    )


def make_client_cert(
    ca: Issued,
    *,
    common_name: str,
    organizational_unit: str | None = None,
    organization: str | None = None,
    dns_names: Iterable[str] = (),
    uris: Iterable[str] = (),
    emails: Iterable[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extended_key_usage: Iterable[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> Issued:
    """A TLS client certificate (EKU clientAuth by default).

    ``extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)`` makes a server-only certificate, which a proxy must
    refuse as a client identity; ``()`` leaves the EKU extension out (any purpose, as RFC 5280 reads it).
    """
    subject = _name(organization=organization, organizational_unit=organizational_unit, common_name=common_name)
    return _make_leaf(
        ca,
        subject,
        sans=[*_dns_sans(dns_names), *_uri_sans(uris), *_email_sans(emails)],
        extended_key_usage=tuple(extended_key_usage),
        validity=_validity(not_before, not_after, LEAF_LIFETIME),
    )


def _make_leaf(
    ca: Issued,
    subject: x509.Name,
    *,
    sans: list[x509.GeneralName],
    extended_key_usage: tuple[x509.ObjectIdentifier, ...],
    validity: tuple[datetime, datetime],
) -> Issued:
    """The part shared by server and client certificates: an end-entity key pair signed by ``ca``."""
    key = _new_key()
    builder = _base_builder(subject, ca.cert.subject, key, validity)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    # ECDHE key exchange: the leaf key only ever signs (CertificateVerify / ServerKeyExchange).
    builder = builder.add_extension(_key_usage(digital_signature=True), critical=True)
    builder = builder.add_extension(_authority_key_id(ca), critical=False)
    if extended_key_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
    if sans:
        # Non-critical is right because the subject is never empty (it always has a CN).
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(cert=_sign(builder, ca.key), key=key, chain=_chain_below(ca))


# --- revocation ----------------------------------------------------------------------------------------------


def make_crl(
    ca: Issued,
    revoked_serials: Iterable[int],
    *,
    last_update: datetime | None = None,
    next_update: datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` that revokes the certificates with the given serial numbers."""
    last_update = last_update or _now() - CLOCK_SKEW
    next_update = next_update or last_update + CRL_LIFETIME
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        # RFC 5280 5.2: conforming CRL issuers MUST include both. The number only has to grow between
        # re-issues, and the issue time in seconds does.
        .add_extension(_authority_key_id(ca), critical=False)
        .add_extension(x509.CRLNumber(int(last_update.timestamp())), critical=False)
    )
    for serial in revoked_serials:
        revoked = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last_update).build()
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(ca.key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    """The CRL as PEM, the form ``client_auth.crl`` reads."""
    return crl.public_bytes(serialization.Encoding.PEM)


# --- the dev PKI on disk -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevPKI:
    """Where :func:`write_dev_pki` put each file."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def at(cls, directory: Path) -> DevPKI:
        """Where the files of a dev PKI in ``directory`` go, or are (nothing is read or written)."""
        directory = Path(directory)
        return cls(
            dir=directory,
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
        )

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the PKI, certificates and keys, in the order they are written."""
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)


def write_dev_pki(
    directory: Path,
    *,
    overwrite: bool = False,
    server_names: Iterable[str] = ("localhost",),
    server_ips: Iterable[str] = ("127.0.0.1", "::1"),
    client_name: str = "demo-client",
) -> DevPKI:
    """Write a CA, a server certificate and a client certificate into ``directory``.

    One CA signs both, so ``curl --cacert ca.crt --cert client.crt --key client.key`` works against a proxy that
    serves ``server.crt`` and trusts ``ca.crt``. Keys are created with mode 0600. Unless ``overwrite`` is set, an
    existing target file raises :class:`FileExistsError` before anything is written.
    """
    directory = Path(directory)
    paths = DevPKI.at(directory)
    if not overwrite:
        _refuse_existing(paths)

    server_names = tuple(server_names)
    ca = make_ca(DEV_CA_NAME)
    server = make_server_cert(
        ca,
        common_name=server_names[0] if server_names else "localhost",
        dns_names=server_names,
        ip_addresses=server_ips,
    )
    client = make_client_cert(
        ca,
        common_name=client_name,
        organizational_unit="dev",
        uris=(DEV_SPIFFE_PREFIX + client_name,),
    )

    directory.mkdir(parents=True, exist_ok=True)
    for path, data, mode in [
        (paths.ca_cert, ca.cert_pem(), 0o644),
        (paths.ca_key, ca.key_pem(), 0o600),
        (paths.server_cert, server.chain_pem(), 0o644),
        (paths.server_key, server.key_pem(), 0o600),
        (paths.client_cert, client.chain_pem(), 0o644),
        (paths.client_key, client.key_pem(), 0o600),
    ]:
        _write_new_file(path, data, mode)
    return paths


def _refuse_existing(paths: DevPKI) -> None:
    """Raise FileExistsError for the first target file that already exists."""
    for path in paths.files:
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite (pass overwrite=True to replace it)", str(path))


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start, replacing any old file.

    A key must never exist, even for an instant, with a looser mode, so the mode goes to ``os.open`` rather than
    to a later chmod. Reusing an existing file would keep *its* mode, hence the unlink; O_EXCL then also refuses
    to follow a symlink planted in the directory.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


# --- building blocks -----------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _validity(
    not_before: datetime | None, not_after: datetime | None, lifetime: timedelta
) -> tuple[datetime, datetime]:
    """The validity window, each end defaulting independently (tests set one end to make expired certs)."""
    now = _now()
    return (not_before or now - CLOCK_SKEW, not_after or now + lifetime)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(
    *, common_name: str, organization: str | None = None, organizational_unit: str | None = None
) -> x509.Name:
    """A subject in the conventional most-significant-first order: O, OU, CN (RFC 4514 prints it reversed)."""
    attributes = [
        (NameOID.ORGANIZATION_NAME, organization),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit),
        (NameOID.COMMON_NAME, common_name),
    ]
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes if value is not None])


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    validity: tuple[datetime, datetime],
) -> x509.CertificateBuilder:
    """What every certificate has: names, key, random serial, validity and a subject key identifier."""
    not_before, not_after = validity
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # OpenSSL builds chains by matching AKI to SKI, and its strict mode requires both.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _sign(builder: x509.CertificateBuilder, issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(issuer_key, hashes.SHA256())


def _authority_key_id(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def _chain_below(issuer: Issued) -> tuple[x509.Certificate, ...]:
    """The intermediates a certificate signed by ``issuer`` must carry.

    None under a root; under an intermediate, the intermediate itself and then its own chain.

    Whether the issuer is a root is decided by its self-signature, not by ``issuer.chain``: an intermediate signed
    directly by a root has an empty chain too.
    """
    if _is_self_signed(issuer.cert):
        return ()
    return (issuer.cert, *issuer.chain)


def _is_self_signed(cert: x509.Certificate) -> bool:
    # Comparing subject and issuer is not enough: tests may give an intermediate the same name as its root.
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set (the constructor wants all nine)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _dns_sans(names: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.DNSName(name) for name in names]


def _ip_sans(addresses: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]


def _uri_sans(uris: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(uri) for uri in uris]


def _email_sans(emails: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.RFC822Name(email) for email in emails]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
