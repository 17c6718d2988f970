"""Load and check every file a listener names: server chain and key, CA bundles, CRLs (cryptography only).

``mtls-proxy check`` and ``run`` call this before serving, so that an unusable file is reported once, at
startup, with the config field and the file path (``listeners[0].tls.cert: /etc/mp/server.crt: file not
found``) instead of as a handshake failure seen by every client. All the problems of a listener are collected
before raising, so one run of ``check`` lists everything to fix. A server certificate that clients refuse (its
extended key usage lacks serverAuth) is such a problem; one whose names do not cover the listen address is
only a warning, since clients may well reach it by a name it holds.

The TLS layer builds its contexts from the objects returned here; it does not re-read the files.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.config.schema import Config, ConfigError, ListenerConfig

__all__ = [
    "EXPIRY_WARNING",
    "ListenerMaterials",
    "ServerCredentials",
    "ServerKey",
    "describe_key",
    "describe_name",
    "eku_name",
    "load_all",
    "load_listener_materials",
]

T = TypeVar("T")

# The private keys a server can sign its handshake with (see _server_key_problem), all of which OpenSSL's
# Context.use_privatekey takes; the loader admits no other kind as a server key.
ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
_SERVER_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

# A server certificate closer than this to its end of validity gets a warning: enough time to renew.
EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class ServerCredentials:
    """The certificate chain served to clients (leaf first, then intermediates) and the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    key: ServerKey
    cert_path: Path
    key_path: Path

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class ListenerMaterials:
    """Everything a listener's TLS context is built from, checked."""

    server: ServerCredentials
    trusted_ca: tuple[x509.Certificate, ...]  # verifies client chains; empty when mode is none
    advertised_ca: tuple[x509.Certificate, ...]  # subjects sent in CertificateRequest; == trusted_ca by default
    crls: tuple[x509.CertificateRevocationList, ...]
    warnings: tuple[str, ...]


def describe_name(name: x509.Name) -> str:
    """A DN as RFC 4514 text, the form the config's allow rules use."""
    return name.rfc4514_string()


def load_all(
    config: Config, *, now: datetime | None = None, source: str | None = None
) -> tuple[ListenerMaterials, ...]:
    """Load every listener's materials; raise one ConfigError with the problems of all listeners.

    ``source`` names the error's origin (the CLI passes the config file); by default it is the listener's
    own source when only one listener fails, else ``listeners``.
    """
    loaded: list[ListenerMaterials] = []
    errors: list[ConfigError] = []
    for index, listener in enumerate(config.listeners):
        try:
            loaded.append(load_listener_materials(listener, index, now=now))
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        default_source = errors[0].source if len(errors) == 1 else "listeners"
        problems = [problem for exc in errors for problem in exc.problems]
        raise ConfigError(str(source) if source else default_source, problems)
    return tuple(loaded)


def load_listener_materials(
    listener: ListenerConfig, index: int, *, now: datetime | None = None, source: str | None = None
) -> ListenerMaterials:
    """Load and check the files of ``listener`` (``config.listeners[index]``), or raise ConfigError.

    ``now`` is the time validity is checked against (default: the current time). The error's ``source`` is
    ``source`` if given, else the one file in question, else ``listeners[index]``.
    """
    report = _Report(prefix=f"listeners[{index}]", now=_utc(now))
    client_auth = listener.client_auth

    server = _decoded("tls.cert", listener.tls.cert, report, lambda: _load_server_credentials(listener, report), None)
    if server is not None:
        leaf = server.leaf
        _decoded("tls.cert", listener.tls.cert, report,
                 lambda: _warn_listen_host_not_named(listener, leaf, report), None)
    trusted_ca: tuple[x509.Certificate, ...] = ()
    advertised_ca: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    if (trusted_path := client_auth.trusted_ca) is not None:
        trusted_ca = _decoded("client_auth.trusted_ca", trusted_path, report,
                              lambda: _load_ca_bundle(trusted_path, "client_auth.trusted_ca", report), ())
        advertised_ca = trusted_ca
    if (advertised_path := client_auth.advertised_ca) is not None:
        advertised_ca = _decoded("client_auth.advertised_ca", advertised_path, report,
                                 lambda: _load_ca_bundle(advertised_path, "client_auth.advertised_ca", report), ())
    if (crl_path := client_auth.crl) is not None:
        crls = _decoded("client_auth.crl", crl_path, report,
                        lambda: _load_crls(crl_path, "client_auth.crl", report), ())
        _decoded("client_auth.crl", crl_path, report,
                 lambda: _warn_uncovered_cas(trusted_ca, crls, crl_path, report), None)

    if report.errors or server is None:
        raise ConfigError(str(source) if source else report.source(), report.errors)
    return ListenerMaterials(
        server=server,
        trusted_ca=trusted_ca,
        advertised_ca=advertised_ca,
        crls=crls,
        warnings=tuple(report.warnings),
    )


