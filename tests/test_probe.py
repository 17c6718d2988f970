"""``mtls-proxy probe`` as an operator runs it, against real TLS servers: the proxy itself, ``openssl s_server``
(TLS 1.2 only and TLS 1.3 only) and nginx with ``ssl_verify_client on`` (its stream and its http module).

Each end-to-end case runs ``python -m proxy.ops.probe`` as a process and checks the exit code of the contract
(0 admitted, 1 refused, 2 bad arguments or no answer), the reason word, and the sentence the operator needs. Against
the proxy, the reason the probe gives is also checked against the proxy's own failure counter: both sides must use
the same word. The judging logic has pure tests at the end, on hand-made observations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.dev import pki
from proxy.ops import probe
from proxy.ops.probe_certs import DN, chain_match, dn_from_name, hostname_matches
from proxy.ops.probe_tls import Observation
from proxy.ops.probe_verdict import Judgement, OwnCertificate, judge, overall, quiet_suspicion
from proxy.tls.classify import REASONS
from tests import daemonkit
from tests.conftest import Cred, free_port
from tests.conftest import TestPKI as PKIFiles  # aliased: pytest would try to collect Test*

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 30.0  # seconds for one probe run; it takes about one and a half
START_TIMEOUT = 15.0  # seconds for a server under test to listen
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
CLIENT_CA = "CN=Test Client CA,O=Acme"


# ---- running the probe ------------------------------------------------------------------------------------------


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.ops.probe", *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL,
    )


def creds(test_pki: PKIFiles, cred: Cred | None) -> list[str]:
    """--cacert for the test server CA, and --cert/--key for ``cred``."""
    args = ["--cacert", str(test_pki.server_ca)]
    if cred is not None:
        args += ["--cert", str(cred.cert), "--key", str(cred.key)]
    return args


def probe_json(port: int, *args: str, expect: int) -> dict[str, Any]:
    """Run the probe against 127.0.0.1:port (server name localhost) with --json; check the exit code."""
    result = run_probe(f"127.0.0.1:{port}", "--servername", "localhost", "--json", *args)
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["exit_code"] == expect
    return report


def probe_text(port: int, *args: str, expect: int) -> str:
    result = run_probe(f"127.0.0.1:{port}", "--servername", "localhost", *args)
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def by_tls(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["tls"]: h for h in report["handshakes"]}


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not start listening: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- the servers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def holding_backend() -> Iterator[daemonkit.HoldingBackend]:
    """A backend that accepts and stays silent: an admitted client sees an open, quiet connection."""
    backend = daemonkit.HoldingBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def mtls_proxy(test_pki: PKIFiles, holding_backend: daemonkit.HoldingBackend,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemonkit.Daemon]:
    """``mtls-proxy run`` requiring a client certificate from the test client CA, admitting alice and carol."""
    config = daemonkit.proxy_config(
        test_pki, holding_backend.address, port=free_port(), admin_port=free_port(),
        listener={"client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca),
                                  "allow": {"common_names": ["alice", "carol"]}}},
    )
    daemon = daemonkit.start_daemon(tmp_path_factory.mktemp("probe-proxy"), config)
    yield daemon
    daemon.stop()


@contextlib.contextmanager
def s_server(test_pki: PKIFiles, directory: Path, *flags: str) -> Iterator[int]:
    """``openssl s_server`` with ``flags`` on a free port, for the duration of the block."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed by these tests (.ci/run installs it)"
    port = free_port()
    log = directory / f"s_server-{port}.log"
    with open(log, "wb") as out:
        # stdin stays open (a pipe nobody writes): s_server stops at EOF on its stdin.
        proc = subprocess.Popen(
            [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(test_pki.server.cert),
             "-key", str(test_pki.server.key), "-quiet", *flags],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, proc, "openssl s_server", log)
        yield port
    finally:
        stop(proc)
        if proc.stdin is not None:
            proc.stdin.close()


def verifying_s_server(test_pki: PKIFiles, directory: Path, version: str) -> contextlib.AbstractContextManager[int]:
    # -Verify 1 requires a certificate; without -verify_return_error s_server would report a bad one and go on.
    return s_server(test_pki, directory, version, "-Verify", "1", "-verify_return_error",
                    "-CAfile", str(test_pki.client_ca))


