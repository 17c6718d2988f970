"""Certificate facts for ``mtls-proxy probe``: what a certificate says, and whether it fits what the server asked for.

Pure: ``cryptography`` only, no sockets. The CA names of a CertificateRequest arrive from pyOpenSSL as DER
(``X509Name.der()``); a certificate's issuer is compared with them as DER too, which is how a TLS client that picks
its certificate by the request compares them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.config.materials import describe_key, eku_name

__all__ = [
    "DN",
    "CertInfo",
    "chain_match",
    "client_certificate_problems",
    "describe",
    "dn_from_components",
    "dn_from_name",
    "hostname_matches",
    "load_chain",
]

# RFC 4514, section 2.4: characters escaped anywhere in an attribute value.
_DN_SPECIAL = frozenset(',+"\\<>;')


@dataclass(frozen=True)
class DN:
    """A distinguished name: its DER (for comparing) and its RFC 4514 text (for people)."""

    der: bytes
    text: str


def dn_from_name(name: x509.Name) -> DN:
    return DN(der=name.public_bytes(), text=name.rfc4514_string())


def dn_from_components(der: bytes, components: list[tuple[bytes, bytes]]) -> DN:
    """A DN from pyOpenSSL's ``X509Name``: ``der()`` and ``get_components()`` (most significant first).

    The text is written the way ``x509.Name.rfc4514_string`` writes the common attributes (CN, OU, O, L, ST, C,
    DC), least significant first, so a listed CA name and a certificate's issuer print alike.
    """
    parts = [f"{key.decode('ascii', 'replace')}={_escape(value.decode('utf-8', 'replace'))}"
             for key, value in components]
    return DN(der=der, text=",".join(reversed(parts)))


def _escape(value: str) -> str:
    out = "".join(f"\\{ch}" if ch in _DN_SPECIAL else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


@dataclass(frozen=True)
class CertInfo:
    """What an operator wants to see of one certificate, already turned into text."""

    subject: str
    issuer: str
    serial: str  # hex, as openssl prints it
    sha256: str  # hex of the DER, the form the proxy's allow rules and logs use
    not_before: datetime
    not_after: datetime
    names: tuple[str, ...]  # subjectAltName entries: "DNS:…", "IP:…", "URI:…", "email:…"
    key: str  # "EC secp256r1", "RSA 2048 bits"
    key_usage: tuple[str, ...] | None  # None: no keyUsage extension (any use)
    extended_key_usage: tuple[str, ...] | None  # None: no extendedKeyUsage extension (any purpose)
    is_ca: bool

    def state(self, now: datetime) -> str:
        """"valid", "expired" or "not_yet_valid" (the last two are the proxy's reason words)."""
        if now < self.not_before:
            return "not_yet_valid"
        if now > self.not_after:
            return "expired"
        return "valid"

    def validity_text(self, now: datetime) -> str:
        span = f"{_day(self.not_before)} to {_day(self.not_after)}"
        state = self.state(now)
        if state == "expired":
            return f"{span} (EXPIRED {_days(now - self.not_after)} ago)"
        if state == "not_yet_valid":
            return f"{span} (NOT YET VALID, starts in {_days(self.not_before - now)})"
        return f"{span} ({_days(self.not_after - now)} left)"


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _days(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    days = int(seconds // 86400)
    if days >= 1:
        return f"{days} day{'s' if days != 1 else ''}"
    hours = int(seconds // 3600)
    return f"{hours} hour{'s' if hours != 1 else ''}"


def describe(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "X"),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        names=_subject_alt_names(cert),
        key=describe_key(cert.public_key()),
        key_usage=_key_usage(cert),
        extended_key_usage=_extended_key_usage(cert),
        is_ca=_is_ca(cert),
    )


def _extension_value(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        # A malformed extension is shown as absent: probe describes, the server decides.
        return None


def _subject_alt_names(cert: x509.Certificate) -> tuple[str, ...]:
    sans = _extension_value(cert, x509.SubjectAlternativeName)
    if not isinstance(sans, x509.SubjectAlternativeName):
        return ()
    out: list[str] = []
    out += [f"DNS:{name}" for name in sans.get_values_for_type(x509.DNSName)]
    out += [f"IP:{address}" for address in sans.get_values_for_type(x509.IPAddress)]
    out += [f"URI:{uri}" for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"email:{mail}" for mail in sans.get_values_for_type(x509.RFC822Name)]
    return tuple(out)


def _key_usage(cert: x509.Certificate) -> tuple[str, ...] | None:
    usage = _extension_value(cert, x509.KeyUsage)
    if not isinstance(usage, x509.KeyUsage):
        return None
    bits = [
        ("digitalSignature", usage.digital_signature),
        ("contentCommitment", usage.content_commitment),
        ("keyEncipherment", usage.key_encipherment),
        ("dataEncipherment", usage.data_encipherment),
        ("keyAgreement", usage.key_agreement),
        ("keyCertSign", usage.key_cert_sign),
        ("cRLSign", usage.crl_sign),
    ]
    if usage.key_agreement:  # cryptography refuses to read these two otherwise
        bits += [("encipherOnly", usage.encipher_only), ("decipherOnly", usage.decipher_only)]
    return tuple(name for name, present in bits if present)


def _extended_key_usage(cert: x509.Certificate) -> tuple[str, ...] | None:
    usage = _extension_value(cert, x509.ExtendedKeyUsage)
    if not isinstance(usage, x509.ExtendedKeyUsage):
        return None
    return tuple(eku_name(oid) for oid in usage)


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension_value(cert, x509.BasicConstraints)
    return isinstance(constraints, x509.BasicConstraints) and constraints.ca


def load_chain(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file, in file order (leaf first). Raises ValueError when there are none."""
    data = path.read_bytes()
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise ValueError(f"{path}: no PEM certificate in it")
    return chain


def chain_match(chain: list[x509.Certificate], listed: list[DN]) -> DN | None:
    """The listed CA name the chain leads to, or None.

    A chain leads to a listed name when its leaf's issuer is that name, or when one of the intermediates sent
    with it is (or was issued by) that name: a server that trusts an intermediate or the root above it lists the
    one it trusts.
    """
    if not chain:
        return None
    by_der = {name.der: name for name in listed}
    candidates = [chain[0].issuer]
    for intermediate in chain[1:]:
        candidates += [intermediate.subject, intermediate.issuer]
    for name in candidates:
        found = by_der.get(name.public_bytes())
        if found is not None:
            return found
    return None


def client_certificate_problems(info: CertInfo, now: datetime | None = None) -> list[str]:
    """What in a client certificate makes a careful server refuse it, in plain words (empty: nothing)."""
    now = now or datetime.now(UTC)
    problems: list[str] = []
    state = info.state(now)
    if state == "expired":
        problems.append(f"it expired on {_day(info.not_after)}")
    elif state == "not_yet_valid":
        problems.append(f"it is not valid before {_day(info.not_before)}")
    eku = info.extended_key_usage
    if eku is not None and not {"clientAuth", "anyExtendedKeyUsage"} & set(eku):
        problems.append(f"its extended key usage ({', '.join(eku) or 'empty'}) does not allow client authentication")
    if info.key_usage is not None and "digitalSignature" not in info.key_usage:
        problems.append("its key usage lacks digitalSignature, which a client needs to sign the handshake")
    if info.is_ca:
        problems.append("it is a CA certificate (basicConstraints CA:TRUE), which strict servers refuse as a client")
    return problems


def hostname_matches(cert: x509.Certificate, hostname: str) -> bool:
    """Whether ``hostname`` (a DNS name or an IP address) is one of the certificate's subjectAltNames.

    RFC 6125 as browsers apply it: no fallback to the CN, and a wildcard stands for exactly one whole label,
    the leftmost.
    """
    sans = _extension_value(cert, x509.SubjectAlternativeName)
    if not isinstance(sans, x509.SubjectAlternativeName):
        return False
    try:
        address = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        wanted = hostname.rstrip(".").lower()
        return any(_dns_match(pattern, wanted) for pattern in sans.get_values_for_type(x509.DNSName))
    return address in sans.get_values_for_type(x509.IPAddress)


def _dns_match(pattern: str, hostname: str) -> bool:
    pattern = pattern.rstrip(".").lower()
    if not pattern.startswith("*."):
        return pattern == hostname
    first, _, rest = hostname.partition(".")
    return bool(first) and rest == pattern[2:]