# --------------------------------------------------------------------------------------------------------------
# Collecting problems


class _Unusable(Exception):
    """A file cannot be used at all; the message says why (without the field and path, added by the caller)."""


@dataclass
class _Report:
    """Problems and warnings of one listener, each written ``listeners[i].field: /path: message``."""

    prefix: str
    now: datetime
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)  # files with an error, to name the source when there is one

    def error(self, field_name: str, path: Path, message: str) -> None:
        self.errors.append(f"{self.prefix}.{field_name}: {path}: {message}")
        self.files.add(path)

    def warn(self, field_name: str, path: Path, message: str) -> None:
        self.warnings.append(f"{self.prefix}.{field_name}: {path}: {message}")

    def source(self) -> str:
        return str(next(iter(self.files))) if len(self.files) == 1 else self.prefix


# What cryptography raises when it decodes a part of a certificate or CRL it had loaded: names and extensions are
# parsed lazily, on first access, so a malformed one surfaces in whichever check reads it first.
_DECODE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _decoded(field_name: str, path: Path, report: _Report, load: Callable[[], T], fallback: T) -> T:
    """Run the loading and checks of one field; a part cryptography cannot decode becomes an error of that field."""
    try:
        return load()
    except _DECODE_ERRORS as exc:
        report.error(field_name, path, f"a certificate or CRL in the file has a part that cannot be decoded ({exc})")
        return fallback


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    # cryptography's *_utc properties are aware; a naive "now" is taken to be UTC rather than failing to compare.
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


# --------------------------------------------------------------------------------------------------------------
# Reading PEM files

# A PEM block: the label tells what it holds (CERTIFICATE, PRIVATE KEY, X509 CRL, ...).
_PEM_BLOCK_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_NOT_PEM = "not a PEM file (no '-----BEGIN' line); convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Unusable("file not found") from None
    except PermissionError:
        raise _Unusable("permission denied") from None
    except IsADirectoryError:
        raise _Unusable("is a directory, not a file") from None
    except OSError as exc:
        raise _Unusable(f"cannot read: {exc.strerror or exc}") from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, whole block) for each PEM block, in file order."""
    return [(match.group(1).decode(), match.group(0)) for match in _PEM_BLOCK_RE.finditer(data)]


def _labels(blocks: list[tuple[str, bytes]]) -> str:
    return ", ".join(sorted({label for label, _ in blocks})) or "none complete"


def _read_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; _Unusable if there is none or one does not parse."""
    data = _read(path)
    if b"-----BEGIN" not in data:
        raise _Unusable(_NOT_PEM)
    return _parse_blocks(_pem_blocks(data), "CERTIFICATE", x509.load_pem_x509_certificate, "certificate",
                         "X.509 certificate")


