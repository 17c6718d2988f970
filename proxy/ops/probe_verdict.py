"""What one probed handshake means: admitted, refused (and why, in the proxy's reason words), or a failure to probe.

Pure: it reads an :class:`~proxy.ops.probe_tls.Observation` and what we know of our own certificate, nothing else.

The reason words are those of ``proxy.tls.classify.REASONS``, the vocabulary of the proxy's metrics and logs, so
that what ``probe`` says on the client's side is what the proxy counts on its side. Where they come from, best
first:

1. The alert the server sent. Most alerts name their reason directly. ``handshake_failure`` does not: before the
   ServerHello it means no cipher suite or group in common; after a CertificateRequest that we answered with no
   certificate it is how TLS 1.2 servers (OpenSSL's, and mtls-proxy's) say "no certificate"; after we sent one it
   is what mtls-proxy sends when the allow rules refuse a verified certificate (``forbidden``; see
   ``_accept_leaf`` in proxy/tls/context.py).
2. An HTTP answer: nginx completes the handshake whatever the client sent and refuses the certificate with a 400
   page that says "No required SSL certificate was sent" or "The SSL certificate error".
3. Inference, when the server only closed the connection (nginx's stream module does that): from what we know of
   our own side (no certificate sent although one was asked for, an expired certificate, one that leads to none
   of the listed CA names). The verdict says when its reason is inferred.

"Admitted" means the handshake completed and, in the moment we listened afterwards, the server neither sent an
alert nor closed the connection (or it sent data, or answered the HTTP question without refusing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.ops.probe_certs import DN
from proxy.ops.probe_tls import Observation

__all__ = [
    "ALERT_NAMES",
    "EXIT_ADMITTED",
    "EXIT_PROBLEM",
    "EXIT_REFUSED",
    "Judgement",
    "OwnCertificate",
    "Verdict",
    "judge",
    "overall",
    "quiet_suspicion",
]

EXIT_ADMITTED, EXIT_REFUSED, EXIT_PROBLEM = 0, 1, 2

# TLS alert descriptions (RFC 8446 section 6, RFC 5246 section 7.2), the names OpenSSL and Wireshark print.
ALERT_NAMES: dict[int, str] = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}

_HANDSHAKE_FAILURE = 40
_CERTIFICATE_EXPIRED = 45
_PROTOCOL_VERSION_ALERTS = frozenset({70, 86})

# Alert -> reason where the alert alone says it. OpenSSL sends certificate_expired for a certificate that is not
# valid yet as well; judge() tells the two apart by our certificate's dates.
_ALERT_REASONS: dict[int, str] = {
    42: "bad_certificate",
    43: "bad_certificate",
    44: "revoked",
    45: "expired",
    46: "bad_certificate",
    48: "unknown_ca",
    49: "forbidden",
    70: "protocol_version",
    71: "no_shared_cipher",
    86: "protocol_version",
    116: "no_client_cert",
}

# Our own OpenSSL's words for a failure on our side (no alert from the server), checked in order.
_LOCAL_REASONS: tuple[tuple[str, str], ...] = (
    ("wrong version number", "not_tls"),
    ("packet length too long", "not_tls"),
    ("record layer failure", "not_tls"),
    ("unsupported protocol", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
    ("no cipher match", "no_shared_cipher"),
    ("no suitable signature algorithm", "no_shared_cipher"),
)

_NGINX_NO_CERT = b"No required SSL certificate was sent"
_NGINX_CERT_ERROR = b"SSL certificate error"
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})[^\r\n]*")


@dataclass(frozen=True)
class OwnCertificate:
    """What we know of the client certificate we offered."""

    state: str  # "valid", "expired" or "not_yet_valid"
    chains_to: DN | None  # the listed CA name it leads to, None if none (or if the server listed none)


@dataclass(frozen=True)
class Judgement:
    """One handshake's outcome: "admitted", "refused", "unsupported" (the server does not speak that TLS
    version) or "failed" (no answer we could judge: timeout, not TLS, closed before the ServerHello)."""

    outcome: str
    reason: str | None = None  # a word of proxy.tls.classify.REASONS
    source: str | None = None  # "alert", "http" or "inferred": where the reason came from
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "admitted", "refused" or "error"
    reason: str | None
    detail: str
    exit_code: int


def judge(obs: Observation, own: OwnCertificate | None) -> Judgement:
    if obs.handshake_done:
        return _judge_completed(obs, own)
    return _judge_interrupted(obs, own)


def _judge_completed(obs: Observation, own: OwnCertificate | None) -> Judgement:
    code = obs.fatal_alert
    if code is not None:
        return _refused_by_alert(obs, own, code)
    if obs.http_response is not None:
        return _judge_http(obs, own, obs.http_response)
    if obs.data:
        return Judgement("admitted", detail=f"the server sent {len(obs.data)} bytes of its own after the handshake")
    if obs.closed_after_handshake:
        how = "with close_notify" if obs.alerts_read else "by closing the TCP connection"
        after = f" {obs.closed_after_seconds * 1000:.0f} ms" if obs.closed_after_seconds is not None else ""
        return _inferred(obs, own, f"the server completed the handshake, then closed{after} later {how}, "
                                   f"with no alert and no data")
    if obs.local_error is not None:
        return Judgement("failed", "other", None, f"after the handshake: {obs.local_error}")
    return Judgement("admitted", detail="the handshake completed and the server kept the connection open")


def _judge_interrupted(obs: Observation, own: OwnCertificate | None) -> Judgement:
    code = obs.fatal_alert
    if code is not None:
        if code in _PROTOCOL_VERSION_ALERTS and not obs.server_hello:
            return Judgement("unsupported", "protocol_version", "alert",
                             f"the server does not speak TLS {obs.version_asked} (alert {ALERT_NAMES[code]})")
        return _refused_by_alert(obs, own, code)
    if obs.timed_out:
        where = "after its ServerHello" if obs.server_hello else "to the ClientHello"
        return Judgement("failed", "timeout", None, f"the server stopped answering {where}")
    if obs.eof:
        if not obs.server_hello:
            return Judgement("failed", "other", None,
                             "the server closed the connection without answering the ClientHello "
                             f"(does it speak TLS {obs.version_asked}?)")
        return _inferred(obs, own, "the server closed the connection during the handshake, with no alert")
    error = obs.local_error or "the handshake failed"
    reason = next((r for needle, r in _LOCAL_REASONS if needle in error.lower()), "other")
    if reason == "protocol_version":
        return Judgement("unsupported", reason, None, f"no common TLS version: {error}")
    if reason == "not_tls":
        return Judgement("failed", reason, None, f"the server's answer is not TLS: {error}")
    return Judgement("failed", reason, None, error)


def _refused_by_alert(obs: Observation, own: OwnCertificate | None, code: int) -> Judgement:
    name = ALERT_NAMES.get(code, f"alert {code}")
    when = "after" if obs.alert_after_handshake else "during"
    detail = f"the server sent the alert {name} ({code}) {when} the handshake"
    if code == _HANDSHAKE_FAILURE:
        if not obs.server_hello:
            reason = "no_shared_cipher"
        elif obs.certificate_requested and not obs.sent_certificate:
            reason = "no_client_cert"
        elif obs.certificate_requested:
            reason = "forbidden"
            detail += "; mtls-proxy sends it when the allow rules refuse a verified certificate"
        else:
            reason = "other"
    elif code == _CERTIFICATE_EXPIRED and own is not None and own.state == "not_yet_valid":
        reason = "not_yet_valid"
    else:
        reason = _ALERT_REASONS.get(code, "other")
    return Judgement("refused", reason, "alert", detail)


def _judge_http(obs: Observation, own: OwnCertificate | None, response: bytes) -> Judgement:
    match = _STATUS_LINE.match(response)
    if match is None:
        shown = response[:60].decode("ascii", "replace")
        return Judgement("admitted", detail=f"the handshake completed; the answer to GET / is not HTTP: {shown!r}")
    status_line = match.group(0).decode("ascii", "replace")
    if match.group(1) == b"400" and (_NGINX_NO_CERT in response or _NGINX_CERT_ERROR in response):
        said = _NGINX_NO_CERT if _NGINX_NO_CERT in response else b"The " + _NGINX_CERT_ERROR
        detail = (f"the handshake completed, then GET / was answered {status_line!r} "
                  f"({said.decode()}), the way nginx refuses a client certificate")
        if _NGINX_NO_CERT in response:
            return Judgement("refused", "no_client_cert", "http", detail)
        inferred = _inferred_reason(obs, own)
        reason = "bad_certificate" if inferred == "other" else inferred
        return Judgement("refused", reason, "http" if inferred == "other" else "inferred", detail)
    return Judgement("admitted", detail=f"the handshake completed; GET / was answered {status_line!r}")


def _inferred(obs: Observation, own: OwnCertificate | None, what_happened: str) -> Judgement:
    reason = _inferred_reason(obs, own)
    if reason == "other":
        return Judgement("refused", "other", None,
                         f"{what_happened}. Nothing on the client's side explains it: the server's log says why "
                         "(it may have refused the certificate, or the service behind it closed)")
    return Judgement("refused", reason, "inferred", f"{what_happened}; {_INFERENCES[reason]}")


_INFERENCES = {
    "no_client_cert": "it asked for a client certificate and none was sent",
    "expired": "the client certificate has expired",
    "not_yet_valid": "the client certificate is not valid yet",
    "unknown_ca": "the client certificate leads to none of the CA names the server lists",
}


def quiet_suspicion(obs: Observation, own: OwnCertificate | None) -> str | None:
    """Why an admitted handshake may not really be admitted, or None.

    A server that kept the connection open although it asked for a certificate that we did not send, or that
    cannot verify, admits only at the TLS layer: it may still refuse once the application speaks (nginx's http
    module does, with a 400).
    """
    if not obs.handshake_done or obs.data or obs.http_response is not None or obs.closed_after_handshake:
        return None
    reason = _inferred_reason(obs, own)
    if reason == "other":
        return None
    return (f"TLS {obs.version_asked}: the server kept the connection open although {_INFERENCES[reason]}; "
            "some servers refuse only once the client speaks (nginx's http module answers 400): try --http.")


def _inferred_reason(obs: Observation, own: OwnCertificate | None) -> str:
    """The likely reason for a refusal the server did not explain, from our own side only."""
    if obs.certificate_requested and not obs.sent_certificate:
        return "no_client_cert"
    if own is not None and obs.sent_certificate:
        if own.state != "valid":
            return own.state
        if obs.ca_names and own.chains_to is None:
            return "unknown_ca"
    return "other"


def overall(judged: list[tuple[str, Judgement]]) -> Verdict:
    """One verdict over the TLS versions probed.

    Refused when any version that the server speaks refused us (a client that cannot choose the version might
    land on it); admitted when the others admitted; refused with ``protocol_version`` when the server speaks none
    of them; an error (exit 2) when no version gave an answer to judge.
    """
    for version, judgement in judged:
        if judgement.outcome == "refused":
            return Verdict("refused", judgement.reason, f"TLS {version}: {judgement.detail}", EXIT_REFUSED)
    admitted = [(version, j) for version, j in judged if j.outcome == "admitted"]
    if admitted:
        version, judgement = admitted[0]
        return Verdict("admitted", None, f"TLS {version}: {judgement.detail}", EXIT_ADMITTED)
    unsupported = [version for version, j in judged if j.outcome == "unsupported"]
    if unsupported and len(unsupported) == len(judged):
        versions = " and ".join(f"TLS {v}" for v in unsupported)
        return Verdict("refused", "protocol_version", f"the server speaks neither of {versions}"
                       if len(unsupported) > 1 else f"the server does not speak {versions}", EXIT_REFUSED)
    version, judgement = next((v, j) for v, j in judged if j.outcome == "failed")
    return Verdict("error", judgement.reason, f"TLS {version}: {judgement.detail}", EXIT_PROBLEM)
