"""Latency of healthy clients while 1,500 silent connections arrive at once and later time out together.

    python bench/burst.py --runs 3

Each run starts `mtls-proxy run` (handshake timeout 5 s) in front of an echo backend. --clients processes each do full
mTLS handshakes plus one 4-byte echo, one after another, for --seconds, and record each one's latency. In the
"burst" runs, 3 s in, this process opens --silent raw TCP connections at once and keeps them silent, so their
handshake deadlines expire together about 5 s later, inside the window. "baseline" runs have no burst. Prints
p50/p99 (ms) per run and the median over runs. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemonkit import (
    close_all,
    dev_pki,
    free_port,
    open_silent_tcp,
    proxy_config,
    raise_own_fd_limit,
    start_daemon,
    wait_until,
)

HANDSHAKE_TIMEOUT = 5.0
BURST_AT = 3.0  # seconds into the client's window

_CLIENT = textwrap.dedent("""
    import json, socket, ssl, sys, time
    port, ca, cert, key, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(out) < 100_000:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"ping"
        out.append((started, time.monotonic() - started))
    print(json.dumps(out))
""")


class EchoBackend:
    """A TCP backend that echoes, a thread per connection (only the healthy clients reach it)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept_forever, daemon=True).start()

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.server.close()


def one_run(directory: Path, pki, *, silent: int, seconds: float, clients: int) -> list[float]:
    backend = EchoBackend()
    config = proxy_config(pki, backend.address, port=free_port(), admin_port=free_port(),
                          listener={"timeouts": {"handshake": HANDSHAKE_TIMEOUT}, "max_connections": silent + 500})
    daemon = start_daemon(directory, config)
    hogs: list[socket.socket] = []
    try:
        command = [sys.executable, "-c", _CLIENT, str(daemon.port), str(pki.server_ca), str(pki.alice.cert),
                   str(pki.alice.key), str(seconds)]
        clients_ = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
        burst_at = None
        if silent:
            time.sleep(BURST_AT)
            burst_at = time.monotonic()
            hogs = open_silent_tcp(daemon.port, silent)
        outs = [client.communicate(timeout=seconds + 60)[0] for client in clients_]
    finally:
        close_all(hogs)
        daemon.stop()
        backend.close()
    samples = [(started, latency * 1000) for out in outs for started, latency in json.loads(out)]
    if burst_at is not None:
        _print_windows(samples, burst_at)
    return [latency for _, latency in samples]


def _print_windows(samples: list[tuple[float, float]], burst_at: float) -> None:
    """The worst latency while the burst is accepted, while its handshake deadlines expire, and elsewhere."""
    windows = {"accepting the burst": (burst_at - 0.2, burst_at + 1.5),
               "deadlines expiring": (burst_at + HANDSHAKE_TIMEOUT - 0.5, burst_at + HANDSHAKE_TIMEOUT + 2.0)}
    worst = dict.fromkeys((*windows, "elsewhere"), 0.0)
    for started, latency in samples:
        name = next((n for n, (a, b) in windows.items() if a <= started < b), "elsewhere")
        worst[name] = max(worst[name], latency)
    print("    worst ms: " + ", ".join(f"{name} {value:.0f}" for name, value in worst.items()), flush=True)


def cpu_costs(directory: Path, pki, *, silent: int) -> tuple[float, float]:
    """The daemon's CPU seconds to accept ``silent`` connections, and to time them all out (no healthy clients)."""
    backend = EchoBackend()
    config = proxy_config(pki, backend.address, port=free_port(), admin_port=free_port(),
                          listener={"timeouts": {"handshake": HANDSHAKE_TIMEOUT}, "max_connections": silent + 500})
    daemon = start_daemon(directory, config)
    hogs: list[socket.socket] = []
    try:
        before = _cpu_seconds(daemon.proc.pid)
        hogs = open_silent_tcp(daemon.port, silent)
        wait_until(lambda: daemon.metric("mtls_proxy_active_connections", listener="main") >= silent,
                   timeout=30, what="the burst to be accepted", interval=0.2)
        accepted = _cpu_seconds(daemon.proc.pid)
        wait_until(lambda: daemon.metric("mtls_proxy_active_connections", listener="main") == 0,
                   timeout=HANDSHAKE_TIMEOUT + 30, what="the handshake timeouts", interval=0.2)
        expired = _cpu_seconds(daemon.proc.pid)
    finally:
        close_all(hogs)
        daemon.stop()
        backend.close()
    return accepted - before, expired - accepted


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--silent", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=4, help="healthy client processes, each one at a time")
    parser.add_argument("--cpu", action="store_true", help="measure the daemon's CPU per accept and per timeout")
    args = parser.parse_args()
    raise_own_fd_limit()
    if args.cpu:
        with tempfile.TemporaryDirectory() as tmp:
            pki = dev_pki(Path(tmp) / "pki")
            rows = [cpu_costs(Path(tmp), pki, silent=args.silent) for _ in range(args.runs)]
        for accept, expire in rows:
            print(f"accept {accept / args.silent * 1e6:5.0f} us/connection, "
                  f"time out {expire / args.silent * 1e6:5.0f} us/connection")
        return
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "burst": []}
    with tempfile.TemporaryDirectory() as tmp:
        pki = dev_pki(Path(tmp) / "pki")
        for run in range(args.runs):
            for kind in ("baseline", "burst"):
                latencies = one_run(Path(tmp), pki, silent=args.silent if kind == "burst" else 0,
                                    seconds=args.seconds, clients=args.clients)
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                results[kind].append((p50, p99))
                print(f"run {run + 1} {kind:8}: {len(latencies):5d} requests, p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, "
                      f"max {max(latencies):6.1f} ms", flush=True)
    for kind, rows in results.items():
        print(f"median {kind:8}: p50 {statistics.median(r[0] for r in rows):6.1f} ms, "
              f"p99 {statistics.median(r[1] for r in rows):6.1f} ms")
    ratio = statistics.median(r[1] for r in results["burst"]) / statistics.median(r[1] for r in results["baseline"])
    print(f"p99 burst / baseline: {ratio:.2f}x")


if __name__ == "__main__":
    main()
