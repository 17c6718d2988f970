"""A real `mtls-proxy run` subprocess and the crowds of clients that load it.

For the tests and benchmarks that need a whole process: a low RLIMIT_NOFILE, thousands of connections, a
SIGTERM drain. Everything is loopback; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_own_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (thousands of client sockets live here)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class HoldingBackend:
    """A TCP backend that accepts every connection and keeps it open, silent, until closed."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            self.held.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()
        self.held.clear()


@dataclass
class Daemon:
    """An `mtls-proxy run` subprocess whose stderr goes to a file."""

    proc: subprocess.Popen
    port: int
    admin_port: int
    log_path: Path
    config_path: Path
    _log_file: object = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (labels matched as a subset)."""
        _, text = self.admin_get("/metrics")
        for line in text.splitlines():
            match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
        raise KeyError(f"{name}{labels} not in /metrics")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self._log_file is not None:
                self._log_file.close()


def proxy_config(pki, backend: str, *, port: int, admin_port: int, **overrides) -> dict:
    """A one-listener config for `pki` (tests' TestPKI: server, client_ca); overrides go to the top level,
    `listener` (a dict) is merged into the listener."""
    listener = {
        "name": "main",
        "listen": f"127.0.0.1:{port}",
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "client_auth": {"mode": "require", "trusted_ca": str(pki.client_ca)},
        "backend": {"address": backend},
        "timeouts": {"handshake": 30},
    }
    listener.update(overrides.pop("listener", {}))
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"format": "json"},
        "reload": {"watch_interval": 0},
        "drain_timeout": 2,
        "listeners": [listener],
    }
    config.update(overrides)
    return config


def start_daemon(directory: Path, config: dict, *, fd_limit: int | None = None, name: str = "proxy") -> Daemon:
    """Run `mtls-proxy run` on `config`, with RLIMIT_NOFILE `fd_limit` (soft and hard) if given; returns once the
    listener and the admin endpoint accept connections."""
    config_path = directory / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / f"{name}.log"

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config_path)], stderr=log_file,
                            preexec_fn=limit_fds if fd_limit else None)
    port = int(config["listeners"][0]["listen"].rsplit(":", 1)[1])
    admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    daemon = Daemon(proc, port, admin_port, log_path, config_path, log_file)
    try:
        wait_until(lambda: daemon.admin_get("/readyz", timeout=1)[0] == 200 if _port_open(admin_port) else False,
                   timeout=20, what="the daemon to become ready", alive=proc)
    except AssertionError as exc:
        daemon.stop()
        raise AssertionError(f"{exc}; its log:\n{daemon.log()[-3000:]}") from None
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str, alive: subprocess.Popen | None = None,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the daemon exited ({alive.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dev_pki(directory: Path):
    """`mtls-proxy certs init` material shaped like the tests' TestPKI (for the benchmarks, outside pytest)."""
    from types import SimpleNamespace

    from proxy.dev.pki import write_dev_pki

    dev = write_dev_pki(directory, overwrite=True)
    return SimpleNamespace(
        server=SimpleNamespace(cert=dev.server_cert, key=dev.server_key),
        alice=SimpleNamespace(cert=dev.client_cert, key=dev.client_key),
        client_ca=dev.ca_cert,
        server_ca=dev.ca_cert,
    )


def client_context(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.server_ca))
    ctx.load_cert_chain(str(pki.alice.cert), str(pki.alice.key))
    return ctx


def connect_tls(port: int, ctx: ssl.SSLContext, *, timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:`port` with the handshake done (blocking; the socket closed if it fails)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def open_idle_tls(port: int, ctx: ssl.SSLContext, count: int, *, threads: int = 8,
                  timeout: float = 30) -> list[ssl.SSLSocket]:
    """`count` mTLS connections with the handshake done, left open and silent. Threads overlap the client's half
    of each handshake with the proxy's (ssl releases the GIL while it computes and waits)."""

    def one(_: int) -> ssl.SSLSocket:
        return connect_tls(port, ctx, timeout=timeout)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def open_silent_tcp(port: int, count: int, timeout: float = 10) -> list[socket.socket]:
    """`count` TCP connections that never send a byte (they sit in the proxy's handshake until its timeout)."""
    out: list[socket.socket] = []
    try:
        for _ in range(count):
            out.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
    sockets.clear()


def tls_request_ok(port: int, ctx: ssl.SSLContext, timeout: float = 5) -> bool:
    """One full mTLS handshake; True if it completed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.version() is not None
    except (OSError, ssl.SSLError):
        return False