def _parse_blocks(blocks: list[tuple[str, bytes]], label: str, load: Callable[[bytes], T], what: str,
                  valid: str) -> list[T]:
    """Parse every PEM block with ``label``; _Unusable if there is none or one does not parse."""
    chosen = [block for block_label, block in blocks if block_label == label]
    if not chosen:
        raise _Unusable(f"contains no {what} (PEM blocks found: {_labels(blocks)})")
    parsed = []
    for number, block in enumerate(chosen, start=1):
        try:
            parsed.append(load(block))
        except ValueError as exc:
            raise _Unusable(f"{what} {number} in the file is not a valid {valid} ({exc})") from None
    return parsed


def _read_private_key(path: Path) -> PrivateKeyTypes:
    data = _read(path)
    if b"-----BEGIN" not in data:
        raise _Unusable(_NOT_PEM.replace("openssl x509", "openssl pkey"))
    blocks = _pem_blocks(data)
    if not any(label.endswith("PRIVATE KEY") for label, _ in blocks):
        raise _Unusable(f"contains no private key (PEM blocks found: {_labels(blocks)})")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise _Unusable(
            "the private key is passphrase-protected, which is not supported; "
            "decrypt it with `openssl pkey -in KEY -out KEY.plain` and protect the file with permissions"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _Unusable(f"not a valid PEM private key ({exc})") from None


# --------------------------------------------------------------------------------------------------------------
# Server certificate and key


def _load_server_credentials(listener: ListenerConfig, report: _Report) -> ServerCredentials | None:
    cert_path, key_path = listener.tls.cert, listener.tls.key
    chain = _try(lambda: _read_certificates(cert_path), "tls.cert", cert_path, report)
    key = _try(lambda: _read_private_key(key_path), "tls.key", key_path, report)
    if chain is not None:
        _check_chain(chain, cert_path, report)
        _check_server_purpose(chain[0], cert_path, report)
    if chain is None or key is None:
        return None
    public_key = _try(lambda: _public_key(chain[0]), "tls.cert", cert_path, report)
    if public_key is None:
        return None
    if not _same_public_key(public_key, key):
        report.error(
            "tls.key",
            key_path,
            f"does not match the certificate in {cert_path} (subject {describe_name(chain[0].subject)}): "
            f"their public keys differ{_key_types_differ(public_key, key.public_key())}",
        )
        return None
    if problem := _server_key_problem(public_key):
        report.error("tls.cert", cert_path, f"server certificate {problem}")
        return None
    if not isinstance(key, _SERVER_KEY_TYPES):  # it matches public_key, which passed: never, but the type says so
        report.error("tls.key", key_path, f"key is {describe_key(key.public_key())}, which cannot sign a TLS handshake")
        return None
    return ServerCredentials(chain=tuple(chain), key=key, cert_path=cert_path, key_path=key_path)


def _try(load: Callable[[], T], field_name: str, path: Path, report: _Report) -> T | None:
    """Run one loader; record its _Unusable as an error of ``field_name`` and return None."""
    try:
        return load()
    except _Unusable as exc:
        report.error(field_name, path, str(exc))
        return None


def _key_types_differ(in_cert: CertificatePublicKeyTypes, in_key_file: PublicKeyTypes) -> str:
    """", and are of different kinds (...)" when they are, else nothing."""
    cert_kind, key_kind = describe_key(in_cert), describe_key(in_key_file)
    if cert_kind == key_kind:
        return ""
    return f", and are of different kinds ({cert_kind} in the certificate, {key_kind} in the key file)"


def _public_key(certificate: x509.Certificate) -> CertificatePublicKeyTypes:
    try:
        return certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _Unusable(
            f"the key of {describe_name(certificate.subject)} is of a type that cannot be used ({exc})"
        ) from None


def _same_public_key(public_key: CertificatePublicKeyTypes, key: PrivateKeyTypes) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return public_key.public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _check_chain(chain: list[x509.Certificate], path: Path, report: _Report) -> None:
    """Validity of each certificate, and order: each one must be issued by the next (clients need that)."""
    for position, certificate in enumerate(chain):
        # OpenSSL serves a certificate whose extensions do not decode, and every client refuses it; decoding
        # them here raises, and _decoded reports it.
        _ = certificate.extensions
        _check_server_validity(certificate, position, path, report)
    for position, (child, issuer) in enumerate(itertools.pairwise(chain)):
        problem = _issued_by_problem(child, position, issuer)
        if problem:
            report.error("tls.cert", path, f"{problem}; list the server certificate first, then each issuer in order")


def _chain_member(certificate: x509.Certificate, position: int) -> str:
    role = "the server certificate" if position == 0 else f"chain certificate {position + 1}"
    return f"{role} ({describe_name(certificate.subject)})"


def _issued_by_problem(child: x509.Certificate, position: int, issuer: x509.Certificate) -> str | None:
    """Why ``issuer`` (the next certificate in the file) is not the issuer of ``child``, or None."""
    who = _chain_member(child, position)
    if child.issuer != issuer.subject:
        return (
            f"{who} is issued by {describe_name(child.issuer)}, "
            f"not by the next certificate in the file, {_chain_member(issuer, position + 1)}"
        )
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature:
        # Same issuer name, different key: typically an intermediate that was re-keyed.
        return f"{who} is not signed by the key of the next certificate in the file, which has its issuer's name"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass  # a signature scheme cryptography cannot check here; the names match, the handshake will tell
    return None


def _check_server_validity(certificate: x509.Certificate, position: int, path: Path, report: _Report) -> None:
    who = _chain_member(certificate, position)
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not_after < report.now:
        report.error("tls.cert", path, f"{who} expired on {_when(not_after)}")
    elif not_before > report.now:
        report.error("tls.cert", path, f"{who} is not valid before {_when(not_before)}")
    elif not_after - report.now < EXPIRY_WARNING:
        days = (not_after - report.now).days
        report.warn("tls.cert", path, f"{who} expires in {days} days, on {_when(not_after)}")


# --------------------------------------------------------------------------------------------------------------
# What clients check of the server certificate besides its chain: its purpose and its names
#
# OpenSSL serves any certificate it is given. A client then refuses one whose extended key usage does not allow
# TLS servers ("unsuitable certificate purpose" from curl and Python's ssl, both on OpenSSL); the proxy sees only the
# client's alert and counts every handshake as `other` ("tls alert unsupported certificate"). So it is an error
# here, at `check`, at start and on reload. Names are another matter: which name a client connects by is not in
# the config, so a listen address the certificate does not hold is only a warning.

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def eku_name(usage: x509.ObjectIdentifier) -> str:
    """An extended key usage by the name OpenSSL prints for it, or its dotted number (for `check` and `probe`)."""
    return _EKU_NAMES.get(usage, usage.dotted_string)

# Either one in the extension lets a client accept the certificate from a server; no extension at all does too.
_SERVER_PURPOSES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)


