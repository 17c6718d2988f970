"""The real daemon: ``mtls-proxy run`` (and ``demo``) as separate processes, driven by curl, openssl s_client,
promtool, signals and plain sockets, exactly as an operator would.

Every process is bounded by a timeout and killed in a ``finally``; every wait polls against a deadline.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.dev import pki
from tests.conftest import TestPKI as PKIFiles  # aliased: pytest would try to collect Test*
from tests.conftest import free_port, served_fingerprint
from tests.conftest import poll_until as wait_until
from tests.daemonkit import connect_tls

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0  # seconds for a daemon to become ready
TOOL_TIMEOUT = 15.0  # seconds for one curl / openssl / promtool run
CLIENT_TIMEOUT = 10.0  # socket timeout of the Python TLS clients


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed by these tests (.ci/run installs it)"
    return path


# ---- backends (threads in the test process) ---------------------------------------------------------------------

BACKEND_GREETING = b"hello from the test backend\n"


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = BACKEND_GREETING + f"path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[str]:
    """Run a socketserver in a thread; yield its host:port; stop and close it after."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def http_backend() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTTPHandler)
    server.daemon_threads = True
    with _serving(server) as address:
        yield address


# ---- the daemon process -----------------------------------------------------------------------------------------


def listener(name: str, test_pki: PKIFiles, backend: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "listen": f"127.0.0.1:{free_port()}",
        "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
        "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
        "backend": {"address": backend, "connect_timeout": 2},
        "timeouts": {"handshake": 5, "idle": 30},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Daemon:
    """One ``mtls-proxy run`` process, its output in files (a pipe nobody reads could block it)."""

    config: dict[str, Any]
    dir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    stdout_path: Path = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.dir / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"

    @property
    def admin(self) -> str:
        return "http://" + self.config["admin"]["listen"]

    def port(self, name: str | None = None) -> int:
        listeners = self.config["listeners"]
        chosen = listeners[0] if name is None else next(lc for lc in listeners if lc["name"] == name)
        return int(chosen["listen"].rsplit(":", 1)[1])

    def start(self) -> Daemon:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while self.get("/readyz")[0] != 200:
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode} before it was ready:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon was not ready after {START_TIMEOUT}s:\n{self.stderr()}")
            time.sleep(0.03)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def signal(self, signum: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the daemon is not running"
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout}s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def access_records(self) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("logger") == "proxy.access"]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
        """(status, body) of an admin request; (None, b"") when the admin port does not answer."""
        try:
            with urllib.request.urlopen(self.admin + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None, b""

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, status
        return body.decode()

    def sample(self, name: str, **labels: str) -> float | None:
        return sample(self.metrics(), name, **labels)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (labels must match exactly), or None."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest.fixture
def daemon_factory(tmp_path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(listeners: list[dict[str, Any]], *args: str, log_format: str = "json", start: bool = True) -> Daemon:
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "log": {"level": "info", "format": log_format},
            "listeners": listeners,
        }
        daemon = Daemon(config, directory, tuple(args))
        started.append(daemon)
        return daemon.start() if start else daemon

    try:
        yield make
    finally:
        for daemon in started:
            daemon.kill()


# ---- clients ----------------------------------------------------------------------------------------------------


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def echo_roundtrip(sock: ssl.SSLSocket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def run_tool(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, **kw)


def curl(test_pki: PKIFiles, port: int, *extra: str, cert: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [tool("curl"), "-sS", "--max-time", "10", "--resolve", f"localhost:{port}:127.0.0.1",
            "--cacert", str(test_pki.server_ca)]
    if cert:
        argv += ["--cert", str(test_pki.alice.cert), "--key", str(test_pki.alice.key)]
    argv += [*extra, f"https://localhost:{port}/hello"]
    return run_tool(argv, stdin=subprocess.DEVNULL)


# ---- curl through the proxy, rejections, metrics, logs ----------------------------------------------------------


def test_curl_with_client_cert_reaches_http_backend(daemon_factory, test_pki, http_backend):
    daemon = daemon_factory([listener("api", test_pki, http_backend)])
    port = daemon.port()

    result = curl(test_pki, port, "-w", "\n%{http_code}")
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    assert body.encode() == BACKEND_GREETING + b"path=/hello\n"

    wait_until(lambda: daemon.sample("mtls_proxy_handshakes_total", listener="api", result="success") == 1.0,
               what="handshakes_total{result=success} 1")
    assert daemon.sample("mtls_proxy_client_certificates_total", listener="api", presented="true") == 1.0
    assert daemon.sample("mtls_proxy_connections_total", listener="api") == 1.0
    wait_until(lambda: daemon.sample("mtls_proxy_active_connections", listener="api") == 0.0,
               what="active_connections back to 0")
    up = daemon.sample("mtls_proxy_bytes_total", listener="api", direction="client_to_backend")
    down = daemon.sample("mtls_proxy_bytes_total", listener="api", direction="backend_to_client")
    assert up > len("GET /hello HTTP/1.1\r\n")
    assert down > len(BACKEND_GREETING)

    [record] = wait_until(lambda: [r for r in daemon.access_records() if r.get("outcome") == "ok"],
                          what="the access-log line of the curl request")
    assert record["listener"] == "api"
    assert record["client_subject"] == "CN=alice,OU=payments,O=Acme"
    assert record["client_issuer"] == "CN=Test Client CA,O=Acme"
    assert record["client_sha256"] == test_pki.alice.issued.sha256
    assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert (record["bytes_up"], record["bytes_down"]) == (up, down)
    assert "BEGIN" not in daemon.stderr()  # nothing secret (no PEM) in the logs


def test_curl_without_client_cert_is_refused_and_counted(daemon_factory, test_pki, http_backend):
    daemon = daemon_factory([listener("api", test_pki, http_backend)])
    port = daemon.port()
    local_port = free_port()

    result = curl(test_pki, port, "--local-port", str(local_port), cert=False)
    assert result.returncode != 0, result.stdout
    assert "hello from the test backend" not in result.stdout

    line = 'mtls_proxy_handshake_failures_total{listener="api",reason="no_client_cert"} 1.0'

    def metrics_with_line() -> str | None:
        text = daemon.metrics()
        return text if line in text.splitlines() else None

    text = wait_until(metrics_with_line, what=f"the line {line!r} in /metrics")
    assert sample(text, "mtls_proxy_handshakes_total", listener="api", result="failure") == 1.0
    assert sample(text, "mtls_proxy_handshakes_total", listener="api", result="success") == 0.0
    for other in ("unknown_ca", "expired", "forbidden", "other"):
        assert sample(text, "mtls_proxy_handshake_failures_total", listener="api", reason=other) == 0.0

    records = wait_until(lambda: [r for r in daemon.access_records() if r.get("reason") == "no_client_cert"],
                         what="the access-log line of the rejected client")
    assert len(records) == 1, records
    record = records[0]
    assert record["level"] == "warning"
    assert record["listener"] == "api"
    assert record["outcome"] == "handshake_failed"
    assert record["client"] == f"127.0.0.1:{local_port}"
    assert record["bytes_up"] == 0 and record["bytes_down"] == 0


def test_untrusted_client_cert_is_logged_with_its_identity(daemon_factory, test_pki, http_backend):
    daemon = daemon_factory([listener("api", test_pki, http_backend)])
    ctx = client_context(test_pki.server_ca, test_pki.untrusted.cert, test_pki.untrusted.key)
    raw = socket.create_connection(("127.0.0.1", daemon.port()), timeout=CLIENT_TIMEOUT)
    local = raw.getsockname()
    try:
        # TLS 1.2 fails in the handshake; with TLS 1.3 the alert arrives after the client's side of it
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = tls.recv(1024)
        assert answer == b"", f"an untrusted client got an answer: {answer!r}"
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        raw.close()

    [record] = wait_until(lambda: [r for r in daemon.access_records() if r.get("reason") == "unknown_ca"],
                          what="the access-log line of the untrusted client")
    assert record["client"] == f"127.0.0.1:{local[1]}"
    assert record["outcome"] == "handshake_failed"
    assert record["client_subject"] == "CN=mallory,O=Acme"
    assert record["client_issuer"] == "CN=Other CA,O=Elsewhere"
    assert record["client_sha256"] == test_pki.untrusted.issued.sha256
    wait_until(lambda: daemon.sample("mtls_proxy_handshake_failures_total", listener="api", reason="unknown_ca") == 1.0,
               what="handshake_failures_total{reason=unknown_ca} 1")


# ---- one shared daemon for read-only checks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory, test_pki) -> Iterator[Daemon]:
    """Two listeners: `api` advertises its trusted CA, `both` advertises the client CA and the other CA."""
    directory = tmp_path_factory.mktemp("shared-daemon")
    # A backend nothing listens on: these checks only look at handshakes and the admin endpoint.
    backend = f"127.0.0.1:{free_port()}"
    config = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "listeners": [
            listener("api", test_pki, backend),
            listener("both", test_pki, backend, client_auth={"advertised_ca": str(test_pki.both_cas)}),
        ],
    }
    daemon = Daemon(config, directory)
    try:
        yield daemon.start()
    finally:
        daemon.kill()


def s_client_ca_names(port: int, version: str, test_pki: PKIFiles) -> list[str]:
    result = run_tool(
        [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", f"-{version}",
         "-CAfile", str(test_pki.server_ca), "-cert", str(test_pki.alice.cert), "-key", str(test_pki.alice.key)],
        stdin=subprocess.DEVNULL,
    )
    lines = result.stdout.splitlines()
    assert "Acceptable client certificate CA names" in lines, result.stdout + result.stderr
    protocol = {"tls1_2": "TLSv1.2", "tls1_3": "TLSv1.3"}[version]
    assert f"New, {protocol}, Cipher is " in result.stdout, result.stdout
    assert "Verify return code: 0 (ok)" in result.stdout  # the proxy's chain verified against the server CA
    start = lines.index("Acceptable client certificate CA names") + 1
    names = []
    for line in lines[start:]:
        if line.startswith(("Client Certificate Types", "Requested Signature Algorithms", "---")):
            break
        names.append(line)
    return names


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_s_client_sees_exactly_the_trusted_ca_names(shared_daemon, test_pki, version):
    names = s_client_ca_names(shared_daemon.port("api"), version, test_pki)
    assert names == ["O = Acme, CN = Test Client CA"]
    assert not any("Test Server CA" in name for name in names)


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_s_client_sees_the_advertised_ca_names(shared_daemon, test_pki, version):
    names = s_client_ca_names(shared_daemon.port("both"), version, test_pki)
    assert names == ["O = Acme, CN = Test Client CA", "O = Elsewhere, CN = Other CA"]


# The families of README.md, "Metrics", with their types and labels.
METRIC_FAMILIES = {
    "mtls_proxy_handshakes_total": ("counter", {"listener", "result"}),
    "mtls_proxy_handshake_failures_total": ("counter", {"listener", "reason"}),
    "mtls_proxy_handshake_duration_seconds": ("histogram", {"listener", "result"}),
    "mtls_proxy_tls_sessions_total": ("counter", {"listener", "version", "cipher", "resumed"}),
    "mtls_proxy_client_certificates_total": ("counter", {"listener", "presented"}),
    "mtls_proxy_active_connections": ("gauge", {"listener"}),
    "mtls_proxy_connections_total": ("counter", {"listener"}),
    "mtls_proxy_connection_duration_seconds": ("histogram", {"listener"}),
    "mtls_proxy_bytes_total": ("counter", {"listener", "direction"}),
    "mtls_proxy_backend_connect_failures_total": ("counter", {"listener"}),
    "mtls_proxy_backend_connect_duration_seconds": ("histogram", {"listener"}),
    "mtls_proxy_certificate_expiry_timestamp_seconds": ("gauge", {"listener", "role", "subject"}),
    "mtls_proxy_reloads_total": ("counter", {"result"}),
}
FAILURE_REASONS = ("no_client_cert", "unknown_ca", "expired", "not_yet_valid", "revoked", "bad_certificate",
                   "forbidden", "protocol_version", "no_shared_cipher", "not_tls", "timeout", "client_closed", "other")


def test_metrics_pass_promtool_and_have_every_family(shared_daemon, test_pki):
    # one successful handshake, so that the per-session families have a series
    ctx = client_context(test_pki.server_ca, test_pki.alice.cert, test_pki.alice.key)
    with connect_tls(shared_daemon.port("api"), ctx, timeout=CLIENT_TIMEOUT) as tls:
        version, cipher = tls.version(), tls.cipher()[0]
        tls.recv(1)  # the backend is down: the proxy closes after the handshake
    wait_until(lambda: shared_daemon.sample("mtls_proxy_tls_sessions_total", listener="api", version=version,
                                            cipher=cipher, resumed="false"),
               what=f"a tls_sessions_total series for the {version} {cipher} handshake")

    text = shared_daemon.metrics()
    lint = run_tool([tool("promtool"), "check", "metrics"], input=text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert (lint.stdout + lint.stderr).strip() == ""

    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    for name, (kind, labels) in METRIC_FAMILIES.items():
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)}, expected {kind}"
        sample_name = name + "_count" if kind == "histogram" else name
        label_sets = [set(s.labels) for s in samples if s.name == sample_name]
        assert label_sets, f"{name} has no series"
        assert all(got == labels for got in label_sets), f"{name}: labels {label_sets}, expected {labels}"

    for name in ("api", "both"):
        for reason in FAILURE_REASONS:
            assert sample(text, "mtls_proxy_handshake_failures_total", listener=name, reason=reason) is not None
        for direction in ("client_to_backend", "backend_to_client"):
            assert sample(text, "mtls_proxy_bytes_total", listener=name, direction=direction) is not None
        expiry = sample(text, "mtls_proxy_certificate_expiry_timestamp_seconds", listener=name, role="server",
                        subject="CN=localhost")
        assert expiry == test_pki.server.issued.cert.not_valid_after_utc.timestamp()
        assert sample(text, "mtls_proxy_certificate_expiry_timestamp_seconds", listener=name, role="trusted_ca",
                      subject="CN=Test Client CA,O=Acme") is not None
    for result in ("success", "failure"):
        assert sample(text, "mtls_proxy_reloads_total", result=result) == 0.0


def test_health_ready_and_status(shared_daemon):
    assert shared_daemon.get("/healthz") == (200, b"ok\n")
    assert shared_daemon.get("/readyz") == (200, b"ready\n")
    assert shared_daemon.get("/nope")[0] == 404

    status, body = shared_daemon.get("/status")
    assert status == 200
    document = json.loads(body)
    assert document["ready"] is True and document["draining"] is False
    listeners = {entry["name"]: entry for entry in document["listeners"]}
    assert set(listeners) == {"api", "both"}
    assert listeners["api"]["listen"] == f"127.0.0.1:{shared_daemon.port('api')}"
    assert listeners["api"]["client_auth"] == "require"
    assert listeners["api"]["advertised_ca"] == ["CN=Test Client CA,O=Acme"]
    assert listeners["both"]["advertised_ca"] == ["CN=Test Client CA,O=Acme", "CN=Other CA,O=Elsewhere"]
    assert listeners["api"]["server_certificate"]["subject"] == "CN=localhost"


# ---- SIGTERM: drain --------------------------------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def test_sigterm_drains_in_flight_connection_then_exits_0(daemon_factory, test_pki, threaded_echo_backend):
    daemon = daemon_factory([listener("api", test_pki, threaded_echo_backend)], "--drain-timeout", "10")
    port = daemon.port()
    ctx = client_context(test_pki.server_ca, test_pki.alice.cert, test_pki.alice.key)
    chunk = os.urandom(32 * 1024)
    sent = 0
    tls = connect_tls(port, ctx, timeout=CLIENT_TIMEOUT)
    try:
        for _ in range(4):
            echo_roundtrip(tls, chunk)
            sent += len(chunk)

        daemon.signal(signal.SIGTERM)
        wait_until(lambda: daemon.get("/readyz")[0] != 200, what="/readyz to stop saying 200")
        assert daemon.get("/readyz")[0] in (503, None)
        wait_until(lambda: refused(port), what="new connections to be refused")

        # the in-flight transfer keeps going, slowly
        for _ in range(5):
            echo_roundtrip(tls, chunk)
            sent += len(chunk)
            time.sleep(0.1)
        assert daemon.proc.poll() is None, "the daemon exited while a connection was still open"
    finally:
        closed_at = time.monotonic()
        tls.close()
    assert daemon.wait(5) == 0, daemon.stderr()
    assert time.monotonic() - closed_at < 5, "the daemon waited for the drain timeout instead of the connection"

    stderr = daemon.stderr()
    assert "Traceback" not in stderr
    assert "SIGTERM: draining" in stderr
    [record] = [r for r in daemon.access_records() if r.get("outcome") == "ok"]
    assert record["bytes_up"] == sent and record["bytes_down"] == sent


def test_sigterm_drain_timeout_cuts_stuck_connections(daemon_factory, test_pki, threaded_echo_backend):
    daemon = daemon_factory([listener("api", test_pki, threaded_echo_backend)], "--drain-timeout", "0.5")
    ctx = client_context(test_pki.server_ca, test_pki.alice.cert, test_pki.alice.key)
    with connect_tls(daemon.port(), ctx, timeout=CLIENT_TIMEOUT) as tls:
        echo_roundtrip(tls, b"still here")
        signaled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(5) == 0, daemon.stderr()
        assert 0.4 < time.monotonic() - signaled < 5
        # the client sees the connection end
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert tls.recv(100) == b""
    assert "Traceback" not in daemon.stderr()


def test_second_sigterm_stops_at_once(daemon_factory, test_pki, threaded_echo_backend):
    daemon = daemon_factory([listener("api", test_pki, threaded_echo_backend)], "--drain-timeout", "60")
    ctx = client_context(test_pki.server_ca, test_pki.alice.cert, test_pki.alice.key)
    with connect_tls(daemon.port(), ctx, timeout=CLIENT_TIMEOUT) as tls:
        echo_roundtrip(tls, b"still here")
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: daemon.get("/readyz")[0] != 200, what="the drain to begin")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(5) == 0, daemon.stderr()
    assert "closing every connection now" in daemon.stderr()


