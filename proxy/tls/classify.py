"""Turn a failed handshake into one reason from the closed set, plus a detail.

The reason is a metric label (a small, fixed vocabulary operators alert on);
the detail is for the log line and says exactly what happened.

Sources, most specific first: the handshake timed out; the client's first bytes
were not TLS at all; the verify callback recorded an X509 error code (the
precise cause of a certificate rejection) or an allow-rule denial; OpenSSL's
error reason strings; the transport failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from OpenSSL import SSL

from proxy.tls.context import HandshakeRecord

REASONS = (
    "no_client_cert",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "revoked",
    "bad_certificate",
    "forbidden",
    "protocol_version",
    "no_shared_cipher",
    "not_tls",
    "timeout",
    "client_closed",
    "other",
)

# A TLS connection opens with a handshake record: content type 22.
_TLS_HANDSHAKE_RECORD = 0x16

# X509_V_ERR_* codes (include/openssl/x509_vfy.h) -> (reason, what it means).
# Codes not listed are `bad_certificate` with OpenSSL's number in the detail.
X509_ERRORS: dict[int, tuple[str, str]] = {
    2: ("unknown_ca", "unable to get issuer certificate"),
    3: ("bad_certificate", "unable to get certificate CRL"),
    4: ("bad_certificate", "unable to decrypt certificate signature"),
    6: ("bad_certificate", "unable to decode issuer public key"),
    7: ("bad_certificate", "certificate signature failure"),
    8: ("bad_certificate", "CRL signature failure"),
    9: ("not_yet_valid", "certificate is not yet valid"),
    10: ("expired", "certificate has expired"),
    11: ("bad_certificate", "CRL is not yet valid"),
    12: ("bad_certificate", "CRL has expired"),
    13: ("bad_certificate", "format error in certificate's notBefore field"),
    14: ("bad_certificate", "format error in certificate's notAfter field"),
    18: ("unknown_ca", "self-signed certificate"),
    19: ("unknown_ca", "self-signed certificate in certificate chain"),
    20: ("unknown_ca", "unable to get local issuer certificate"),
    21: ("unknown_ca", "unable to verify the first certificate"),
    22: ("bad_certificate", "certificate chain too long (verify_depth)"),
    23: ("revoked", "certificate revoked"),
    24: ("bad_certificate", "invalid CA certificate"),
    25: ("bad_certificate", "path length constraint exceeded"),
    26: ("bad_certificate", "unsupported certificate purpose (not for client authentication)"),
    28: ("bad_certificate", "certificate rejected"),
    32: ("bad_certificate", "key usage does not include certificate signing"),
    34: ("bad_certificate", "unhandled critical extension"),
    36: ("bad_certificate", "unhandled critical CRL extension"),
}

# Substrings of OpenSSL error reasons -> reason. Checked in order.
_OPENSSL_REASONS: tuple[tuple[str, str], ...] = (
    ("peer did not return a certificate", "no_client_cert"),
    ("http request", "not_tls"),
    ("https proxy request", "not_tls"),
    ("unsupported protocol", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("version too low", "protocol_version"),
    ("wrong version number", "protocol_version"),
    ("alert protocol version", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
    ("no shared signature algorithms", "no_shared_cipher"),
    ("no suitable signature algorithm", "no_shared_cipher"),
    ("no suitable key share", "no_shared_cipher"),
    ("no shared groups", "no_shared_cipher"),
    ("unexpected eof", "client_closed"),
    ("certificate verify failed", "bad_certificate"),
)


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    reason: str
    detail: str


def describe_x509_error(errno: int, depth: int) -> tuple[str, str]:
    reason, text = X509_ERRORS.get(errno, ("bad_certificate", "certificate verification failed"))
    where = "client certificate" if depth == 0 else f"CA certificate at depth {depth}"
    return reason, f"{text} ({where}, X509 error {errno})"


def openssl_reasons(exc: SSL.Error) -> list[str]:
    """The reason strings of an SSL.Error (args[0] is [(lib, func, reason), ...])."""
    out: list[str] = []
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list):
        for entry in errors:
            if isinstance(entry, tuple) and entry:
                out.append(str(entry[-1]))
    elif errors is not None:
        out.append(str(errors))
    return out


def classify_openssl_reasons(reasons: list[str]) -> str:
    for text in reasons:
        low = text.lower()
        for needle, reason in _OPENSSL_REASONS:
            if needle in low:
                return reason
    return "other"


def classify(exc: BaseException, record: HandshakeRecord | None, first_bytes: bytes) -> HandshakeFailure:
    if isinstance(exc, trio.TooSlowError):
        got = "nothing" if not first_bytes else "an incomplete handshake"
        return HandshakeFailure("timeout", f"handshake deadline passed; the client sent {got}")
    if first_bytes and first_bytes[0] != _TLS_HANDSHAKE_RECORD:
        return HandshakeFailure("not_tls", f"the client's first bytes are not a TLS handshake: {first_bytes!r}")
    if record is not None:
        if record.errors:
            reason, detail = describe_x509_error(*record.errors[0])
            return HandshakeFailure(reason, detail)
        if record.denied:
            return HandshakeFailure("forbidden", "verified client certificate matches no allow rule")
    if isinstance(exc, (SSL.SysCallError, SSL.ZeroReturnError)):
        return HandshakeFailure("client_closed", "the client closed the connection during the handshake")
    if isinstance(exc, SSL.Error):
        reasons = openssl_reasons(exc)
        reason = classify_openssl_reasons(reasons)
        detail = "; ".join(reasons) or "TLS error"
        if reason == "other" and any("alert" in r for r in reasons):
            detail = f"the client sent an alert: {detail}"
        return HandshakeFailure(reason, detail)
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__ or exc.__context__
        return HandshakeFailure("client_closed", f"the connection broke during the handshake ({cause or exc})")
    if isinstance(exc, trio.ClosedResourceError):
        return HandshakeFailure("other", "the connection was closed locally during the handshake")
    return HandshakeFailure("other", f"{type(exc).__name__}: {exc}")