def _check_server_purpose(leaf: x509.Certificate, path: Path, report: _Report) -> None:
    try:
        usages = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    if any(usage in _SERVER_PURPOSES for usage in usages):
        return
    listed = ", ".join(eku_name(usage) for usage in usages) or "nothing"
    report.error(
        "tls.cert",
        path,
        f"{_chain_member(leaf, 0)} has an extended key usage of {listed}, without serverAuth: every TLS client "
        "refuses it from a server (\"unsuitable certificate purpose\"); issue it with serverAuth in its extended "
        "key usage",
    )


def _warn_listen_host_not_named(listener: ListenerConfig, leaf: x509.Certificate, report: _Report) -> None:
    """Warn when the listen address is not among the SANs of its kind the certificate holds.

    An IP address is compared with the IP SANs, a host name with the DNS SANs. A certificate that holds none of
    that kind is meant to be reached the other way (by name, as most are), so it gets no warning; nor does the
    wildcard address (0.0.0.0, ::), which names no address a client could use.
    """
    host = listener.listen.host
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        names = sans.get_values_for_type(x509.DNSName)
        if names and not any(_dns_name_matches(pattern, host) for pattern in names):
            report.warn("tls.cert", listener.tls.cert,
                        _not_named(f"the listen host {host} is not matched by", "DNS", names,
                                   f"https://{host}:{listener.listen.port}"))
        return
    addresses = sans.get_values_for_type(x509.IPAddress)
    if addresses and not address.is_unspecified and address not in addresses:
        report.warn("tls.cert", listener.tls.cert,
                    _not_named(f"the listen address {host} is not among", "IP", [str(a) for a in addresses],
                               f"https://{listener.listen}"))


