#!/usr/bin/env python3
"""Reliability of the real daemon under many, hostile and broken connections: bounded, loopback only.

    python bench/reliability.py --results bench/RELIABILITY.md     # full run, about 10 minutes
    python bench/reliability.py --quick                             # about 40 s; tests/test_bench_reliability.py
    python bench/reliability.py --only held --held 9900             # one phase

It starts ``mtls-proxy run`` (a subprocess, with a PKI from bench/run.py's ``write_pki`` and bench/backend.py as
the backend) and runs five phases against it, each with a fixed count and a time limit:

held
    N mTLS connections opened and proved to reach the backend (PING/PONG), held, then closed: how many were held,
    the errors, RSS before, with them open, and after closing (at once and once memory is given back, up to
    ``--settle`` seconds).
slowloris
    healthy clients (connect, handshake, PING/PONG, close, one after the other) measure p50/p99 latency; then the
    same while a burst of silent TCP connections (nothing sent) holds handshake slots.
mixed
    connections with mixed outcomes, round robin: a good client, no certificate, a certificate from another CA,
    plain HTTP, a client that closes at once. The daemon's open fds and RSS before and after, and the counters in
    /metrics against the attempts.
faults
    a listener whose backend is down and one whose backend resets every connection after the first bytes: each
    failure is counted, and no client waits for its timeout.
rotation
    clients run without pause while the server certificate files are rewritten and SIGHUP sent every few seconds:
    every client must succeed and every reload too.

The process tree's open fds are counted from /proc/PID/fd, RSS from /proc/PID/status (summed over workers). The
bench raises its own RLIMIT_NOFILE to the hard limit; a daemon process needs two fds per held connection (client
and backend), so when the held connections do not fit one process's limit the daemon runs with enough workers.
Prints the JSON of every number on stdout (``--json FILE`` writes it too) and writes a Markdown report with
``--results FILE``. The exit code is 1 when an invariant is broken (see :func:`invariants`), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import procfs  # noqa: E402
import trio  # noqa: E402
import yaml  # noqa: E402
from peers import free_port  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from report import table  # noqa: E402
from run import Backend, code_version, write_pki  # noqa: E402

SERVER_NAME = "localhost"
START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
# fds a daemon process needs besides its connections: listeners, admin, logs, the trio wakeup pipe, epoll.
FD_RESERVE = 200
MIXED_KINDS = ("good", "no_cert", "wrong_ca", "plain_http", "early_close")
# What each kind of mixed client must leave in /metrics: a handshake success or a failure with this reason.
EXPECTED_REASON = {"no_cert": "no_client_cert", "wrong_ca": "unknown_ca", "plain_http": "not_tls",
                   "early_close": "client_closed"}


@dataclass(frozen=True)
class Settings:
    held: int = 10_000
    burst: int = 1_500
    mixed: int = 50_000
    faults: int = 500
    soak: float = 60.0
    rotate_every: float = 3.0
    latency_samples: int = 300
    concurrency: int = 64
    settle: float = 60.0
    handshake_timeout: float = 10.0


QUICK = Settings(held=500, burst=150, mixed=2_000, faults=50, soak=10.0, rotate_every=2.0, latency_samples=60,
                 settle=15.0)


def log(message: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def workers_for(held: int, nofile: int) -> int:
    """Worker processes needed so that each one's share of held connections (2 fds each) fits its fd limit."""
    return max(1, math.ceil(2 * held / (nofile - FD_RESERVE)))


# ---- the daemon -------------------------------------------------------------------------------------------------


