"""No surprises for operators: what clients will refuse is caught before they see it, and the process says why it
stopped.

- A server certificate whose extended key usage lacks serverAuth is a config error at `check`, at start and on
  reload (clients would refuse every handshake, which the proxy could only count as `other`).
- A listen address the server certificate does not name is a warning, printed by `check` and logged by `run`.
- The last log line of a stopped process: `stopped: reason=... drained=N forced=M uptime=...`.

Real `mtls-proxy` processes over loopback; certificates from proxy.dev.pki.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.config.materials import load_listener_materials
from proxy.config.schema import parse
from proxy.dev import pki
from tests.daemonkit import (
    HoldingBackend,
    client_context,
    close_all,
    free_port,
    open_idle_tls,
    proxy_config,
    start_daemon,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
CLIENT_AUTH_ONLY = (ExtendedKeyUsageOID.CLIENT_AUTH,)


def write_server(directory: Path, name: str, **options) -> tuple[Path, Path]:
    """A server certificate (and key) from a throwaway CA, written as NAME.crt and NAME.key."""
    issued = pki.make_server_cert(pki.make_ca(f"{name} CA"), **options)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem())
    return cert, key


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def log_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def served_sha256(port: int, ctx: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


# ---- the server certificate's purpose ------------------------------------------------------------------------


def materials_of(directory: Path, cert: Path, key: Path, listen: str = "127.0.0.1:8443"):
    config = parse({"listeners": [{
        "name": "api", "listen": listen, "tls": {"cert": str(cert), "key": str(key)},
        "client_auth": {"mode": "none"}, "backend": {"address": "127.0.0.1:8080"},
    }]}, base_dir=directory)
    return load_listener_materials(config.listeners[0], 0)


@pytest.mark.parametrize("usages", [
    (ExtendedKeyUsageOID.SERVER_AUTH,),
    (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,),
    (),  # no extension at all: any purpose
], ids=["serverAuth", "clientAuth+serverAuth", "anyExtendedKeyUsage", "no-EKU"])
def test_a_server_certificate_that_allows_tls_servers_is_accepted(tmp_path, usages):
    cert, key = write_server(tmp_path, "server", extended_key_usage=usages)
    materials = materials_of(tmp_path, cert, key)
    assert materials.server.cert_path == cert
    assert materials.warnings == ()


@pytest.mark.parametrize(("usages", "named"), [
    (CLIENT_AUTH_ONLY, "clientAuth"),
    ((ExtendedKeyUsageOID.CODE_SIGNING, x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")),
     "codeSigning, 1.3.6.1.4.1.99999.1"),
])
def test_a_server_certificate_whose_eku_lacks_server_auth_is_an_error(tmp_path, usages, named):
    from proxy.config.schema import ConfigError

    cert, key = write_server(tmp_path, "server", extended_key_usage=usages)
    with pytest.raises(ConfigError) as raised:
        materials_of(tmp_path, cert, key)
    assert raised.value.problems == (
        f"listeners[0].tls.cert: {cert}: the server certificate (CN=localhost) has an extended key usage of "
        f"{named}, without serverAuth: every TLS client refuses it from a server (\"unsuitable certificate "
        "purpose\"); issue it with serverAuth in its extended key usage",
    )


def test_check_refuses_a_server_certificate_for_clients_only_naming_field_and_file(tmp_path, test_pki):
    cert, key = write_server(tmp_path, "client-only", extended_key_usage=CLIENT_AUTH_ONLY)
    config = proxy_config(test_pki, "127.0.0.1:8080", port=free_port(), admin_port=free_port(),
                          listener={"tls": {"cert": str(cert), "key": str(key)}})
    result = run_cli("check", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert f"listeners[0].tls.cert: {cert}: the server certificate (CN=localhost) has an extended key usage of " \
           "clientAuth, without serverAuth" in result.stderr


@pytest.mark.slow
def test_a_reload_to_a_server_certificate_for_clients_only_fails_and_the_old_one_serves_on(tmp_path, test_pki):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(test_pki.server.cert.read_bytes())
    key.write_bytes(test_pki.server.key.read_bytes())
    backend = HoldingBackend()
    config = proxy_config(test_pki, backend.address, port=free_port(), admin_port=free_port(),
                          listener={"tls": {"cert": str(cert), "key": str(key)}})
    daemon = start_daemon(tmp_path, config)
    try:
        ctx = client_context(test_pki)
        assert served_sha256(daemon.port, ctx) == test_pki.server.issued.sha256

        bad_cert, bad_key = write_server(tmp_path, "client-only", extended_key_usage=CLIENT_AUTH_ONLY)
        cert.write_bytes(bad_cert.read_bytes())
        key.write_bytes(bad_key.read_bytes())
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.metric("mtls_proxy_reloads_total", result="failure") == 1.0, timeout=10,
                   what="the reload to fail", alive=daemon.proc)

        assert daemon.metric("mtls_proxy_reloads_total", result="success") == 0.0
        assert served_sha256(daemon.port, ctx) == test_pki.server.issued.sha256
        [failed] = [r for r in log_records(daemon.log()) if r["msg"].startswith("reload failed")]
        assert f"listeners[0].tls.cert: {cert}: the server certificate (CN=localhost) has an extended key usage " \
               "of clientAuth, without serverAuth" in failed["msg"]
        _, status = daemon.admin_get("/status")
        assert "without serverAuth" in json.loads(status)["last_reload"]["error"]
    finally:
        daemon.stop()
        backend.close()


# ---- names: warnings, not errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("listen", "warned"), [
    ("127.0.0.1:8443", None),
    ("[::1]:8443", None),
    ("0.0.0.0:8443", None),  # every address of the host: none in particular to check
    ("[::]:8443", None),
    ("10.1.2.3:8443", "the listen address 10.1.2.3 is not among the server certificate's IP SANs (127.0.0.1, ::1)"),
    ("localhost:8443", None),
    ("api.internal.example:8443", None),  # *.internal.example
    ("a.b.internal.example:8443",  # a wildcard stands for one label only
     "the listen host a.b.internal.example is not matched by the server certificate's DNS SANs "
     "(localhost, *.internal.example)"),
    ("other.example:8443",
     "the listen host other.example is not matched by the server certificate's DNS SANs "
     "(localhost, *.internal.example)"),
])
def test_a_listen_address_the_certificate_does_not_name_is_a_warning(tmp_path, listen, warned):
    cert, key = write_server(tmp_path, "server", dns_names=("localhost", "*.internal.example"))
    warnings = materials_of(tmp_path, cert, key, listen=listen).warnings
    if warned is None:
        assert warnings == ()
    else:
        [warning] = warnings
        assert warning.startswith(f"listeners[0].tls.cert: {cert}: {warned}: a client that connects to https://")


def test_a_certificate_without_sans_of_that_kind_gets_no_name_warning(tmp_path):
    # A certificate that names no address is reached by name, wherever it listens; one that names only addresses
    # is reached by address. So is one without SANs at all, which clients match by its CN, if at all.
    names_only = write_server(tmp_path, "names", ip_addresses=())
    addresses_only = write_server(tmp_path, "addresses", dns_names=())
    assert materials_of(tmp_path, *names_only, listen="10.1.2.3:8443").warnings == ()
    assert materials_of(tmp_path, *addresses_only, listen="other.example:8443").warnings == ()
    no_sans = write_server(tmp_path, "no-sans", dns_names=(), ip_addresses=())
    assert materials_of(tmp_path, *no_sans, listen="10.1.2.3:8443").warnings == ()


def test_check_prints_the_name_warnings_and_passes(tmp_path, test_pki):
    cert, key = write_server(tmp_path, "server")  # localhost, 127.0.0.1, ::1
    config = proxy_config(test_pki, "127.0.0.1:8080", port=8443, admin_port=free_port())
    first = config["listeners"][0]
    first["tls"] = {"cert": str(cert), "key": str(key)}
    config["listeners"] = [
        {**first, "name": "by-address", "listen": "10.1.2.3:8443"},
        {**first, "name": "by-name", "listen": "proxy.example:8444"},
        {**first, "name": "everywhere", "listen": "0.0.0.0:8445"},
    ]
    result = run_cli("check", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    warnings = [line.strip() for line in result.stdout.splitlines() if "SANs" in line]
    assert warnings == [
        f"warning: listeners[0].tls.cert: {cert}: the listen address 10.1.2.3 is not among the server certificate's "
        "IP SANs (127.0.0.1, ::1): a client that connects to https://10.1.2.3:8443 refuses the certificate (name "
        "mismatch); ignore this if clients use a name it holds",
        f"warning: listeners[1].tls.cert: {cert}: the listen host proxy.example is not matched by the server "
        "certificate's DNS SANs (localhost): a client that connects to https://proxy.example:8444 refuses the "
        "certificate (name mismatch); ignore this if clients use a name it holds",
    ]
    # Each under its own listener.
    out = result.stdout
    assert (out.index("listener by-address:") < out.index("address 10.1.2.3 is not") < out.index("listener by-name:")
            < out.index("host proxy.example is not") < out.index("listener everywhere:"))


@pytest.mark.slow
def test_run_logs_the_name_warning_at_start(tmp_path, test_pki):
    cert, key = write_server(tmp_path, "server", ip_addresses=("::1",))  # listens on 127.0.0.1, names ::1 only
    backend = HoldingBackend()
    config = proxy_config(test_pki, backend.address, port=free_port(), admin_port=free_port(),
                          listener={"tls": {"cert": str(cert), "key": str(key)}})
    daemon = start_daemon(tmp_path, config)
    try:
        warned = [r for r in log_records(daemon.log()) if "SANs" in r["msg"]]
    finally:
        daemon.stop()
        backend.close()
    [record] = warned
    assert record["level"] == "warning"
    assert "the listen address 127.0.0.1 is not among the server certificate's IP SANs (::1)" in record["msg"]


# ---- the last log line -----------------------------------------------------------------------------------------


def last_record(text: str) -> dict:
    lines = text.strip().splitlines()
    assert lines, "nothing was logged"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_after_sigterm_the_last_line_says_stopped_with_what_drained_and_what_was_cut(tmp_path, test_pki):
    backend = HoldingBackend()
    config = proxy_config(test_pki, backend.address, port=free_port(), admin_port=free_port(), drain_timeout=1)
    daemon = start_daemon(tmp_path, config)
    clients = []
    try:
        clients = open_idle_tls(daemon.port, client_context(test_pki), 2, threads=2)
        wait_until(lambda: len(backend.held) == 2, timeout=10, what="both connections to reach the backend")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM: draining" in daemon.log(), timeout=10, what="the drain to begin")
        # One connection ends by itself, within the drain: its client resets it. The other is cut at the deadline.
        clients[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clients[0].close()
        code = daemon.proc.wait(timeout=15)
    finally:
        close_all(clients)
        daemon.stop()
        backend.close()
    assert code == 0
    last = last_record(daemon.log())
    assert last["logger"] == "proxy.daemon.lifecycle"
    assert last["level"] == "info"
    assert last["msg"].startswith("stopped: reason=sigterm drained=1 forced=1 uptime="), last
    assert last["msg"].endswith("s")
    assert (last["stop_reason"], last["drained"], last["forced"]) == ("sigterm", 1, 1)
    assert 0 < last["uptime_s"] < 60


@pytest.mark.slow
def test_after_sigint_with_nothing_open_the_last_line_says_so(tmp_path, test_pki):
    config = proxy_config(test_pki, "127.0.0.1:9", port=free_port(), admin_port=free_port())
    daemon = start_daemon(tmp_path, config)
    try:
        daemon.proc.send_signal(signal.SIGINT)
        code = daemon.proc.wait(timeout=15)
    finally:
        daemon.stop()
    assert code == 0
    last = last_record(daemon.log())
    assert last["msg"].startswith("stopped: reason=sigint drained=0 forced=0 uptime="), last


def test_a_proxy_that_cannot_start_logs_stopped_with_reason_error_last(tmp_path, test_pki):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        config = proxy_config(test_pki, "127.0.0.1:9", port=port, admin_port=free_port())
        result = run_cli("run", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    *_, error, last_line = result.stderr.strip().splitlines()
    assert error == f"mtls-proxy: error: listener main: cannot listen on 127.0.0.1:{port}: Address already in use"
    last = json.loads(last_line)
    assert last["level"] == "warning"
    assert last["msg"].startswith("stopped: reason=error uptime="), last


@pytest.mark.slow
def test_with_workers_each_worker_and_then_the_supervisor_log_stopped(tmp_path, test_pki):
    config = proxy_config(test_pki, "127.0.0.1:9", port=free_port(), admin_port=free_port(), workers=2)
    daemon = start_daemon(tmp_path, config)
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(timeout=20)
    finally:
        daemon.stop()
    assert code == 0
    stopped = [r["msg"] for r in log_records(daemon.log()) if r["msg"].startswith("stopped:")]
    assert len(stopped) == 3, stopped
    assert all(msg.startswith("stopped: reason=sigterm drained=0 forced=0 uptime=") for msg in stopped[:2])
    assert stopped[2].startswith("stopped: reason=signal workers=2 uptime=")
    assert last_record(daemon.log())["msg"] == stopped[2]