def _not_named(what: str, kind: str, held: list[str], url: str) -> str:
    return (
        f"{what} the server certificate's {kind} SANs ({', '.join(held)}): a client that connects to {url} "
        "refuses the certificate (name mismatch); ignore this if clients use a name it holds"
    )


def _dns_name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 matching: case-insensitive, a wildcard only as the whole leftmost label, for exactly one label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == host
    first, _, rest = host.partition(".")
    return bool(first) and rest == pattern[2:]


# --------------------------------------------------------------------------------------------------------------
# Key types and sizes
#
# OpenSSL refuses keys below its security level when the Context is built (server key: "ee key too small") or,
# worse, on every handshake (a trusted CA's key: X509 error "CA certificate key too weak"). The level this build
# runs at is 2, 112-bit security, measured: RSA 1024 and EC secp192r1 are refused, RSA 2048 and EC secp224r1 are
# accepted. Checking here lets `check` say which key and what it needs, before anything is built.
#
# OpenSSL also accepts server keys that no client can use. Measured with Python's ssl (OpenSSL 3.0) as the client,
# TLS 1.2 and 1.3 each: a DSA, secp224r1, secp256k1 or brainpoolP256r1 server key fails every handshake ("no shared
# cipher", "unsupported protocol", "no suitable signature algorithm"); RSA 2048, P-256, Ed25519 and Ed448 work.

_MIN_RSA_DSA_BITS = 2048
_MIN_EC_BITS = 224
# The curves TLS 1.3 signs with (ecdsa_secp256r1_sha256 and its two siblings), which every client offers.
_TLS_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_SECURITY_LEVEL = "OpenSSL's security level (2, 112-bit security)"


def describe_key(key: PublicKeyTypes) -> str:
    """A key's algorithm and size as an operator would name it: "RSA 1024 bits", "EC secp192r1", "Ed448"."""
    if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)):
        return f"{'RSA' if isinstance(key, rsa.RSAPublicKey) else 'DSA'} {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__.removeprefix("_").removesuffix("PublicKey") or "unknown key type"


def key_too_small(key: PublicKeyTypes) -> str | None:
    """Why OpenSSL's security level refuses ``key``, or None."""
    if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)) and key.key_size < _MIN_RSA_DSA_BITS:
        return f"key too small: {describe_key(key)}; {_SECURITY_LEVEL} needs {_MIN_RSA_DSA_BITS} or more"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < _MIN_EC_BITS:
        return (
            f"key too small: {describe_key(key)} ({key.curve.key_size} bits); "
            f"{_SECURITY_LEVEL} needs a curve of {_MIN_EC_BITS} bits or more, such as secp256r1"
        )
    return None


def _server_key_problem(key: CertificatePublicKeyTypes) -> str | None:
    """Why ``key`` cannot serve TLS (too small, or of a kind no client signs with), or None."""
    if problem := key_too_small(key):
        return problem
    if isinstance(key, dsa.DSAPublicKey):
        return (
            f"key is {describe_key(key)}: TLS 1.3 has no DSA signature and the TLS 1.2 cipher suites offered "
            "need an ECDSA or RSA key, so every handshake would fail; use an ECDSA P-256 or RSA 2048 key"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _TLS_CURVES:
        return (
            f"key is on curve {key.curve.name}: TLS clients verify handshake signatures only on "
            f"{', '.join(_TLS_CURVES)}, so every handshake would fail; use an ECDSA P-256 key"
        )
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                            ed448.Ed448PublicKey)):
        return f"key is {describe_key(key)}, which cannot sign a TLS handshake"
    return None