class Daemon:
    """``mtls-proxy run`` with three listeners: ``main`` (the backend), ``down`` (a closed port), ``resets``."""

    def __init__(self, workdir: Path, pki: Path, ca: Any, backend_port: int, reset_port: int, *, workers: int,
                 handshake_timeout: float) -> None:
        self.workdir, self.pki, self.ca = workdir, pki, ca  # ca: a proxy.dev.pki.Issued the clients trust
        self.workers = workers
        self.ports = {"main": free_port(), "down": free_port(), "resets": free_port()}
        self.admin_port = free_port()
        backends = {"main": backend_port, "down": free_port(), "resets": reset_port}
        listeners = [{
            "name": name,
            "listen": f"127.0.0.1:{port}",
            "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")},
            "client_auth": {"mode": "require", "trusted_ca": str(pki / "ca.crt")},
            "backend": {"address": f"127.0.0.1:{backends[name]}", "connect_timeout": 5},
            "timeouts": {"handshake": handshake_timeout, "idle": 600},
            "max_connections": 15_000,
        } for name, port in self.ports.items()]
        config = {"admin": {"listen": f"127.0.0.1:{self.admin_port}"}, "log": {"level": "warning", "format": "json"},
                  "reload": {"watch_interval": 0}, "workers": workers, "listeners": listeners}
        self.config_path = workdir / "mtls-proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.stderr = open(workdir / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr, cwd=workdir, start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the daemon was not ready after {START_TIMEOUT:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.workdir / "daemon.log").read_text(errors="replace")[-1500:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        return procfs.descendants(self.pid)  # the daemon and its workers

    def fds(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def rss_mb(self) -> float:
        return procfs.tree_kb(self.pid, "VmRSS") / 1024

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.stderr.close()


def metric(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> int:
    return round(metric(after, name, **labels) - metric(before, name, **labels))


def active(snapshot: dict) -> int:
    return round(sum(v for (name, _), v in snapshot.items() if name == "mtls_proxy_active_connections"))


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = trio.current_time() + timeout
    while not predicate():
        if trio.current_time() > deadline:
            return False
        await trio.sleep(interval)
    return True


# ---- clients ----------------------------------------------------------------------------------------------------


class Clients:
    """TLS client contexts: the good certificate, none, and one from another CA."""

    def __init__(self, pki: Path) -> None:
        self.good = self._context(pki, "client")
        self.no_cert = self._context(pki, None)
        self.wrong_ca = self._context(pki, "other")

    @staticmethod
    def _context(pki: Path, cert: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if cert is not None:
            ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
        return ctx


async def open_tls(port: int, ctx: ssl.SSLContext) -> trio.SSLStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=SERVER_NAME)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def ping(stream: trio.abc.Stream) -> bool:
    """PING through the proxy; True when the backend's PONG came back."""
    await stream.send_all(b"PING\n")
    answer = b""
    while not answer.endswith(b"\n"):
        piece = await stream.receive_some(64)
        if not piece:
            return False
        answer += piece
    return answer == b"PONG\n"


async def good_client(port: int, ctx: ssl.SSLContext) -> str:
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await open_tls(port, ctx)
        try:
            return "ok" if await ping(stream) else "no_pong"
        finally:
            await trio.aclose_forcefully(stream)


async def refused_client(port: int, ctx: ssl.SSLContext) -> str:
    """A client the proxy must refuse: "refused" when it was, "admitted" when the backend answered."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await open_tls(port, ctx)  # TLS 1.3: the client finishes before the server judges it
            try:
                return "admitted" if await ping(stream) else "refused"
            finally:
                await trio.aclose_forcefully(stream)
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        return "refused"


async def plain_http_client(port: int) -> str:
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return "refused"


async def early_close_client(port: int) -> str:
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
    return "refused"


async def run_bounded(jobs: list[Callable[[], Awaitable[str]]], concurrency: int) -> Counter[str]:
    """Run every job, at most ``concurrency`` at a time; count their outcomes (an exception counts by type)."""
    outcomes: Counter[str] = Counter()
    limit = trio.CapacityLimiter(concurrency)

    async def one(job: Callable[[], Awaitable[str]]) -> None:
        async with limit:
            try:
                outcomes[await job()] += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
                outcomes[f"error:{type(exc).__name__}"] += 1

    async with trio.open_nursery() as nursery:
        for job in jobs:
            await limit.acquire()  # do not create every task up front: 50,000 of them cost memory in the bench
            limit.release()
            nursery.start_soon(one, job)
    return outcomes


# ---- phases -------------------------------------------------------------------------------------------------------


async def phase_held(d: Daemon, clients: Clients, s: Settings) -> dict[str, Any]:
    rss_before, fds_before = d.rss_mb(), d.fds()
    streams: list[trio.SSLStream] = []
    errors: Counter[str] = Counter()
    limit = trio.CapacityLimiter(s.concurrency)

    async def hold_one() -> None:
        async with limit:
            try:
                with trio.fail_after(CONNECT_TIMEOUT * 3):
                    stream = await open_tls(d.ports["main"], clients.good)
                    if await ping(stream):
                        streams.append(stream)
                        return
                    errors["no_pong"] += 1
                    await trio.aclose_forcefully(stream)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
                errors[type(exc).__name__] += 1

    started = time.monotonic()
    with trio.move_on_after(max(120.0, s.held * 0.02)):
        async with trio.open_nursery() as nursery:
            for _ in range(s.held):
                nursery.start_soon(hold_one)
    open_seconds = time.monotonic() - started
    await trio.sleep(1)
    rss_peak, fds_peak = d.rss_mb(), d.fds()
    log(f"held {len(streams)} of {s.held} ({dict(errors)}) in {open_seconds:.0f}s; RSS {rss_peak:.0f} MB")
    for stream in streams:
        await trio.aclose_forcefully(stream)
    held = len(streams)
    streams.clear()
    await wait_until(lambda: active(d.metrics()) == 0, 60)
    rss_closed = d.rss_mb()
    closed_at = time.monotonic()
    # Memory comes back once the proxy notices the burst is over (proxy/capacity.py, every 5 s); wait for RSS to
    # stop falling, or for the settle time.
    samples = [(0.0, rss_closed)]
    while time.monotonic() - closed_at < s.settle:
        await trio.sleep(5)
        samples.append((time.monotonic() - closed_at, d.rss_mb()))
    return {"target": s.held, "held": held, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "open_seconds": open_seconds, "rss_before_mb": rss_before, "rss_peak_mb": rss_peak,
            "rss_closed_mb": rss_closed, "rss_settled_mb": samples[-1][1], "settle_seconds": samples[-1][0],
            "rss_samples": samples, "fds_before": fds_before, "fds_peak": fds_peak,
            "per_connection_kb": (rss_peak - rss_before) * 1024 / held if held else None}


async def latencies(port: int, ctx: ssl.SSLContext, count: int) -> tuple[list[float], Counter[str]]:
    """Seconds of each healthy client in turn (connect, handshake, PING/PONG, close), and the failures by kind."""
    times: list[float] = []
    errors: Counter[str] = Counter()
    for _ in range(count):
        start = time.perf_counter()
        try:
            outcome = await good_client(port, ctx)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            outcome = type(exc).__name__
        if outcome == "ok":
            times.append(time.perf_counter() - start)
        else:
            errors[outcome] += 1
    return times, errors


def percentiles(times: list[float]) -> dict[str, float | None]:
    if len(times) < 2:
        return {"p50_ms": None, "p99_ms": None}
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


async def phase_slowloris(d: Daemon, clients: Clients, s: Settings) -> dict[str, Any]:
    port = d.ports["main"]
    base_times, base_errors = await latencies(port, clients.good, s.latency_samples)
    silent: list[trio.SocketStream] = []
    opened_errors = 0
    for _ in range(s.burst):
        try:
            silent.append(await trio.open_tcp_stream("127.0.0.1", port))
        except OSError:
            opened_errors += 1
    attack_times, attack_errors = await latencies(port, clients.good, s.latency_samples)
    for stream in silent:
        await trio.aclose_forcefully(stream)
    await wait_until(lambda: active(d.metrics()) == 0, s.handshake_timeout + 10)
    result = {"silent": len(silent), "silent_errors": opened_errors,
              "baseline": {**percentiles(base_times), "errors": sum(base_errors.values()),
                           "error_kinds": dict(base_errors), "samples": len(base_times)},
              "attack": {**percentiles(attack_times), "errors": sum(attack_errors.values()),
                         "error_kinds": dict(attack_errors), "samples": len(attack_times)}}
    log(f"slowloris: {result}")
    return result


def mixed_job(kind: str, port: int, clients: Clients) -> Callable[[], Awaitable[str]]:
    if kind == "good":
        return lambda: good_client(port, clients.good)
    if kind == "no_cert":
        return lambda: refused_client(port, clients.no_cert)
    if kind == "wrong_ca":
        return lambda: refused_client(port, clients.wrong_ca)
    if kind == "plain_http":
        return lambda: plain_http_client(port)
    return lambda: early_close_client(port)


async def phase_mixed(d: Daemon, clients: Clients, s: Settings) -> dict[str, Any]:
    port = d.ports["main"]
    await wait_until(lambda: active(d.metrics()) == 0, 30)
    before, fds_before, rss_before = d.metrics(), d.fds(), d.rss_mb()
    kinds = [MIXED_KINDS[i % len(MIXED_KINDS)] for i in range(s.mixed)]
    started = time.monotonic()
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in MIXED_KINDS}

    async def tagged(kind: str) -> str:
        outcome = await mixed_job(kind, port, clients)()
        outcomes[kind][outcome] += 1
        return outcome

    errors = await run_bounded([lambda k=kind: tagged(k) for kind in kinds], s.concurrency)
    seconds = time.monotonic() - started
    await wait_until(lambda: active(d.metrics()) == 0, 30)
    await wait_until(lambda: d.fds() <= fds_before, 10)
    after, fds_after, rss_after = d.metrics(), d.fds(), d.rss_mb()
    attempts = Counter(kinds)
    reasons = {reason: delta(before, after, "mtls_proxy_handshake_failures_total", listener="main", reason=reason)
               for reason in ("no_client_cert", "unknown_ca", "not_tls", "client_closed", "timeout", "other")}
    result = {
        "attempts": dict(attempts), "total": s.mixed, "seconds": seconds,
        "outcomes": {kind: dict(c) for kind, c in outcomes.items()},
        "client_errors": {k: v for k, v in errors.items() if k.startswith("error:")},
        "counted_connections": delta(before, after, "mtls_proxy_connections_total", listener="main"),
        "counted_success": delta(before, after, "mtls_proxy_handshakes_total", listener="main", result="success"),
        "counted_failure": delta(before, after, "mtls_proxy_handshakes_total", listener="main", result="failure"),
        "reasons": reasons,
        "fds_before": fds_before, "fds_after": fds_after, "rss_before_mb": rss_before, "rss_after_mb": rss_after,
    }
    log(f"mixed: {s.mixed} in {seconds:.0f}s; fds {fds_before} -> {fds_after}; counted "
        f"{result['counted_connections']}; outcomes {result['outcomes']}")
    return result


async def resetting_backend(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A backend that reads the first bytes of each connection, then resets it (SO_LINGER 0)."""

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(64)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def fault_client(port: int, ctx: ssl.SSLContext) -> str:
    """A good client facing a broken backend: "closed" when the proxy closes its connection, "answered" if not."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await open_tls(port, ctx)
            try:
                return "answered" if await ping(stream) else "closed"
            finally:
                await trio.aclose_forcefully(stream)
    except (trio.BrokenResourceError, ssl.SSLError, ConnectionError):
        return "closed"


async def phase_faults(d: Daemon, clients: Clients, s: Settings) -> dict[str, Any]:
    before, fds_before = d.metrics(), d.fds()
    result: dict[str, Any] = {"attempts": s.faults, "fds_before": fds_before}
    for name in ("down", "resets"):
        started = time.monotonic()
        job = functools.partial(fault_client, d.ports[name], clients.good)
        outcomes = await run_bounded([job] * s.faults, s.concurrency)
        result[name] = {"outcomes": dict(outcomes), "seconds": time.monotonic() - started}
    await wait_until(lambda: active(d.metrics()) == 0, 30)
    await wait_until(lambda: d.fds() <= fds_before, 10)
    after = d.metrics()
    for name in ("down", "resets"):
        result[name]["counted_connections"] = delta(before, after, "mtls_proxy_connections_total", listener=name)
        result[name]["counted_backend_failures"] = delta(
            before, after, "mtls_proxy_backend_connect_failures_total", listener=name)
    result["fds_after"] = d.fds()
    log(f"faults: {result}")
    return result


def write_pki_keeping_ca(directory: Path):
    """bench/run.py's PKI (ca.crt, server, client, and "other" from another CA), and its CA for the rotations."""
    from proxy.dev import pki

    write_pki(directory)
    ca = pki.make_ca("mtls-proxy reliability CA", organization="bench")
    (directory / "ca.crt").write_bytes((directory / "ca.crt").read_bytes() + ca.cert_pem())  # trusted as well
    return ca


def rotate_certificate(pki_dir: Path, ca, generation: int) -> None:
    """A new server certificate, written the way an operator's tool would: each file a temp file, renamed."""
    from proxy.dev import pki

    issued = pki.make_server_cert(ca, common_name=f"localhost-{generation}")
    # The daemon does not watch the files (reload.watch_interval 0): SIGHUP comes once both are in place.
    for name, data in (("server.key", issued.key_pem()), ("server.crt", issued.chain_pem())):
        tmp = pki_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(pki_dir / name)


async def phase_rotation(d: Daemon, clients: Clients, s: Settings) -> dict[str, Any]:
    before = d.metrics()
    outcomes: Counter[str] = Counter()
    rotations = 0

    async def client_loop() -> None:
        while True:
            try:
                outcomes[await good_client(d.ports["main"], clients.good)] += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
                outcomes[f"error:{type(exc).__name__}"] += 1

    with trio.move_on_after(s.soak):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(client_loop)
            while True:
                await trio.sleep(s.rotate_every)
                rotations += 1
                rotate_certificate(d.pki, d.ca, rotations)
                os.kill(d.pid, signal.SIGHUP)
    await trio.sleep(1)
    after = d.metrics()
    # The supervisor passes SIGHUP on to every worker, and each one reloads (and counts) on its own.
    result = {"seconds": s.soak, "rotations": rotations, "reloads_expected": rotations * d.workers,
              "outcomes": dict(outcomes),
              "client_errors": sum(v for k, v in outcomes.items() if k != "ok"),
              "reloads_success": delta(before, after, "mtls_proxy_reloads_total", result="success"),
              "reloads_failure": delta(before, after, "mtls_proxy_reloads_total", result="failure")}
    log(f"rotation: {result}")
    return result


PHASES = {"held": phase_held, "slowloris": phase_slowloris, "mixed": phase_mixed, "faults": phase_faults,
          "rotation": phase_rotation}


async def run_phases(d: Daemon, pki: Path, s: Settings, only: list[str]) -> dict[str, Any]:
    clients = Clients(pki)
    results: dict[str, Any] = {}
    for name, phase in PHASES.items():
        if name in only:
            log(f"phase {name}")
            results[name] = await phase(d, clients, s)
            results[name]["daemon_alive"] = d.alive()
    return results


# ---- the run, the checks and the report ----------------------------------------------------------------------


def invariants(results: dict[str, Any]) -> list[str]:
    """What must hold whatever the machine's speed: broken ones are listed (the exit code is then 1)."""
    broken = []
    for name, r in results.items():
        if not r.get("daemon_alive", True):
            broken.append(f"{name}: the daemon died")
    if "held" in results:
        r = results["held"]
        if r["held"] != r["target"] or r["errors"]:
            broken.append(f"held: {r['held']} of {r['target']} held, errors {r['error_kinds']}")
    if "slowloris" in results:
        r = results["slowloris"]
        for which in ("baseline", "attack"):
            if r[which]["errors"]:
                broken.append(f"slowloris: {r[which]['errors']} healthy clients failed ({which})")
    if "mixed" in results:
        r = results["mixed"]
        if r["fds_after"] > r["fds_before"]:
            broken.append(f"mixed: fds {r['fds_before']} -> {r['fds_after']}")
        if r["counted_connections"] != r["total"]:
            broken.append(f"mixed: {r['counted_connections']} connections counted for {r['total']} attempts")
        if r["counted_success"] != r["attempts"]["good"] or r["outcomes"]["good"].get("ok") != r["attempts"]["good"]:
            broken.append(f"mixed: good clients {r['outcomes']['good']}, {r['counted_success']} successes counted")
        if r["counted_success"] + r["counted_failure"] != r["total"]:
            broken.append(f"mixed: {r['counted_success']} + {r['counted_failure']} handshakes for {r['total']}")
        for kind in ("no_cert", "wrong_ca"):
            if r["outcomes"][kind].get("admitted"):
                broken.append(f"mixed: {r['outcomes'][kind]['admitted']} {kind} clients reached the backend")
    if "faults" in results:
        r = results["faults"]
        for name in ("down", "resets"):
            if r[name]["outcomes"].get("closed") != r["attempts"]:
                broken.append(f"faults {name}: {r[name]['outcomes']}")
            if r[name]["counted_connections"] != r["attempts"]:
                broken.append(f"faults {name}: {r[name]['counted_connections']} counted of {r['attempts']}")
        if r["down"]["counted_backend_failures"] != r["attempts"]:
            broken.append(f"faults down: {r['down']['counted_backend_failures']} backend failures counted")
        if r["fds_after"] > r["fds_before"]:
            broken.append(f"faults: fds {r['fds_before']} -> {r['fds_after']}")
    if "rotation" in results:
        r = results["rotation"]
        if r["client_errors"] or r["reloads_failure"] or r["reloads_success"] != r["reloads_expected"]:
            broken.append(f"rotation: {r}")
    return broken


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} MB"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def render(data: dict[str, Any]) -> str:
    r = data["results"]
    lines = ["# Reliability", "",
             "Generated by `bench/reliability.py` (see `bench/README.md`, \"Reliability\"); regenerate with the "
             "command below.", "",
             f"- date: {data['date']} (took {data['seconds'] / 60:.1f} min)",
             f"- command: `{data['command']}`",
             f"- code: {data['code']}",
             f"- daemon: `mtls-proxy run`, {data['workers']} worker(s), fd limit {data['nofile']} per process", ""]
    if data["workers"] > 1:
        lines += [f"The held connections need two fds each in the daemon, more than one process's limit allows, so "
                  f"it ran with {data['workers']} workers. RSS and fds are summed over its processes (supervisor, "
                  "admin process, workers); the RSS sum counts the pages they share once per process.", ""]
    rows = []
    if "held" in r:
        h = r["held"]
        rows.append(["held connections", f"{h['held']:,} of {h['target']:,} held", f"{h['errors']} errors",
                     f"RSS {_mb(h['rss_before_mb'])} → {_mb(h['rss_peak_mb'])} held → {_mb(h['rss_closed_mb'])} "
                     f"closed → {_mb(h['rss_settled_mb'])} {h['settle_seconds']:.0f} s later"])
    if "slowloris" in r:
        sl = r["slowloris"]
        rows.append([f"slowloris: {sl['silent']:,} silent connections",
                     f"p50 {_ms(sl['attack']['p50_ms'])}, p99 {_ms(sl['attack']['p99_ms'])} "
                     f"(baseline {_ms(sl['baseline']['p50_ms'])}, {_ms(sl['baseline']['p99_ms'])})",
                     f"{sl['baseline']['errors'] + sl['attack']['errors']} errors",
                     f"{sl['attack']['samples']} healthy clients"])
    if "mixed" in r:
        m = r["mixed"]
        rows.append([f"mixed outcomes: {m['total']:,} connections",
                     f"counted {m['counted_connections']:,}; {m['counted_success']:,} success, "
                     f"{m['counted_failure']:,} failure",
                     f"{m['outcomes']['good'].get('ok', 0):,} of {m['attempts']['good']:,} good clients served",
                     f"fds {m['fds_before']} → {m['fds_after']} (leaked {max(0, m['fds_after'] - m['fds_before'])}); "
                     f"RSS {_mb(m['rss_before_mb'])} → {_mb(m['rss_after_mb'])}"])
    if "faults" in r:
        f = r["faults"]
        rows.append([f"backend faults: {f['attempts']} each",
                     f"down: {f['down']['counted_backend_failures']} backend failures counted, "
                     f"{f['down']['outcomes'].get('closed', 0)} closed",
                     f"resets: {f['resets']['counted_connections']} counted, "
                     f"{f['resets']['outcomes'].get('closed', 0)} closed",
                     f"fds {f['fds_before']} → {f['fds_after']}"])
    if "rotation" in r:
        ro = r["rotation"]
        rows.append([f"rotation soak: {ro['seconds']:.0f} s",
                     f"{ro['rotations']} rotations: {ro['reloads_success']} of {ro['reloads_expected']} reloads ok "
                     f"(each worker reloads), {ro['reloads_failure']} failed",
                     f"{ro['client_errors']} client errors",
                     f"{ro['outcomes'].get('ok', 0):,} clients served"])
    lines += [table(["phase", "result", "errors", "resources"], rows, align="llll"), ""]
    if "mixed" in r:
        m = r["mixed"]
        lines += ["Mixed outcomes, by kind: attempts, what the client saw, and the failure reason counted in /metrics.",
                  "", table(["kind", "attempts", "client saw", "counted reason"],
                            [[kind, f"{m['attempts'][kind]:,}", ", ".join(f"{k} {v:,}" for k, v in
                                                                            m["outcomes"][kind].items()),
                              "success" if kind == "good" else
                              f"{EXPECTED_REASON[kind]} {m['reasons'][EXPECTED_REASON[kind]]:,}"]
                             for kind in MIXED_KINDS], align="lrll"), ""]
    broken = data["broken"]
    lines += ["Invariants: " + ("all hold." if not broken else "BROKEN: " + "; ".join(broken)), ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, s: Settings, workdir: Path) -> dict[str, Any]:
    nofile = raise_nofile()
    workers = args.workers or workers_for(s.held if "held" in args.only else 0, nofile)
    pki = workdir / "pki"
    ca = write_pki_keeping_ca(pki)
    backend = Backend(cpu=0)
    try:
        async with trio.open_nursery() as nursery:
            reset_port = await nursery.start(resetting_backend)
            daemon = await trio.to_thread.run_sync(lambda: Daemon(
                workdir, pki, ca, backend.port, reset_port, workers=workers, handshake_timeout=s.handshake_timeout))
            try:
                results = await run_phases(daemon, pki, s, args.only)
            finally:
                daemon.stop()
            nursery.cancel_scope.cancel()
    finally:
        backend.stop()
    return {"results": results, "workers": workers, "nofile": nofile, "settings": asdict(s)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reliability of mtls-proxy under many, hostile and broken "
                                                 "connections (loopback only, bounded).")
    parser.add_argument("--quick", action="store_true", help="small counts, about 40 s (the test suite runs it)")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases (default: {','.join(PHASES)})")
    parser.add_argument("--held", type=int, help="connections to hold")
    parser.add_argument("--settle", type=float, help="seconds to watch RSS after the held connections close")
    parser.add_argument("--workers", type=int, help="daemon worker processes (default: as the fd limit needs)")
    parser.add_argument("--results", type=Path, help="write the Markdown report here")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, PKI, daemon log)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write --results from an earlier --json; no run")
    args = parser.parse_args(argv)
    args.only = [p for p in args.only.split(",") if p]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; known: {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        if not args.results:
            sys.exit("--render needs --results")
        args.results.write_text(render(json.loads(args.render.read_text())))
        return 0
    s = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in (("held", args.held), ("settle", args.settle)) if v is not None}
    s = Settings(**{**asdict(s), **overrides})
    workdir = Path(tempfile.mkdtemp(prefix="mtls-reliability-"))
    started = time.monotonic()
    try:
        data = trio.run(main_async, args, s, workdir)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    data.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=time.monotonic() - started,
                command="python bench/reliability.py " + " ".join(sys.argv[1:] if argv is None else argv),
                code=code_version())
    data["broken"] = invariants(data["results"])
    text = json.dumps(data, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.results:
        args.results.write_text(render(data))
    for problem in data["broken"]:
        log(f"BROKEN: {problem}")
    return 1 if data["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