# ---- SIGHUP: certificate reload ---------------------------------------------------------------------------------


def test_sighup_reload_keeps_old_cert_on_failure_then_swaps(daemon_factory, test_pki, threaded_echo_backend, tmp_path):
    ca = pki.make_ca("Reload Server CA", organization="Acme")
    (tmp_path / "reload-ca.crt").write_bytes(ca.cert_pem())
    first, second = pki.make_server_cert(ca), pki.make_server_cert(ca)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(first.chain_pem())
    key.write_bytes(first.key_pem())

    tls = {"cert": str(cert), "key": str(key)}
    daemon = daemon_factory([listener("api", test_pki, threaded_echo_backend, tls=tls)])
    port = daemon.port()
    ctx = client_context(tmp_path / "reload-ca.crt", test_pki.alice.cert, test_pki.alice.key)
    assert served_fingerprint(port, ctx) == first.sha256

    def reloads(result: str) -> float | None:
        return daemon.sample("mtls_proxy_reloads_total", result=result)

    # a broken certificate file: the reload fails, the old certificate stays
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: reloads("failure") == 1.0, what='reloads_total{result="failure"} 1')
    assert reloads("success") == 0.0
    assert daemon.proc.poll() is None
    assert served_fingerprint(port, ctx) == first.sha256
    with connect_tls(port, ctx, timeout=CLIENT_TIMEOUT) as tls:
        echo_roundtrip(tls, b"still serving")
    stderr = daemon.stderr()
    assert "reload failed, still serving the previous " in stderr
    assert str(cert) in stderr

    # fixed: the next SIGHUP swaps in the new certificate for new connections
    key.write_bytes(second.key_pem())
    cert.write_bytes(second.chain_pem())
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: reloads("success") == 1.0, what='reloads_total{result="success"} 1')
    assert reloads("failure") == 1.0
    assert served_fingerprint(port, ctx) == second.sha256
    with connect_tls(port, ctx, timeout=CLIENT_TIMEOUT) as tls:
        echo_roundtrip(tls, b"new certificate")
    assert "Traceback" not in daemon.stderr()