def _check_ca_key(certificate: x509.Certificate, number: int, path: Path, report: _Report) -> None:
    who = f"entry {number} ({describe_name(certificate.subject)})"
    try:
        problem = key_too_small(_public_key(certificate))
    except _Unusable as exc:
        problem = str(exc)
    if problem:
        report.error("client_auth.trusted_ca", path,
                     f"{who}: {problem}; every client chain through this CA would fail verification")


# --------------------------------------------------------------------------------------------------------------
# CA bundles and CRLs


def _load_ca_bundle(path: Path, field_name: str, report: _Report) -> tuple[x509.Certificate, ...]:
    """A bundle of CA certificates: each must be a CA, and at least one must be within its validity."""
    certificates = _try(lambda: _read_certificates(path), field_name, path, report)
    if certificates is None:
        return ()
    for number, certificate in enumerate(certificates, start=1):
        if field_name == "client_auth.trusted_ca":
            # Only the trust store verifies with the CA's key; advertised_ca only sends its name.
            _check_ca_key(certificate, number, path, report)
        if not _is_ca(certificate):
            report.error(
                field_name,
                path,
                f"entry {number} ({describe_name(certificate.subject)}) is not a CA certificate "
                "(basicConstraints CA:TRUE is missing); the bundle must hold the CAs that issue client "
                "certificates, not client certificates",
            )
    expired = [certificate for certificate in certificates if certificate.not_valid_after_utc < report.now]
    if expired and len(expired) == len(certificates):
        report.error(field_name, path, f"every CA in the bundle has expired: {_expiry_list(expired)}")
    elif expired:
        report.warn(field_name, path, f"some CAs in the bundle have expired: {_expiry_list(expired)}")
    return tuple(certificates)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _expiry_list(certificates: list[x509.Certificate]) -> str:
    return "; ".join(
        f"{describe_name(certificate.subject)} on {_when(certificate.not_valid_after_utc)}"
        for certificate in certificates
    )


def _load_crls(path: Path, field_name: str, report: _Report) -> tuple[x509.CertificateRevocationList, ...]:
    crls = _try(lambda: _read_crls(path), field_name, path, report)
    if crls is None:
        return ()
    for crl in crls:
        # OpenSSL rejects every client chained to a CA whose CRL is past its next update.
        next_update = crl.next_update_utc
        if next_update is not None and next_update < report.now:
            report.warn(
                field_name,
                path,
                f"the CRL of {describe_name(crl.issuer)} is out of date (next update was due {_when(next_update)})",
            )
    return tuple(crls)


def _warn_uncovered_cas(
    trusted_ca: tuple[x509.Certificate, ...],
    crls: tuple[x509.CertificateRevocationList, ...],
    path: Path,
    report: _Report,
) -> None:
    """Revocation is checked where a CRL is given; say which trusted CAs have none."""
    covered = {crl.issuer for crl in crls}
    for ca in trusted_ca:
        if crls and ca.subject not in covered:
            report.warn(
                "client_auth.crl",
                path,
                f"no CRL issued by {describe_name(ca.subject)}: "
                "revocation is not checked for the certificates it issues",
            )


def _read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (one per CA), or the single CRL of a DER file."""
    data = _read(path)
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_crl(data)]
        except ValueError:
            raise _Unusable("not a CRL (neither PEM with '-----BEGIN X509 CRL' blocks nor DER)") from None
    return _parse_blocks(_pem_blocks(data), "X509 CRL", x509.load_pem_x509_crl, "CRL", "CRL")
