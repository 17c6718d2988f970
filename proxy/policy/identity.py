"""Who is on the other end: a client certificate chain reduced to a frozen PeerIdentity.

Pure: cryptography only, no I/O. It runs strictly after the handshake (peer details exist only then) and also on
certificates that failed verification, so that the access log can name a rejected client. That second use means
the input is attacker-controlled: every field must come out of any certificate that cryptography can load.

cryptography parses a certificate's outer structure at load time but decodes the names and extensions lazily, on
first access. A badly encoded subject (invalid UTF-8, a BIT STRING where a string belongs), a duplicated or
malformed extension, or a general-name type it does not support all surface as exceptions there. Each lazy field
is therefore read through `_parse`, which turns those errors into a neutral fallback: an unparseable DN becomes
UNPARSEABLE and unreadable SANs become empty tuples, so authorization can only fail closed on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

# Stands in for a DN that cryptography cannot decode. It contains no "=", so it can never equal an RFC 4514 DN
# from the config, and it reads clearly in a log line.
UNPARSEABLE = "<unparseable>"

# What cryptography raises from the lazy accessors on a certificate it did load (see the module docstring).
_PARSE_ERRORS = (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    subject: str  # leaf subject, RFC 4514 (x509.Name.rfc4514_string), or UNPARSEABLE
    issuer: str  # leaf issuer, RFC 4514, or UNPARSEABLE
    serial: str  # lowercase hex, no 0x
    sha256: str  # lowercase hex SHA-256 of the leaf's DER
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    common_names: tuple[str, ...]
    organizational_units: tuple[str, ...]
    organizations: tuple[str, ...]
    dns_sans: tuple[str, ...]
    uri_sans: tuple[str, ...]
    ip_sans: tuple[str, ...]
    email_sans: tuple[str, ...]
    # RFC 4514 subjects of every CA in the verified chain, the leaf's issuer first, up to the root. When only the
    # leaf is known (rejected certificate, resumed session) this is just (issuer,).
    chain_issuers: tuple[str, ...]

    def remaining_seconds(self, now: datetime) -> float:
        """Seconds until the leaf expires; negative once it has. `now` must be timezone-aware."""
        return (self.not_after - now).total_seconds()

    def log_fields(self) -> dict[str, str]:
        """The fields the access log prints: public certificate data only.

        DNs are attacker-chosen text and RFC 4514 does not escape control characters, so they are made printable
        here: a newline in a subject must not forge a second line in a text-format log.
        """
        return {
            "subject": _printable(self.subject),
            "issuer": _printable(self.issuer),
            "serial": self.serial,
            "sha256": self.sha256,
            "not_after": self.not_after.isoformat(),
        }


def identity_from_chain(chain: Sequence[x509.Certificate]) -> PeerIdentity:
    """Identity of a verified chain: chain[0] is the leaf, the rest are its CAs up to the root.

    This is the order of pyOpenSSL's `Connection.get_verified_chain(as_cryptography=True)`.
    """
    if not chain:
        raise ValueError("a certificate chain needs at least the leaf")
    return _identity(chain[0], cas=chain[1:])


def identity_from_cert(cert: x509.Certificate) -> PeerIdentity:
    """Identity of a lone leaf, e.g. a rejected certificate or a resumed session (no verified chain)."""
    return _identity(cert, cas=())


def _identity(leaf: x509.Certificate, cas: Sequence[x509.Certificate]) -> PeerIdentity:
    subject = _subject(leaf)
    issuer = _rfc4514(_issuer(leaf))
    sans = _parse(lambda: _subject_alt_names(leaf), None)
    return PeerIdentity(
        subject=_rfc4514(subject),
        issuer=issuer,
        serial=format(leaf.serial_number, "x"),
        sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        common_names=_attribute_values(subject, NameOID.COMMON_NAME),
        organizational_units=_attribute_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        organizations=_attribute_values(subject, NameOID.ORGANIZATION_NAME),
        dns_sans=_san_values(sans, x509.DNSName),
        uri_sans=_san_values(sans, x509.UniformResourceIdentifier),
        ip_sans=_san_values(sans, x509.IPAddress),
        email_sans=_san_values(sans, x509.RFC822Name),
        chain_issuers=tuple(_rfc4514(_subject(ca)) for ca in cas) or (issuer,),
    )


def _parse(read: Callable[[], _T], fallback: _T) -> _T:
    """Run one lazy cryptography accessor; a field it cannot decode yields `fallback` instead of an error."""
    try:
        return read()
    except _PARSE_ERRORS:
        return fallback


def _subject(cert: x509.Certificate) -> x509.Name | None:
    return _parse(lambda: cert.subject, None)


def _issuer(cert: x509.Certificate) -> x509.Name | None:
    return _parse(lambda: cert.issuer, None)


def _rfc4514(name: x509.Name | None) -> str:
    return UNPARSEABLE if name is None else name.rfc4514_string()


def _subject_alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _attribute_values(name: x509.Name | None, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    if name is None:
        return ()
    # Only X500UniqueIdentifier may hold bytes, so this filter drops nothing in practice; it keeps the type honest.
    return tuple(a.value for a in name.get_attributes_for_oid(oid) if isinstance(a.value, str))


def _san_values(sans: x509.SubjectAlternativeName | None, kind: type[x509.GeneralName]) -> tuple[str, ...]:
    if sans is None:
        return ()
    # str() gives IP addresses their usual text form ("2001:db8::1"); the other kinds hold str already.
    return tuple(str(name.value) for name in sans if isinstance(name, kind))


def _printable(text: str) -> str:
    """Escape control and other non-printable characters the way repr() would (a newline becomes \\n)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
