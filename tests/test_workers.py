"""Worker processes: shared sockets, aggregated metrics, shared session tickets, supervision."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest
import yaml

from proxy.daemon.workers import usable_cpus
from tests.conftest import free_port
from tests.conftest import poll_until as wait_until

pytestmark = pytest.mark.slow


def echo_server() -> tuple[socket.socket, int]:
    """A forking-free echo backend in a thread of the test process."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture
def daemon(test_pki, tmp_path):
    backend, backend_port = echo_server()
    port, admin = free_port(), free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"format": "json", "level": "info"},
        "workers": 2,
        "drain_timeout": 5,
        "reload": {"watch_interval": 0},
        "listeners": [{
            "name": "w",
            "listen": f"127.0.0.1:{port}",
            "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
            "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
            "backend": {"address": f"127.0.0.1:{backend_port}"},
        }],
    }
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)], stderr=log)
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{admin}/readyz") == 200 and len(children(proc.pid)) == 3)
        yield proc, port, admin
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        backend.close()
        log.close()


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def metric(admin: int, line_prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def client_ctx(test_pki, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(test_pki.server_ca))
    ctx.load_cert_chain(str(test_pki.alice.cert), str(test_pki.alice.key))
    ctx.maximum_version = ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    )
    return ctx


def echo_once(port: int, ctx: ssl.SSLContext, session=None) -> tuple[bool, ssl.SSLSession]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"  # reading also collects the TLS 1.3 ticket
            return tls.session_reused, tls.session


def test_two_workers_serve_and_metrics_add_up(daemon, test_pki):
    _proc, port, admin = daemon
    ctx = client_ctx(test_pki, "1.3")
    for _ in range(20):
        echo_once(port, ctx)
    prefix = 'mtls_proxy_handshakes_total{listener="w",result="success"}'
    wait_until(lambda: metric(admin, prefix) == 20)
    wait_until(lambda: metric(admin, 'mtls_proxy_active_connections{listener="w"}') == 0)
    assert metric(admin, 'mtls_proxy_connections_total{listener="w"}') == 20


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_session_ticket_from_one_worker_resumes_on_the_other(daemon, test_pki, version):
    _proc, port, _admin = daemon
    ctx = client_ctx(test_pki, version)
    _, session = echo_once(port, ctx)
    # Connections land on either worker: had each worker its own ticket
    # keys, about half of these would not resume.
    reused = [echo_once(port, ctx, session)[0] for _ in range(12)]
    assert all(reused), reused


def test_a_dead_worker_is_replaced(daemon, test_pki):
    proc, port, _admin = daemon
    before = set(children(proc.pid))
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(proc.pid)) == 3 and victim not in children(proc.pid))
    ctx = client_ctx(test_pki, "1.3")
    for _ in range(6):
        assert echo_once(port, ctx)[1] is not None
    assert proc.poll() is None


def test_sighup_reloads_once_in_the_supervisor_then_sigterm_drains_all(daemon, test_pki):
    proc, port, admin = daemon
    before = set(children(proc.pid))
    proc.send_signal(signal.SIGHUP)
    # One reload, by the supervisor, not one per worker: a new generation of workers (and admin child) replaces
    # the old one, which drains.
    wait_until(lambda: metric(admin, 'mtls_proxy_reloads_total{result="success"}') == 1)
    wait_until(lambda: len(children(proc.pid)) == 3 and not set(children(proc.pid)) & before)
    assert echo_once(port, client_ctx(test_pki, "1.3"))[1] is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert children(proc.pid) == []


def test_usable_cpus_honours_affinity():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
