"""``mtls-proxy probe HOST:PORT``: connect as a TLS client and say, readably, why a client is admitted or refused.

It prints the server's certificate chain and whether it verifies; whether the server asks for a client
certificate, and the CA names its CertificateRequest lists (TLS 1.3 and TLS 1.2 asked separately unless ``--tls``
picks one); with ``--cert``/``--key``, whether that certificate leads to one of those names, its validity and key
usages; then the real handshake's result in the proxy's reason words (``unknown_ca``, ``expired``,
``no_client_cert``, ...), the negotiated version, cipher and ALPN, and whether a second connection resumes.

Exit codes: 0 admitted, 1 refused, 2 bad arguments or no answer to judge (connection refused, timeout, not TLS).

It works against any TLS server; the modules it uses:

- probe_tls.py: the blocking client (plain sockets, select, a deadline on every wait);
- probe_verdict.py: what an observation means, in the proxy's vocabulary (pure);
- probe_certs.py: certificate facts and the match against the listed CA names (pure);
- probe_report.py: the human and the JSON renderings (pure).

``add_arguments`` and ``main`` are the subcommand's interface; ``python -m proxy.ops.probe`` runs it alone.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from proxy.ops.probe_certs import DN, chain_match, client_certificate_problems, describe, hostname_matches, load_chain
from proxy.ops.probe_report import ClientReport, HandshakeReport, Report, ServerReport, render_json, render_text
from proxy.ops.probe_tls import (
    VERSIONS,
    ClientSettings,
    ConnectError,
    Observation,
    SettingsError,
    Target,
    attempt,
    build_context,
)
from proxy.ops.probe_verdict import EXIT_PROBLEM, OwnCertificate, Verdict, judge, overall, quiet_suspicion
from proxy.tls._openssl import verify_error_text

__all__ = ["add_arguments", "main", "probe"]

DEFAULT_TIMEOUT = 5.0

# How long to listen after a completed handshake for the server's verdict, at least. In TLS 1.3 a refusal comes
# one round trip after our Finished, so the window grows to twice the handshake's own duration on slow links;
# it never exceeds --timeout. Half a second is a hundred times a loopback round trip, and short enough that two
# versions probed still answer within about a second.
LISTEN_MIN = 0.5


# ---- arguments ------------------------------------------------------------------------------------------------


def _target(text: str) -> tuple[str, int]:
    """HOST:PORT, with an IPv6 address in brackets: [::1]:8443."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (IPv6 in brackets: [::1]:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: put an IPv6 address in brackets: [{host}]:{port}")
    return host, int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _alpn(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("--alpn needs at least one protocol name, such as h2,http/1.1")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=_target, metavar="HOST:PORT", help="the TLS server to probe")
    parser.add_argument("--cacert", metavar="FILE", help="CA bundle that should verify the server "
                        "(default: the system's trust store)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (PEM, leaf first, then intermediates)")
    parser.add_argument("--key", metavar="FILE", help="its private key (default: read from --cert)")
    parser.add_argument("--tls", choices=sorted(VERSIONS), help="probe only this TLS version "
                        "(default: 1.3 and 1.2, each on its own connection)")
    parser.add_argument("--servername", metavar="NAME", help="SNI and the name the server certificate must have "
                        "(default: HOST, unless it is an IP address)")
    parser.add_argument("--alpn", type=_alpn, default=(), metavar="LIST", help="ALPN protocols to offer, "
                        "comma-separated (default: none)")
    parser.add_argument("--http", action="store_true", help="after the handshake, send GET / and report the answer "
                        "(nginx refuses a client certificate only there, with a 400)")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"for the TCP connection, the handshake and the HTTP answer (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


# ---- the probe ------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Arguments that cannot work (unreadable files, a key that does not match): exit 2 before connecting."""


def probe(target: Target, settings: ClientSettings, versions: list[str], now: datetime | None = None) -> Report:
    """Probe each TLS version in turn. Raises UsageError or ConnectError (both exit 2)."""
    now = now or datetime.now(UTC)
    _check_files(settings)
    own_chain = _own_chain(settings)
    contexts = {version: _context(settings, version) for version in versions}
    handshakes: list[HandshakeReport] = []
    suspicions: list[str] = []
    for version in versions:
        obs = attempt(contexts[version], target, settings, version, listen=LISTEN_MIN)
        own = _own(own_chain, obs, now)
        judgement = judge(obs, own)
        if judgement.outcome == "admitted" and (suspicion := quiet_suspicion(obs, own)) is not None:
            suspicions.append(suspicion)
        handshake = HandshakeReport(version, obs, judgement)
        if judgement.outcome == "admitted" and obs.session is not None:
            handshake.resumed = _resumes(contexts[version], target, settings, version, obs.session)
        handshakes.append(handshake)
    verdict = overall([(h.tls, h.judgement) for h in handshakes])
    report = Report(str(target), target.servername, now, verdict, handshakes=handshakes)
    report.server = _server_report(target, settings, handshakes)
    report.client = _client_report(settings, own_chain, handshakes, now)
    report.notes = _notes(report, settings) + suspicions
    return report


def _check_files(settings: ClientSettings) -> None:
    """Name a missing file plainly, before OpenSSL reports it in its own words."""
    for option, path in (("--cacert", settings.cacert), ("--cert", settings.cert), ("--key", settings.key)):
        if path is not None and not path.is_file():
            raise UsageError(f"{option} {path}: no such file")
    if settings.cert is not None and settings.key is None:
        try:
            holds_key = b"PRIVATE KEY-----" in settings.cert.read_bytes()
        except OSError as exc:
            raise UsageError(f"--cert {settings.cert}: {exc.strerror}") from None
        if not holds_key:
            raise UsageError(f"--cert {settings.cert} holds no private key: name the key file with --key")


