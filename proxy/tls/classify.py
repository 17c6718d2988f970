"""Turn a failed handshake into one reason from the closed set, plus a detail.

The reason is a metric label (a small, fixed vocabulary operators alert on);
the detail is for the log line and says exactly what happened.

Sources, most specific first: the handshake timed out; the client's first bytes
were not TLS at all; the verify callback recorded an X509 error code (the
precise cause of a certificate rejection), a strict leaf rule the certificate
broke, or an allow-rule denial; OpenSSL's error reason strings; the transport
failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL

from proxy.tls._openssl import verify_error_text, x509_error

if TYPE_CHECKING:  # context imports this module for the X509 error codes
    from proxy.tls.context import HandshakeRecord

class Reason(enum.StrEnum):
    """Why a handshake failed: the ``reason`` label of the failure metrics and of the access log.

    A closed set: the metrics create one series per member, and alert rules name them.
    """

    NO_CLIENT_CERT = "no_client_cert"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    BAD_CERTIFICATE = "bad_certificate"
    FORBIDDEN = "forbidden"
    PROTOCOL_VERSION = "protocol_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    NOT_TLS = "not_tls"
    TIMEOUT = "timeout"
    CLIENT_CLOSED = "client_closed"
    OTHER = "other"


REASONS: tuple[Reason, ...] = tuple(Reason)

# A TLS connection opens with a handshake record: content type 22.
_TLS_HANDSHAKE_RECORD = 0x16

# ---- OpenSSL's verification vocabulary ---------------------------------------
#
# X509_V_ERR_* numbers change between OpenSSL versions (24 meant "invalid CA
# certificate" until 1.1.1; since 3.0 that is 79 and 24 is "issuer
# certificate doesn't have a public key"), so every number here comes from the
# linked library's own header, x509_vfy.h, as pyOpenSSL's cffi bindings expose
# it, and every text from its X509_verify_cert_error_string. pyOpenSSL has no
# public API for either: proxy.tls._openssl reads them (x509_error,
# verify_error_text).

X509_V_ERR_CERT_REJECTED = x509_error("X509_V_ERR_CERT_REJECTED")  # what the strict leaf rules report


# X509 error -> reason, for the codes that are not `bad_certificate` (signature,
# purpose, depth, weak key, malformed, ... and the strict leaf rules).
X509_REASONS: dict[int, Reason] = {
    x509_error("X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT"): Reason.UNKNOWN_CA,
    x509_error("X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT"): Reason.UNKNOWN_CA,
    x509_error("X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN"): Reason.UNKNOWN_CA,
    x509_error("X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"): Reason.UNKNOWN_CA,
    x509_error("X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE"): Reason.UNKNOWN_CA,
    x509_error("X509_V_ERR_CERT_NOT_YET_VALID"): Reason.NOT_YET_VALID,
    x509_error("X509_V_ERR_CERT_HAS_EXPIRED"): Reason.EXPIRED,
    x509_error("X509_V_ERR_CERT_REVOKED"): Reason.REVOKED,
}

# Where OpenSSL's words leave the operator guessing which setting is involved.
_X509_HINTS: dict[int, str] = {
    x509_error("X509_V_ERR_CERT_CHAIN_TOO_LONG"): "more intermediates than client_auth.verify_depth allows",
    x509_error("X509_V_ERR_INVALID_PURPOSE"): "its extended key usage does not allow client authentication",
}


# Substrings of OpenSSL error reasons -> reason. Checked in order.
_OPENSSL_REASONS: tuple[tuple[str, Reason], ...] = (
    ("peer did not return a certificate", Reason.NO_CLIENT_CERT),
    ("http request", Reason.NOT_TLS),
    ("https proxy request", Reason.NOT_TLS),
    ("unsupported protocol", Reason.PROTOCOL_VERSION),
    ("no protocols available", Reason.PROTOCOL_VERSION),
    ("version too low", Reason.PROTOCOL_VERSION),
    ("wrong version number", Reason.PROTOCOL_VERSION),
    ("alert protocol version", Reason.PROTOCOL_VERSION),
    ("no shared cipher", Reason.NO_SHARED_CIPHER),
    ("no shared signature algorithms", Reason.NO_SHARED_CIPHER),
    ("no suitable signature algorithm", Reason.NO_SHARED_CIPHER),
    ("no suitable key share", Reason.NO_SHARED_CIPHER),
    ("no shared groups", Reason.NO_SHARED_CIPHER),
    ("unexpected eof", Reason.CLIENT_CLOSED),
    ("certificate verify failed", Reason.BAD_CERTIFICATE),
)


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    reason: Reason
    detail: str


def describe_x509_error(errno: int, depth: int) -> tuple[Reason, str]:
    """(reason, detail) for an X509 error the verify callback recorded at ``depth``."""
    where = "client certificate" if depth == 0 else f"CA certificate at depth {depth}"
    hint = f"; {_X509_HINTS[errno]}" if errno in _X509_HINTS else ""
    detail = f"{verify_error_text(errno)} ({where}, X509 error {errno}{hint})"
    return X509_REASONS.get(errno, Reason.BAD_CERTIFICATE), detail


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


def classify_openssl_reasons(reasons: list[str]) -> Reason:
    for text in reasons:
        low = text.lower()
        for needle, reason in _OPENSSL_REASONS:
            if needle in low:
                return reason
    return Reason.OTHER


def classify(exc: BaseException, record: HandshakeRecord | None, first_bytes: bytes) -> HandshakeFailure:
    if isinstance(exc, trio.TooSlowError):
        got = "nothing" if not first_bytes else "an incomplete handshake"
        return HandshakeFailure(Reason.TIMEOUT, f"handshake deadline passed; the client sent {got}")
    if first_bytes and first_bytes[0] != _TLS_HANDSHAKE_RECORD:
        return HandshakeFailure(Reason.NOT_TLS, f"the client's first bytes are not a TLS handshake: {first_bytes!r}")
    if record is not None:
        if record.errors:
            reason, detail = describe_x509_error(*record.errors[0])
            return HandshakeFailure(reason, detail)
        if record.refusal is not None:
            return HandshakeFailure(Reason.BAD_CERTIFICATE, record.refusal)
        if record.denied:
            return HandshakeFailure(Reason.FORBIDDEN, "verified client certificate matches no allow rule")
    if isinstance(exc, (SSL.SysCallError, SSL.ZeroReturnError)):
        return HandshakeFailure(Reason.CLIENT_CLOSED, "the client closed the connection during the handshake")
    if isinstance(exc, SSL.Error):
        reasons = openssl_reasons(exc)
        reason = classify_openssl_reasons(reasons)
        detail = "; ".join(reasons) or "TLS error"
        if reason is Reason.OTHER and any("alert" in r for r in reasons):
            detail = f"the client sent an alert: {detail}"
        return HandshakeFailure(reason, detail)
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__ or exc.__context__
        return HandshakeFailure(Reason.CLIENT_CLOSED, f"the connection broke during the handshake ({cause or exc})")
    if isinstance(exc, trio.ClosedResourceError):
        return HandshakeFailure(Reason.OTHER, "the connection was closed locally during the handshake")
    return HandshakeFailure(Reason.OTHER, f"{type(exc).__name__}: {exc}")