# ---- startup failures -------------------------------------------------------------------------------------------


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield blocker.getsockname()[1]


@pytest.mark.parametrize("which", ["listener", "admin"])
def test_run_on_a_port_in_use_exits_1_naming_the_address(daemon_factory, test_pki, occupied_port, which):
    daemon = daemon_factory([listener("api", test_pki, "127.0.0.1:1")], start=False)
    section = daemon.config["listeners"][0] if which == "listener" else daemon.config["admin"]
    section["listen"] = f"127.0.0.1:{occupied_port}"
    daemon.config_path.write_text(yaml.safe_dump(daemon.config))
    result = run_tool([sys.executable, "-m", "proxy", "run", "--config", str(daemon.config_path)],
                      stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "mtls-proxy: error: " in result.stderr
    assert f"127.0.0.1:{occupied_port}" in result.stderr
    assert "Address already in use" in result.stderr


def test_run_with_a_bad_config_exits_2_before_binding(daemon_factory, test_pki):
    daemon = daemon_factory([listener("api", test_pki, "127.0.0.1:1", client_auth={"mode": "sometimes"})],
                            start=False)
    result = run_tool([sys.executable, "-m", "proxy", "run", "--config", str(daemon.config_path)],
                      stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "listeners[0].client_auth.mode: " in result.stderr