def _context(settings: ClientSettings, version: str) -> SSL.Context:
    try:
        return build_context(settings, version)
    except SettingsError as exc:
        if "key values mismatch" in exc.reasons:
            raise UsageError("--key does not match the certificate of --cert") from None
        raise UsageError(f"{exc.option}: OpenSSL cannot use it: {exc.reasons}") from None


def _own_chain(settings: ClientSettings) -> list[x509.Certificate] | None:
    if settings.cert is None:
        return None
    try:
        return load_chain(settings.cert)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--cert: {exc}") from None


def _own(own_chain: list[x509.Certificate] | None, obs: Observation, now: datetime) -> OwnCertificate | None:
    if not own_chain:
        return None
    return OwnCertificate(describe(own_chain[0]).state(now), chain_match(own_chain, obs.ca_names))


def _resumes(
    ctx: SSL.Context, target: Target, settings: ClientSettings, version: str, session: SSL.Session
) -> bool | None:
    try:
        again = attempt(ctx, target, settings, version, session=session)
    except ConnectError:
        return None
    # Both a TLS 1.2 abbreviated handshake and a TLS 1.3 PSK handshake leave out the server's Certificate.
    return again.handshake_done and not again.server_certificate


def _server_report(target: Target, settings: ClientSettings, handshakes: list[HandshakeReport]) -> ServerReport | None:
    seen = next((h.observation for h in handshakes if h.observation.server_chain), None)
    if seen is None:
        return None
    chain = seen.server_chain
    error = None
    if seen.verify_errors:
        errno, depth = seen.verify_errors[0]
        where = "the server's certificate" if depth == 0 else f"the certificate at depth {depth}"
        error = f"{verify_error_text(errno)} ({where})"
    name = target.servername or target.host
    return ServerReport(
        chain=[describe(cert) for cert in chain],
        verified_against=str(settings.cacert) if settings.cacert else "the system's trust store",
        verify_error=error,
        name=name,
        name_matches=hostname_matches(chain[0], name),
    )


def _client_report(
    settings: ClientSettings, own_chain: list[x509.Certificate] | None, handshakes: list[HandshakeReport],
    now: datetime,
) -> ClientReport | None:
    if settings.cert is None or not own_chain:
        return None
    listed = next((h.observation.ca_names for h in handshakes if h.observation.ca_names), [])
    info = describe(own_chain[0])
    problems = client_certificate_problems(info, now)
    return ClientReport(str(settings.cert), info, chain_match(own_chain, listed), problems, bool(listed))


def _notes(report: Report, settings: ClientSettings) -> list[str]:
    """The plain sentences an operator needs, most common mistakes first."""
    notes: list[str] = []
    answered = [h for h in report.handshakes if h.requested is not None]
    asked = [h for h in answered if h.requested]
    listed = _listed(asked)
    client = report.client
    if client is not None and listed and client.chains_to is None:
        names = "; ".join(name.text for name in listed)
        notes.append(
            f"Your certificate does not chain to any CA the server lists. Its issuer is {client.info.issuer}; "
            f"the server lists: {names}. Expect unknown_ca, and clients that choose their certificate by this "
            "list (browsers, Java) will not offer it at all."
        )
    if answered and not asked:
        sent = " (--cert was not sent)" if settings.cert is not None else ""
        notes.append(f"The server does not ask for a client certificate{sent}: any client passes its TLS handshake.")
    if asked and settings.cert is None:
        notes.append("The server asks for a client certificate and none was given: pass --cert and --key.")
    if asked and not listed:
        notes.append("The server asks for a client certificate but lists no CA names: clients must guess which "
                     "certificate to send.")
    if len({tuple(name.der for name in h.observation.ca_names) for h in asked}) > 1:
        notes.append("The server lists different CA names over " + " and ".join(f"TLS {h.tls}" for h in asked) + ".")
    if client is not None:
        notes += [f"Your certificate: {problem}." for problem in client.problems]
    server = report.server
    if server is not None and server.verify_error is not None:
        notes.append(f"The server's chain does not verify against {server.verified_against}: {server.verify_error}.")
    if server is not None and not server.name_matches:
        notes.append(f"The server's certificate is not valid for the name {server.name} (--servername sets it).")
    return notes


def _listed(asked: list[HandshakeReport]) -> list[DN]:
    seen: dict[bytes, DN] = {}
    for h in asked:
        for name in h.observation.ca_names:
            seen.setdefault(name.der, name)
    return list(seen.values())


# ---- the command ----------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> ClientSettings:
    if args.key is not None and args.cert is None:
        raise UsageError("--key needs --cert")
    return ClientSettings(
        cacert=Path(args.cacert) if args.cacert else None,
        cert=Path(args.cert) if args.cert else None,
        key=Path(args.key) if args.key else None,
        alpn=tuple(args.alpn),
        timeout=args.timeout,
        http=args.http,
    )


def _servername(host: str, given: str | None) -> str | None:
    if given:
        return str(given)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None  # RFC 6066: SNI carries host names, never addresses


def main(args: argparse.Namespace) -> int:
    host, port = args.target
    target = Target(host, port, _servername(host, args.servername))
    versions = [args.tls] if args.tls else list(VERSIONS)
    try:
        report = probe(target, _settings(args), versions)
    except (UsageError, ConnectError) as exc:
        verdict = Verdict("error", None, str(exc), EXIT_PROBLEM)
        report = Report(str(target), target.servername, datetime.now(UTC), verdict)
        if not args.json:
            print(f"mtls-proxy probe: error: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
    if args.json:
        print(json.dumps(render_json(report), indent=2))
    else:
        print(render_text(report), end="")
    return report.verdict.exit_code


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mtls-proxy probe", description=__doc__.split("\n", 1)[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
