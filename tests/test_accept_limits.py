"""More clients than file descriptors: the proxy stops accepting within its
descriptor budget (the rest wait in the backlog) instead of running into
EMFILE, and serves again once the crowd leaves. Needs its own process (a low
RLIMIT_NOFILE) so it cannot disturb the test runner. tests/test_fd_limit.py
has the admin endpoint's side and a real EMFILE."""

from __future__ import annotations

import resource
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trio
import yaml

from proxy.net.accepting import take_waiting
from proxy.net.sockstream import SocketListener
from tests.conftest import free_port

pytestmark = pytest.mark.slow

FD_LIMIT = 64


def test_more_clients_than_descriptors_wait_in_the_backlog_and_recover(test_pki, tmp_path):
    port, admin = free_port(), free_port()
    backend = socket.create_server(("127.0.0.1", 0))
    config = {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"format": "text"},
        "reload": {"watch_interval": 0},
        "drain_timeout": 1,
        "listeners": [{
            "name": "fd",
            "listen": f"127.0.0.1:{port}",
            "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
            "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
            "backend": {"address": f"127.0.0.1:{backend.getsockname()[1]}"},
            "timeouts": {"handshake": 30},
        }],
    }
    path = tmp_path / "fd.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "fd.log"

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)], stderr=log,
                                preexec_fn=low_fd_limit)
    hogs: list[socket.socket] = []
    try:
        wait_for_port(port)
        # Silent clients would hold a descriptor each in the proxy until the
        # handshake timeout; more of them than the limit would exhaust it.
        for _ in range(FD_LIMIT + 10):
            hogs.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1)  # the accept loop takes what it will
        assert proc.poll() is None
        for hog in hogs:
            hog.close()
        hogs.clear()
        # Descriptors free again: a real client is served.
        assert handshake_succeeds(test_pki, port)
        log = log_path.read_text()
        assert "Too many open files" not in log and "Traceback" not in log, log
    finally:
        for hog in hogs:
            hog.close()
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        backend.close()


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.05)


def handshake_succeeds(test_pki, port: int, timeout: float = 10) -> bool:
    ctx = ssl.create_default_context(cafile=str(test_pki.server_ca))
    ctx.load_cert_chain(str(test_pki.alice.cert), str(test_pki.alice.key))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"x")  # the backend accepts and never answers; the handshake is what counts
                    return tls.version() is not None
        except (OSError, ssl.SSLError):
            time.sleep(0.1)  # the proxy may still be closing the hogs' connections
    return False


async def test_connections_waiting_in_the_backlog_are_accepted_in_bounded_batches():
    # A real listening socket with 100 clients queued: one batch takes at most its size, never more than the
    # listener's slots or the process's descriptor budget allow, and nothing when the backlog is empty.
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener = SocketListener(server)
    clients = [socket.create_connection(server.getsockname()) for _ in range(100)]
    slots, budget = trio.Semaphore(80), trio.Semaphore(1000)
    try:
        first = list(take_waiting(listener, (slots, budget), 64))
        assert len(first) == 64 and (slots.value, budget.value) == (16, 936)
        second = list(take_waiting(listener, (slots, budget), 64))
        assert len(second) == 16 and slots.value == 0  # the listener's max_connections
        for stream in first[:30]:
            await stream.aclose()
            slots.release()
            budget.release()
        third = list(take_waiting(listener, (slots, budget), 64))
        assert len(third) == 20  # the rest of the backlog, then the batch ends on EAGAIN
        assert list(take_waiting(listener, (slots, budget), 64)) == []
        for stream in first[30:] + second + third:
            await stream.aclose()
    finally:
        for client in clients:
            client.close()
        await listener.aclose()
