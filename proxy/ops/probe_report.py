"""What ``mtls-proxy probe`` found, and its two renderings: aligned ``key: value`` sections for people, and one
JSON object with the same facts for scripts.

Pure: the report is built from observations that probe.py collected; rendering does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.ops.probe_certs import DN, CertInfo
from proxy.ops.probe_tls import Observation
from proxy.ops.probe_verdict import ALERT_NAMES, Judgement, Verdict

__all__ = ["ClientReport", "HandshakeReport", "Report", "ServerReport", "render_json", "render_text"]


@dataclass
class HandshakeReport:
    """One TLS version probed: what was seen and what it means."""

    tls: str  # "1.3" or "1.2"
    observation: Observation
    judgement: Judgement
    resumed: bool | None = None  # None: not tried (the first connection was not admitted) or not answered

    @property
    def requested(self) -> bool | None:
        """Whether the server sent a CertificateRequest; None when the handshake never got that far."""
        return self.observation.certificate_requested if self.observation.server_hello else None


@dataclass
class ServerReport:
    chain: list[CertInfo]
    verified_against: str  # a file, or "the system's trust store"
    verify_error: str | None  # None: the chain verified
    name: str  # the name checked against the certificate (SNI, or the address)
    name_matches: bool


@dataclass
class ClientReport:
    file: str
    info: CertInfo
    chains_to: DN | None  # the listed CA name the chain leads to (over the first version that listed names)
    problems: list[str]
    names_listed: bool  # whether the server listed any CA name to lead to


@dataclass
class Report:
    target: str
    servername: str | None
    now: datetime
    verdict: Verdict
    server: ServerReport | None = None
    client: ClientReport | None = None
    handshakes: list[HandshakeReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- JSON ----------------------------------------------------------------------------------------------------


def render_json(report: Report) -> dict[str, Any]:
    return {
        "target": report.target,
        "servername": report.servername,
        "verdict": report.verdict.outcome,
        "reason": report.verdict.reason,
        "detail": report.verdict.detail,
        "exit_code": report.verdict.exit_code,
        "server": None if report.server is None else _server_json(report.server, report.now),
        "certificate_request": {
            h.tls: {"requested": h.requested, "ca_names": [name.text for name in h.observation.ca_names]}
            for h in report.handshakes
        },
        "client_certificate": None if report.client is None else _client_json(report.client, report.now),
        "handshakes": [_handshake_json(h) for h in report.handshakes],
        "notes": list(report.notes),
    }


def _cert_json(info: CertInfo, now: datetime) -> dict[str, Any]:
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "sha256": info.sha256,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "state": info.state(now),
        "names": list(info.names),
        "key": info.key,
        "key_usage": None if info.key_usage is None else list(info.key_usage),
        "extended_key_usage": None if info.extended_key_usage is None else list(info.extended_key_usage),
        "is_ca": info.is_ca,
    }


def _server_json(server: ServerReport, now: datetime) -> dict[str, Any]:
    return {
        "verified": server.verify_error is None,
        "verified_against": server.verified_against,
        "verify_error": server.verify_error,
        "name": server.name,
        "name_matches": server.name_matches,
        "chain": [_cert_json(info, now) for info in server.chain],
    }


def _client_json(client: ClientReport, now: datetime) -> dict[str, Any]:
    return {
        "file": client.file,
        **_cert_json(client.info, now),
        "chains_to": None if client.chains_to is None else client.chains_to.text,
        "problems": list(client.problems),
    }


def _handshake_json(h: HandshakeReport) -> dict[str, Any]:
    obs, judgement = h.observation, h.judgement
    alert = obs.fatal_alert
    return {
        "tls": h.tls,
        "outcome": judgement.outcome,
        "reason": judgement.reason,
        "reason_source": judgement.source,
        "detail": judgement.detail,
        "alert": None if alert is None else ALERT_NAMES.get(alert, str(alert)),
        "certificate_requested": h.requested,
        "version": obs.version,
        "cipher": obs.cipher,
        "alpn": obs.alpn,
        "resumed": h.resumed,
        "http_status": _status_line(obs.http_response),
    }


def _status_line(response: bytes | None) -> str | None:
    if not response:
        return None
    return response.split(b"\r\n", 1)[0].decode("ascii", "replace")


# ---- text ----------------------------------------------------------------------------------------------------

Row = tuple[str, str]


def _section(title: str, rows: list[Row]) -> list[str]:
    """A title, then its rows with the values in one column ("key:" padded to the longest key)."""
    width = max((len(key) for key, _ in rows), default=0) + 1
    lines = [title]
    for key, value in rows:
        label = f"{key}:" if key else ""
        lines.append(f"  {label:<{width}} {value}".rstrip())
    return lines


def render_text(report: Report) -> str:
    name = f" (server name {report.servername})" if report.servername else ""
    sections: list[list[str]] = [[f"mtls-proxy probe {report.target}{name}"]]
    if report.server is not None:
        sections.append(_server_section(report.server, report.now))
    if report.handshakes:
        sections.append(_request_section(report.handshakes))
    if report.client is not None:
        sections.append(_client_section(report.client, report.now))
    sections += [_handshake_section(h) for h in report.handshakes]
    if report.notes:
        sections.append(["Notes", *(f"  - {note}" for note in report.notes)])
    verdict = report.verdict
    said = verdict.outcome if verdict.reason is None else f"{verdict.outcome}: {verdict.reason}"
    sections.append(_section(f"Verdict: {said} (exit {verdict.exit_code})", [("why", verdict.detail)]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _cert_rows(info: CertInfo, now: datetime, prefix: str = "") -> list[Row]:
    pad = " " * len(prefix)
    rows = [
        (f"{prefix}subject", info.subject),
        (f"{pad}issuer", info.issuer),
    ]
    if info.names:
        rows.append((f"{pad}names", ", ".join(info.names)))
    rows += [
        (f"{pad}validity", info.validity_text(now)),
        (f"{pad}key", info.key),
    ]
    return rows


def _server_section(server: ServerReport, now: datetime) -> list[str]:
    if server.verify_error is None:
        verified = f"yes, against {server.verified_against}"
    else:
        verified = f"NO, against {server.verified_against}: {server.verify_error}"
    matches = "matches the certificate" if server.name_matches else "DOES NOT match the certificate"
    rows: list[Row] = [
        ("verified", verified),
        ("name", f"{server.name} {matches}"),
    ]
    for index, info in enumerate(server.chain):
        rows += _cert_rows(info, now, prefix=f"[{index}] ")
    if not server.chain:
        rows.append(("chain", "none received"))
    return _section("Server certificate chain", rows)


def _request_section(handshakes: list[HandshakeReport]) -> list[str]:
    rows: list[Row] = []
    for h in handshakes:
        if h.requested is None:
            rows.append((f"TLS {h.tls}", "not known (the handshake ended before it)"))
        elif not h.requested:
            rows.append((f"TLS {h.tls}", "no client certificate asked for"))
        else:
            count = len(h.observation.ca_names)
            names = "no CA names listed" if count == 0 else f"{count} acceptable CA name{'s' if count != 1 else ''}"
            rows.append((f"TLS {h.tls}", f"client certificate asked for, {names}"))
    lists = {tuple(name.text for name in h.observation.ca_names) for h in handshakes if h.requested}
    for listed in sorted(lists):
        if len(lists) > 1:
            rows.append(("", ""))
        for index, text in enumerate(listed):
            rows.append(("acceptable CA" if index == 0 else "", text))
    return _section("Client certificate request", rows)


def _client_section(client: ClientReport, now: datetime) -> list[str]:
    info = client.info
    if client.chains_to is not None:
        chains = f"{client.chains_to.text} (listed by the server)"
    elif client.names_listed:
        chains = "NONE of the CA names the server lists"
    else:
        chains = "cannot tell: the server lists no CA names"
    rows: list[Row] = [
        ("subject", info.subject),
        ("issuer", info.issuer),
        ("chains to", chains),
        ("validity", info.validity_text(now)),
        ("key usage", "(no extension: any)" if info.key_usage is None else ", ".join(info.key_usage) or "(none)"),
        ("ext. key usage", "(no extension: any)" if info.extended_key_usage is None
         else ", ".join(info.extended_key_usage) or "(none)"),
        ("key", info.key),
    ]
    if info.names:
        rows.insert(2, ("names", ", ".join(info.names)))
    return _section(f"Client certificate ({client.file})", rows)


_SOURCES = {
    "alert": " (the server's alert)",
    "http": " (the server's HTTP answer)",
    "inferred": " (inferred from the client's side: the server did not say)",
}


def _handshake_section(h: HandshakeReport) -> list[str]:
    judgement, obs = h.judgement, h.observation
    result = judgement.outcome
    if judgement.reason is not None and judgement.outcome != "admitted":
        result = f"{judgement.outcome}: {judgement.reason}{_SOURCES.get(judgement.source or '', '')}"
    rows: list[Row] = [("result", result), ("detail", judgement.detail)]
    if obs.handshake_done:
        rows += [
            ("version", obs.version or "?"),
            ("cipher", obs.cipher or "?"),
            ("ALPN", obs.alpn or "none"),
        ]
    status = _status_line(obs.http_response)
    if status is not None:
        rows.append(("HTTP", status))
    if h.resumed is not None:
        rows.append(("resumed", "yes, a second connection resumed the session" if h.resumed
                     else "no, a second connection made a full handshake"))
    return _section(f"Handshake over TLS {h.tls}", rows)