@dataclass(frozen=True)
class Nginx:
    stream_port: int  # stream {} server: refuses a client certificate by closing the connection after the handshake
    http_port: int  # http {} server: refuses it with a 400 page


@pytest.fixture(scope="module")
def nginx(test_pki: PKIFiles, holding_backend: daemonkit.HoldingBackend,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    binary = shutil.which("nginx")
    assert binary and NGINX_STREAM_MODULE.exists(), "nginx and its stream module are needed (.ci/run installs them)"
    directory = tmp_path_factory.mktemp("probe-nginx")
    ports = Nginx(free_port(), free_port())
    tls = f"""
        ssl_certificate {test_pki.server.cert};
        ssl_certificate_key {test_pki.server.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {test_pki.client_ca};
        ssl_verify_client on;"""
    (directory / "nginx.conf").write_text(f"""load_module {NGINX_STREAM_MODULE};
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
stream {{
    server {{
        listen 127.0.0.1:{ports.stream_port} ssl;{tls}
        proxy_pass {holding_backend.address};
    }}
}}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{ports.http_port} ssl;{tls}
        location / {{ return 200 "hello\\n"; }}
    }}
}}
""")
    log = directory / "stderr.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(directory / "nginx.conf")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(ports.stream_port, proc, "nginx", log)
        wait_listening(ports.http_port, proc, "nginx", log)
        yield ports
    finally:
        stop(proc)


# ---- against mtls-proxy -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_proxy_admits_alice_over_both_versions_and_resumes(mtls_proxy, test_pki):
    out = probe_text(mtls_proxy.port, *creds(test_pki, test_pki.alice), expect=0)
    assert "Verdict: admitted (exit 0)" in out
    assert f"acceptable CA: {CLIENT_CA}" in out
    assert f"chains to:      {CLIENT_CA} (listed by the server)" in out
    assert "verified:     yes, against" in out
    for version in ("1.3", "1.2"):
        section = out.split(f"Handshake over TLS {version}\n", 1)[1].split("\n\n", 1)[0]
        assert "result:  admitted" in section
        assert f"version: TLSv{version}" in section
        assert "resumed: yes, a second connection resumed the session" in section


@pytest.mark.slow
@pytest.mark.parametrize(
    ("who", "reason", "alert_13", "alert_12"),
    [
        (None, "no_client_cert", "certificate_required", "handshake_failure"),
        ("untrusted", "unknown_ca", "unknown_ca", "unknown_ca"),
        ("expired", "expired", "certificate_expired", "certificate_expired"),
        ("bob", "forbidden", "handshake_failure", "handshake_failure"),  # the allow rules admit alice and carol
    ],
)
def test_proxy_refusals_use_the_proxys_own_reason_words(mtls_proxy, test_pki, who, reason, alert_13, alert_12):
    before = _failures(mtls_proxy, reason)
    report = probe_json(mtls_proxy.port, *creds(test_pki, getattr(test_pki, who) if who else None), expect=1)
    assert (report["verdict"], report["reason"]) == ("refused", reason)
    handshakes = by_tls(report)
    assert {tls: (h["outcome"], h["reason"], h["reason_source"]) for tls, h in handshakes.items()} == {
        "1.3": ("refused", reason, "alert"), "1.2": ("refused", reason, "alert")}
    assert (handshakes["1.3"]["alert"], handshakes["1.2"]["alert"]) == (alert_13, alert_12)
    # The proxy counted the same two refusals under the same word.
    daemonkit.wait_until(lambda: _failures(mtls_proxy, reason) >= before + 2, timeout=5,
                         what=f"the proxy to count {reason}")


def _failures(daemon: daemonkit.Daemon, reason: str) -> float:
    try:
        return daemon.metric("mtls_proxy_handshake_failures_total", reason=reason)
    except KeyError:
        return 0.0


@pytest.mark.slow
def test_proxy_other_ca_is_named_plainly(mtls_proxy, test_pki):
    out = probe_text(mtls_proxy.port, *creds(test_pki, test_pki.untrusted), expect=1)
    assert "chains to:      NONE of the CA names the server lists" in out
    assert ("Your certificate does not chain to any CA the server lists. Its issuer is CN=Other CA,O=Elsewhere; "
            f"the server lists: {CLIENT_CA}.") in out
    assert "Verdict: refused: unknown_ca (exit 1)" in out


@pytest.mark.slow
def test_proxy_intermediate_chain_leads_to_the_listed_root(mtls_proxy, test_pki):
    report = probe_json(mtls_proxy.port, *creds(test_pki, test_pki.carol), "--tls", "1.3", expect=0)
    assert report["client_certificate"]["issuer"] == "CN=Test Client Intermediate,O=Acme"
    assert report["client_certificate"]["chains_to"] == CLIENT_CA
    assert report["notes"] == []


@pytest.mark.slow
def test_json_shape(mtls_proxy, test_pki):
    report = probe_json(mtls_proxy.port, *creds(test_pki, test_pki.alice), "--alpn", "h2,http/1.1", expect=0)
    assert set(report) == {"target", "servername", "verdict", "reason", "detail", "exit_code", "server",
                           "certificate_request", "client_certificate", "handshakes", "notes"}
    assert (report["target"], report["servername"], report["verdict"], report["reason"]) == (
        f"127.0.0.1:{mtls_proxy.port}", "localhost", "admitted", None)
    server = report["server"]
    assert (server["verified"], server["verify_error"], server["name"], server["name_matches"]) == (
        True, None, "localhost", True)
    leaf = server["chain"][0]
    assert (leaf["subject"], leaf["issuer"], leaf["key"], leaf["state"]) == (
        "CN=localhost", "CN=Test Server CA,O=Acme", "EC secp256r1", "valid")
    assert "DNS:localhost" in leaf["names"] and leaf["extended_key_usage"] == ["serverAuth"]
    datetime.fromisoformat(leaf["not_after"])
    assert report["certificate_request"] == {
        "1.3": {"requested": True, "ca_names": [CLIENT_CA]}, "1.2": {"requested": True, "ca_names": [CLIENT_CA]}}
    client = report["client_certificate"]
    assert (client["subject"], client["chains_to"], client["problems"], client["key_usage"]) == (
        "CN=alice,OU=payments,O=Acme", CLIENT_CA, [], ["digitalSignature"])
    assert client["sha256"] == test_pki.alice.issued.sha256
    for tls, h in by_tls(report).items():
        assert h["version"] == f"TLSv{tls}" and h["cipher"]
        assert (h["outcome"], h["reason"], h["alert"], h["certificate_requested"], h["resumed"]) == (
            "admitted", None, None, True, True)
        assert h["alpn"] is None  # offered, but the proxy's listener has no ALPN list
        assert h["http_status"] is None


@pytest.mark.slow
def test_main_in_process(mtls_proxy, test_pki, capsys):
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    args = parser.parse_args([f"localhost:{mtls_proxy.port}", "--tls", "1.2", "--json",
                              *creds(test_pki, test_pki.expired)])
    assert probe.main(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["servername"], report["reason"]) == ("localhost", "expired")
    assert list(report["certificate_request"]) == ["1.2"]
    assert any(note.startswith("Your certificate: it expired on ") for note in report["notes"])


# ---- against openssl s_server -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "spoken", "other"), [("-tls1_3", "1.3", "1.2"), ("-tls1_2", "1.2", "1.3")])
def test_s_server_one_version(test_pki, tmp_path, flag, spoken, other):
    with verifying_s_server(test_pki, tmp_path, flag) as port:
        admitted = probe_json(port, *creds(test_pki, test_pki.alice), expect=0)
        refused = probe_json(port, *creds(test_pki, None), expect=1)
        pinned = probe_json(port, *creds(test_pki, test_pki.alice), "--tls", other, expect=1)
    assert by_tls(admitted)[spoken]["outcome"] == "admitted"
    assert by_tls(admitted)[spoken]["resumed"] is True
    unspoken = by_tls(admitted)[other]
    assert (unspoken["outcome"], unspoken["reason"]) == ("unsupported", "protocol_version")
    assert admitted["certificate_request"][spoken] == {"requested": True, "ca_names": [CLIENT_CA]}
    assert admitted["certificate_request"][other] == {"requested": None, "ca_names": []}
    assert (refused["reason"], by_tls(refused)[spoken]["reason_source"]) == ("no_client_cert", "alert")
    assert (pinned["verdict"], pinned["reason"]) == ("refused", "protocol_version")


@pytest.mark.slow
def test_s_server_refuses_another_ca_and_an_expired_certificate(test_pki, tmp_path):
    with verifying_s_server(test_pki, tmp_path, "-tls1_3") as port:
        other = probe_json(port, *creds(test_pki, test_pki.untrusted), "--tls", "1.3", expect=1)
        expired = probe_json(port, *creds(test_pki, test_pki.expired), "--tls", "1.3", expect=1)
    assert (other["reason"], by_tls(other)["1.3"]["alert"]) == ("unknown_ca", "unknown_ca")
    assert other["client_certificate"]["chains_to"] is None
    assert any("does not chain to any CA the server lists" in note for note in other["notes"])
    assert (expired["reason"], by_tls(expired)["1.3"]["alert"]) == ("expired", "certificate_expired")


@pytest.mark.slow
def test_server_that_asks_for_no_certificate(test_pki, tmp_path):
    with s_server(test_pki, tmp_path) as port:
        out = probe_text(port, *creds(test_pki, None), expect=0)
        report = probe_json(port, *creds(test_pki, test_pki.untrusted), expect=0)
    assert "TLS 1.3: no client certificate asked for" in out
    assert "The server does not ask for a client certificate: any client passes its TLS handshake." in out
    assert report["certificate_request"] == {"1.3": {"requested": False, "ca_names": []},
                                             "1.2": {"requested": False, "ca_names": []}}
    assert any("(--cert was not sent)" in note for note in report["notes"])
    assert all(h["resumed"] is True for h in report["handshakes"])


# ---- against nginx ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nginx_stream_admits_and_resumes(nginx, test_pki):
    report = probe_json(nginx.stream_port, *creds(test_pki, test_pki.alice), expect=0)
    assert [(h["tls"], h["outcome"], h["resumed"]) for h in report["handshakes"]] == [
        ("1.3", "admitted", True), ("1.2", "admitted", True)]
    assert report["certificate_request"]["1.3"]["ca_names"] == [CLIENT_CA]


@pytest.mark.slow
@pytest.mark.parametrize(("who", "reason"), [(None, "no_client_cert"), ("untrusted", "unknown_ca"),
                                             ("expired", "expired")])
def test_nginx_stream_refusals_are_inferred(nginx, test_pki, who, reason):
    """nginx's stream module completes the handshake and closes without an alert; the reason comes from our side."""
    report = probe_json(nginx.stream_port, *creds(test_pki, getattr(test_pki, who) if who else None), expect=1)
    assert report["reason"] == reason
    for h in report["handshakes"]:
        assert (h["outcome"], h["reason"], h["reason_source"], h["alert"]) == ("refused", reason, "inferred", None)
        assert "closed" in h["detail"]


@pytest.mark.slow
def test_nginx_http_refuses_in_its_400_page(nginx, test_pki):
    refused = probe_json(nginx.http_port, *creds(test_pki, None), "--http", "--tls", "1.3", expect=1)
    admitted = probe_json(nginx.http_port, *creds(test_pki, test_pki.alice), "--http", "--tls", "1.3", expect=0)
    quiet = probe_json(nginx.http_port, *creds(test_pki, None), "--tls", "1.3", expect=0)
    h = by_tls(refused)["1.3"]
    assert (h["reason"], h["reason_source"], h["http_status"]) == ("no_client_cert", "http", "HTTP/1.1 400 Bad Request")
    assert by_tls(admitted)["1.3"]["http_status"] == "HTTP/1.1 200 OK"
    # Without --http the handshake alone looks fine; the probe says why that is not the whole story.
    assert any("try --http" in note for note in quiet["notes"])


# ---- usage and connection problems: exit 2 ----------------------------------------------------------------------


@pytest.mark.slow
def test_closed_port_is_exit_2():
    port = free_port()
    text = run_probe(f"127.0.0.1:{port}")
    assert text.returncode == 2 and text.stdout == ""
    assert text.stderr == f"mtls-proxy probe: error: connection refused by 127.0.0.1:{port}: nothing listens there\n"
    as_json = run_probe(f"127.0.0.1:{port}", "--json")
    assert as_json.returncode == 2
    report = json.loads(as_json.stdout)
    assert (report["verdict"], report["exit_code"], report["handshakes"]) == ("error", 2, [])


@pytest.mark.slow
def test_silent_server_is_exit_2(holding_backend):
    """A TCP server that never answers the ClientHello: a timeout, not a refusal."""
    port = int(holding_backend.address.rsplit(":", 1)[1])
    report = probe_json(port, "--timeout", "0.5", "--tls", "1.3", expect=2)
    assert (report["verdict"], report["reason"]) == ("error", "timeout")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["localhost"], "'localhost' is not HOST:PORT"),
        (["localhost:99999"], "is not HOST:PORT"),
        (["::1:8443"], "put an IPv6 address in brackets"),
        (["localhost:8443", "--tls", "1.1"], "invalid choice: '1.1'"),
        (["localhost:8443", "--timeout", "0"], "'0' is not a positive number of seconds"),
        (["localhost:8443", "--key", "x.key"], "--key needs --cert"),
        (["localhost:8443", "--cert", "/nonexistent/c.crt"], "--cert /nonexistent/c.crt: no such file"),
        (["localhost:8443", "--cacert", "README.md"], "--cacert: OpenSSL cannot use it: no certificate or crl found"),
    ],
)
def test_bad_arguments_are_exit_2(args, message):
    result = run_probe(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_key_that_does_not_match_is_exit_2(test_pki, capsys):
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    args = parser.parse_args([f"127.0.0.1:{free_port()}", "--cert", str(test_pki.alice.cert),
                              "--key", str(test_pki.bob.key)])
    assert probe.main(args) == 2
    assert "--key does not match the certificate of --cert" in capsys.readouterr().err


# ---- pure: what an observation means ----------------------------------------------------------------------------

VALID = OwnCertificate("valid", DN(b"ca", CLIENT_CA))


def observation(**facts: Any) -> Observation:
    """A TLS 1.3 handshake that got as far as a CertificateRequest, with ``facts`` on top."""
    base: dict[str, Any] = {"version_asked": "1.3", "sent_certificate": True, "server_hello": True,
                            "certificate_requested": True, "server_certificate": True,
                            "ca_names": [DN(b"ca", CLIENT_CA)]}
    return Observation(**{**base, **facts})


@pytest.mark.parametrize(
    ("facts", "own", "reason"),
    [
        ({"alerts_read": [(2, 116)]}, VALID, "no_client_cert"),
        ({"alerts_read": [(2, 48)]}, VALID, "unknown_ca"),
        ({"alerts_read": [(2, 45)]}, VALID, "expired"),
        ({"alerts_read": [(2, 45)]}, OwnCertificate("not_yet_valid", None), "not_yet_valid"),  # OpenSSL's one alert
        ({"alerts_read": [(2, 44)]}, VALID, "revoked"),
        ({"alerts_read": [(2, 42)]}, VALID, "bad_certificate"),
        ({"alerts_read": [(2, 49)]}, VALID, "forbidden"),
        ({"alerts_read": [(2, 40)], "sent_certificate": False}, None, "no_client_cert"),  # TLS 1.2 servers
        ({"alerts_read": [(2, 40)]}, VALID, "forbidden"),  # mtls-proxy's allow rules
        ({"alerts_read": [(2, 40)], "server_hello": False, "certificate_requested": False}, None, "no_shared_cipher"),
        ({"alerts_read": [(2, 80)]}, VALID, "other"),
    ],
)
def test_alerts_become_the_proxys_reasons(facts, own, reason):
    judged = judge(observation(**facts), own)
    assert (judged.outcome, judged.reason, judged.source) == ("refused", reason, "alert")
    assert judged.reason in REASONS


def test_protocol_version_alert_before_server_hello_is_unsupported():
    judged = judge(observation(alerts_read=[(2, 70)], server_hello=False, certificate_requested=False), None)
    assert (judged.outcome, judged.reason) == ("unsupported", "protocol_version")


@pytest.mark.parametrize(
    ("facts", "own", "reason"),
    [
        ({"sent_certificate": False}, None, "no_client_cert"),
        ({}, OwnCertificate("expired", DN(b"ca", CLIENT_CA)), "expired"),
        ({}, OwnCertificate("valid", None), "unknown_ca"),
        ({"ca_names": []}, OwnCertificate("valid", None), "other"),  # no names listed: nothing to go by
        ({}, VALID, "other"),
    ],
)
def test_close_after_the_handshake_is_judged_from_our_side(facts, own, reason):
    obs = observation(handshake_done=True, closed_after_handshake=True, alerts_read=[(1, 0)], **facts)
    judged = judge(obs, own)
    assert (judged.outcome, judged.reason) == ("refused", reason)
    assert judged.source == (None if reason == "other" else "inferred")
    assert reason in REASONS


def test_quiet_open_connection_is_admitted_and_server_data_too():
    assert judge(observation(handshake_done=True), VALID).outcome == "admitted"
    assert judge(observation(handshake_done=True, data=b"220 ready\r\n"), VALID).outcome == "admitted"
    assert quiet_suspicion(observation(handshake_done=True), VALID) is None
    suspicion = quiet_suspicion(observation(handshake_done=True, sent_certificate=False), None)
    assert suspicion is not None and "try --http" in suspicion


def test_nginx_http_400_pages():
    no_cert = b"HTTP/1.1 400 Bad Request\r\n\r\n<center>No required SSL certificate was sent</center>"
    cert_error = b"HTTP/1.1 400 Bad Request\r\n\r\n<center>The SSL certificate error</center>"
    plain_400 = b"HTTP/1.1 400 Bad Request\r\n\r\nbad request"
    done = {"handshake_done": True}
    assert judge(observation(**done, http_response=no_cert, sent_certificate=False), None).reason == "no_client_cert"
    assert judge(observation(**done, http_response=cert_error), VALID).reason == "bad_certificate"
    assert judge(observation(**done, http_response=cert_error), OwnCertificate("expired", None)).reason == "expired"
    assert judge(observation(**done, http_response=plain_400), VALID).outcome == "admitted"


def test_overall_verdict():
    admitted, refused = Judgement("admitted"), Judgement("refused", "unknown_ca", "alert", "x")
    unsupported, failed = Judgement("unsupported", "protocol_version"), Judgement("failed", "timeout", None, "t")
    assert overall([("1.3", admitted), ("1.2", refused)]).exit_code == 1  # a refusal on any spoken version counts
    assert overall([("1.3", unsupported), ("1.2", admitted)]).outcome == "admitted"
    only_unsupported = overall([("1.3", unsupported), ("1.2", unsupported)])
    assert (only_unsupported.outcome, only_unsupported.reason, only_unsupported.exit_code) == (
        "refused", "protocol_version", 1)
    assert (overall([("1.3", failed)]).outcome, overall([("1.3", failed)]).exit_code) == ("error", 2)


# ---- pure: certificates and names -------------------------------------------------------------------------------


def test_chain_match_through_intermediates():
    root = pki.make_ca("Root", organization="Acme")
    middle = pki.make_ca("Middle", organization="Acme", parent=root)
    leaf = pki.make_client_cert(middle, common_name="leaf")
    chain = [leaf.cert, *leaf.chain]
    root_name, middle_name = dn_from_name(root.cert.subject), dn_from_name(middle.cert.subject)
    other = dn_from_name(pki.make_ca("Other").cert.subject)
    assert chain_match(chain, [other, root_name]) == root_name  # the root above the intermediate sent along
    assert chain_match(chain, [middle_name]) == middle_name
    assert chain_match(chain, [other]) is None
    assert chain_match([leaf.cert], [root_name]) is None  # without the intermediate, the leaf names only Middle


def test_hostname_matching():
    ca = pki.make_ca("CA")
    cert = pki.make_server_cert(ca, common_name="not-a-san.example", dns_names=("*.svc.example", "exact.example"),
                                ip_addresses=("10.0.0.1", "::1")).cert
    assert hostname_matches(cert, "api.svc.example")
    assert hostname_matches(cert, "EXACT.example.")
    assert hostname_matches(cert, "10.0.0.1") and hostname_matches(cert, "::1")
    assert not hostname_matches(cert, "a.b.svc.example")  # a wildcard is one label
    assert not hostname_matches(cert, "svc.example")
    assert not hostname_matches(cert, "not-a-san.example")  # no fallback to the CN
    assert not hostname_matches(cert, "10.0.0.2")


def test_client_certificate_problems_in_plain_words():
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from proxy.ops.probe_certs import client_certificate_problems, describe

    ca = pki.make_ca("CA")
    now = datetime.now(UTC)
    expired = pki.make_client_cert(ca, common_name="old", not_before=now - timedelta(days=9),
                                   not_after=now - timedelta(days=2),
                                   extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    problems = client_certificate_problems(describe(expired.cert), now)
    assert problems[0].startswith("it expired on ")
    assert problems[1] == "its extended key usage (serverAuth) does not allow client authentication"
    assert client_certificate_problems(describe(pki.make_client_cert(ca, common_name="ok").cert), now) == []
