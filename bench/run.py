#!/usr/bin/env python3
"""Side-by-side benchmark of mtls-proxy against nginx, HAProxy, stunnel and Traefik as mTLS-terminating TCP proxies
(and against nginx and Traefik as HTTP identity-mode reverse proxies, over HTTP/1.1 and HTTP/2).

    python bench/run.py                 # full run (about 19 minutes on a quiet machine), prints the tables
    python bench/run.py --quick         # smoke run (30 to 45 seconds), what the test suite runs
    python bench/run.py --results bench/RESULTS.md --json /tmp/bench.json

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `python bench/run.py` from a checkout: find `proxy` without installing it
    sys.path.insert(0, str(REPO))

import clients  # noqa: E402
import loads  # noqa: E402
import memprof  # noqa: E402
import procfs  # noqa: E402
import pyspy  # noqa: E402
import report  # noqa: E402
from peers import KINDS, START_TIMEOUT, Peer, PeerError, parse_spec  # noqa: E402

# The last row is issue 5's worker-processes comparison: two workers on both cores, handshakes only (see the
# "Worker processes" section of the report).
WORKERS_ROW = "mtls-proxy:workers=2:cpus=0-1:tests=full+resumed"
DEFAULT_PEERS = f"nginx,haproxy,stunnel,traefik,mtls-proxy,{WORKERS_ROW}"
TESTS = ("full", "resumed", "bulk_up", "bulk_down", "bulk2_up", "bulk2_down", "wrk", "wrk_http", "h2")
# What an anonymous client forges in the HTTP identity-mode checks: every identity header the peer sets (see
# forged_headers), each of which the peer must replace or remove.
FORGED_XFF = {"x-forwarded-for": "192.0.2.66"}
FORGED_VERIFY = {"X-Client-Verify": "SUCCESS", "X-Client-Subject": "CN=forged"}
# The shape of a verified client's certificate header, by header: (what it must contain, as the report says it).
CERT_HEADER_SHAPE = {
    "X-Forwarded-Client-Cert": ("Hash=", "Hash=...;Subject=..."),
    "X-Forwarded-Tls-Client-Cert-Info": ('Subject="', 'Subject="..." (URL-encoded)'),
}


@dataclass(frozen=True)
class Settings:
    reps: int
    hs_seconds: int
    hs_clients: int
    bulk_bytes: int
    wrk_seconds: int  # also the length of the h2load run
    wrk_connections: int
    h2_connections: int  # h2load -c
    h2_streams: int  # h2load -m: concurrent streams on each connection
    idle_conns: int
    memprof_conns: int  # idle connections for the memory breakdown (tracemalloc); 0 = no breakdown
    retries: int
    foreign_limit: float  # share of one core
    quiet_wait: float  # seconds to wait for the machine to calm down before a run
    patience: float  # seconds, in all, that waiting for quiet and repeating disturbed runs may add to the run
    profile_seconds: int
    settle: float  # seconds to let a peer settle before reading its memory
    latency_conns: int  # sequential connections for the first-response latency
    paced_rate: float  # requests per second of the fixed-rate latency run (far below any peer's saturation)
    paced_seconds: float
    backend_ceiling: bool
    proxy_cpu: int
    load_cpu: int


FULL = Settings(
    reps=3, hs_seconds=10, hs_clients=4, bulk_bytes=1024 * 2**20, wrk_seconds=10, wrk_connections=32,
    h2_connections=8, h2_streams=32, idle_conns=5000, memprof_conns=2000, retries=2, foreign_limit=0.05,
    quiet_wait=30.0, patience=1200.0, profile_seconds=10, settle=1.0, latency_conns=21, backend_ceiling=True,
    proxy_cpu=1, load_cpu=0, paced_rate=1000.0, paced_seconds=5.0,
)
QUICK = replace(
    FULL, reps=1, hs_seconds=1, bulk_bytes=8 * 2**20, wrk_seconds=1, wrk_connections=16, idle_conns=16,
    memprof_conns=0, retries=0, quiet_wait=0.0, patience=0.0, profile_seconds=0, settle=0.2, latency_conns=3,
    backend_ceiling=False, paced_rate=200.0, paced_seconds=0.5,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- setup ------------------------------------------------------------------------------------------------------


def forged_headers(peer: Peer) -> dict[str, str]:
    """The identity headers an anonymous client forges against this peer: the ones it sets."""
    forged = {**FORGED_XFF, peer.cert_header: 'Hash=forged;Subject="CN=forged"'}
    return {**FORGED_VERIFY, **forged} if peer.verify_headers else forged


def expect_header(problems: list[str], label: str, headers: dict[str, list[str]], name: str,
                  test: Callable[[list[str]], bool], want: str) -> None:
    """Add a problem unless the backend received header ``name`` with values that pass ``test``."""
    got = headers.get(name.lower())
    if got is None or not test(got):
        problems.append(f"{label}: {name} should be {want}, the backend got {got}")


def verified_headers(peer: Peer, label: str, headers: dict[str, list[str]], problems: list[str]) -> None:
    """What the backend must receive for a client with the good certificate that forged every identity header:
    one copy of each header the peer sets, naming the client (the forged ones replaced)."""
    marker, shape = CERT_HEADER_SHAPE[peer.cert_header]

    def names_the_client(values: list[str]) -> bool:
        # One copy (the forged one replaced), naming the client; Traefik's value is URL-encoded.
        return len(values) == 1 and any(marker in text and "CN=bench-client" in text
                                        for text in (values[0], urllib.parse.unquote_plus(values[0])))

    if peer.verify_headers:
        expect_header(problems, label, headers, "X-Client-Verify", lambda v: v == ["SUCCESS"], "SUCCESS")
        expect_header(problems, label, headers, "X-Client-Subject",
                      lambda v: len(v) == 1 and "CN=bench-client" in v[0], "the client's subject")
    expect_header(problems, label, headers, peer.cert_header, names_the_client, shape)
    expect_header(problems, label, headers, "X-Forwarded-For", lambda v: v == ["127.0.0.1"], "127.0.0.1")
    expect_header(problems, label, headers, "X-Forwarded-Proto", lambda v: v == ["https"], "https")


def needs(kind: type[Peer]) -> list[str]:
    """What a peer still needs installed: its apt packages, then its PyPI packages."""
    return kind.missing() + kind.missing_pip()


def h2_tools_missing() -> list[str]:
    """The Debian packages the HTTP/2 row still needs: h2load and nghttp (nghttp2-client), and a C compiler for the
    library that gives h2load the client certificate (bench/h2load_cert.c)."""
    need = [] if shutil.which("h2load") and shutil.which("nghttp") else ["nghttp2-client"]
    return need + ([] if shutil.which("cc") or shutil.which("gcc") else ["gcc", "libc6-dev"])


def install_missing(kinds: list[type[Peer]], need_wrk: bool, allowed: bool, need_h2: bool = False) -> list[str]:
    """apt-get install (as root) and pip install what the chosen peers need; return what is still missing. The
    HTTP/2 row's tools are installed too when ``need_h2``, but not returned: without them that row is left out
    (see ``Bench.setup``), the rest of the run goes on."""
    wheels = sorted({pkg for kind in kinds for pkg in kind.missing_pip()})
    if wheels and allowed:
        log(f"installing {' '.join(wheels)} with pip")
        cmd = [sys.executable, "-m", "pip", "install", "-q", *wheels]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=900)
    packages = sorted({pkg for kind in kinds for pkg in kind.missing()}
                      | ({"wrk"} if need_wrk and not shutil.which("wrk") else set())
                      | ({"openssl"} if not shutil.which("openssl") else set())
                      | (set(h2_tools_missing()) if need_h2 else set()))
    if packages and allowed:
        if os.geteuid() != 0:
            log(f"not root, cannot install {' '.join(packages)}")
        else:
            log(f"installing {' '.join(packages)} with apt-get")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, timeout=900).returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=900)
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, timeout=900)
    return sorted({pkg for kind in kinds for pkg in needs(kind)}
                  | ({"wrk"} if need_wrk and not shutil.which("wrk") else set()))


def write_pki(directory: Path) -> Path:
    """ECDSA P-256 throughout: a CA, the server certificate (localhost, 127.0.0.1), the client certificate, and a
    client certificate from another CA that every peer must refuse."""
    from proxy.dev import pki

    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("mtls-proxy bench CA", organization="bench")
    other = pki.make_ca("some other CA", organization="elsewhere")
    files = {
        "ca.crt": ca.cert_pem(),
        "server": pki.make_server_cert(ca),
        "client": pki.make_client_cert(ca, common_name="bench-client", organization="bench"),
        "other": pki.make_client_cert(other, common_name="bench-intruder"),
    }
    for name, item in files.items():
        if isinstance(item, bytes):
            (directory / name).write_bytes(item)
            continue
        (directory / f"{name}.crt").write_bytes(item.chain_pem())
        key = directory / f"{name}.key"
        key.write_bytes(item.key_pem())
        key.chmod(0o600)
    return directory


class Backend:
    def __init__(self, cpu: int) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), sys.executable, str(HERE / "backend.py")],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the backend did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, int]:
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"STATS\n")
            data = clients.read_line(sock, 4096)
        return json.loads(data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


# ---- the runner -------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings, specs: list[str], workdir: Path, *, use_wrk: bool, profile: bool,
                 use_h2: bool = False) -> None:
        self.s = settings
        self.specs = specs
        self.workdir = workdir
        self.use_wrk = use_wrk
        self.use_h2 = use_h2
        self.h2_preload: Path | None = None  # the library that gives h2load the client certificate
        self.profile = profile
        self.peers: dict[str, Peer] = {}
        self.waited = 0.0  # seconds spent waiting for quiet and on repeated attempts
        self.data: dict[str, Any] = {"settings": asdict(settings), "peers": {}}

    # ---- lifecycle ----

    def setup(self) -> None:
        self.pki = write_pki(self.workdir / "pki")
        if self.use_h2:
            try:
                self.h2_preload = loads.h2load_preload(self.workdir)
            except loads.LoadError as exc:
                self.use_h2 = False
                self.data["h2_unavailable"] = str(exc)
                log(f"no HTTP/2 row: {exc}")
        self.backend = Backend(self.s.load_cpu)
        log(f"backend on port {self.backend.port} (pid {self.backend.pid}, CPU {self.s.load_cpu})")
        launched = []
        for spec in self.specs:
            entry = self.data["peers"][spec] = {"runs": {}, "summary": {}, "memory": {}}
            try:
                kind, options = parse_spec(spec)
                entry["workers"] = int(options.get("workers", "1"))
                peer = kind(spec=spec, options=options, workdir=self.workdir / spec.replace(":", "_"),
                            pki=self.pki, backend_port=self.backend.port, proxy_cpus=str(self.s.proxy_cpu))
                peer.launch()
            except (PeerError, OSError, ValueError) as exc:
                entry["error"] = str(exc)
                log(f"{spec}: cannot start: {exc}")
                continue
            self.peers[spec] = peer  # from here on, teardown stops it
            launched.append(peer)
            try:
                entry["version"] = peer.version()  # runs while the peers start
            except (OSError, subprocess.SubprocessError) as exc:
                entry["version"] = f"? ({exc})"
        deadline = time.monotonic() + START_TIMEOUT
        for peer in launched:
            try:
                peer.wait_ready(deadline)
            except PeerError as exc:
                self.data["peers"][peer.spec]["error"] = str(exc)
                log(f"{peer.spec}: cannot start: {exc}")
                peer.stop()
                del self.peers[peer.spec]
                continue
            self.data["peers"][peer.spec].update(http=peer.http, cpus=peer.cpus,
                                                 tests=[t for t in (*TESTS, "idle") if peer.runs(t)])
            log(f"{peer.spec}: {self.data['peers'][peer.spec]['version']}, pid {peer.pid}, ports "
                f"{peer.require_port} (require) {peer.optional_port} (optional)"
                + (f" {peer.http_require_port} (HTTP, require) {peer.http_optional_port} (HTTP, optional)"
                   if peer.http else "") + (f" {peer.h2_port} (HTTP/2, require)" if peer.h2 else "")
                + f", CPUs {peer.cpus}")

    def paced_backend(self) -> None:
        """The fixed-rate latency of the backend alone, the base of what each peer adds: the lower of two runs for
        each quantile, so that a moment of foreign load does not make the peers look faster than they are."""
        runs = [clients.paced(self.backend.port, None, self.s.paced_rate, self.s.paced_seconds) for _ in range(2)]
        paced = self.data["paced_backend"] = {**runs[0], "p50_us": min(r["p50_us"] for r in runs),
                                              "p99_us": min(r["p99_us"] for r in runs)}
        log(f"backend alone at {self.s.paced_rate:.0f} requests/s: p50 {paced['p50_us']:.0f} µs, "
            f"p99 {paced['p99_us']:.0f} µs (the lower of two runs each)")

    def teardown(self) -> None:
        for peer in self.peers.values():
            try:
                peer.stop()
            except Exception as exc:
                log(f"{peer.spec}: stop failed: {exc}")
        if hasattr(self, "backend"):
            self.backend.stop()

    # ---- checks ----

    def check(self, peer: Peer) -> bool:
        """Refuse no certificate and a foreign CA, admit the good certificate; the optional port admits no
        certificate. Refused clients must not have reached the backend at all: no connection, or, from a peer that
        dials the backend before the handshake is done (Traefik), no byte."""
        before = self.backend.stats()
        no_cert = clients.probe(peer.require_port, self.pki, None)
        other = clients.probe(peer.require_port, self.pki, "other")
        other_opt = clients.probe(peer.optional_port, self.pki, "other")
        leaked, silent = self.refused_at_backend(before)
        good = clients.probe(peer.require_port, self.pki, "client")
        anon = clients.probe(peer.optional_port, self.pki, None)

        def res(r: tuple[bool, str]) -> dict[str, Any]:
            return {"reached": r[0], "detail": r[1]}

        checks = {
            "no_cert": res(no_cert), "other_ca": res(other), "other_ca_optional_port": res(other_opt),
            "good": res(good), "optional_no_cert": res(anon), "backend_connections_from_refused": leaked,
            "silent_backend_connections_from_refused": silent,
        }
        allowed = silent if peer.dials_before_handshake else 0
        checks["ok"] = (not no_cert[0] and not other[0] and not other_opt[0] and good[0] and anon[0]
                        and leaked == allowed)
        if peer.http:
            checks["http"] = self.check_http(peer)
            checks["ok"] = checks["ok"] and checks["http"]["ok"]
        if peer.h2 and self.use_h2:
            checks["h2"] = self.check_h2(peer)
            checks["ok"] = checks["ok"] and checks["h2"]["ok"]
        self.data["peers"][peer.spec]["checks"] = checks
        if checks["ok"]:
            count = self.s.latency_conns
            latency = {
                "count": count,
                "nodelay": clients.first_response(peer.require_port, self.pki, count, nodelay=True),
                "no_nodelay": clients.first_response(peer.require_port, self.pki, count, nodelay=False),
                "paced": clients.paced(peer.require_port, self.pki, self.s.paced_rate, self.s.paced_seconds),
            }
            self.data["peers"][peer.spec]["latency"] = latency
            log(f"{peer.spec}: first response (median of {count}): {latency['nodelay']['first_response_ms']:.1f} ms "
                f"with TCP_NODELAY, {latency['no_nodelay']['first_response_ms']:.1f} ms without; at "
                f"{self.s.paced_rate:.0f} requests/s: p50 {latency['paced']['p50_us']:.0f} µs, "
                f"p99 {latency['paced']['p99_us']:.0f} µs")
        verdict = "ok" if checks["ok"] else "MISCONFIGURED"
        log(f"{peer.spec}: checks {verdict}: no cert -> {no_cert[1]}; other CA -> {other[1]}; good -> {good[1]}; "
            f"optional/no cert -> {anon[1]}; refused clients at the backend: {leaked} ({silent} without a byte)")
        if peer.http:
            h = checks["http"]
            log(f"{peer.spec}: HTTP identity-mode checks {'ok' if h['ok'] else 'FAILED'}: no cert -> "
                f"{h['no_cert']['detail']}; other CA -> {h['other_ca']['detail']}; requests from refused clients at "
                f"the backend: {h['backend_requests_from_refused']}; good cert -> {h['good']['headers']}; "
                f"optional/no cert, forged headers -> {h['optional_no_cert']['headers']}"
                + (f"; problems: {'; '.join(h['problems'])}" if h["problems"] else ""))
        if "h2" in checks:
            h = checks["h2"]
            log(f"{peer.spec}: HTTP/2 checks {'ok' if h['ok'] else 'FAILED'}: no cert -> {h['no_cert']['detail']}; "
                f"other CA -> {h['other_ca']['detail']}; requests from refused clients at the backend: "
                f"{h['backend_requests_from_refused']}; good cert, forged headers -> {h['good']['headers']}; "
                f"h2load with the certificate -> {h['h2load']}"
                + (f"; problems: {'; '.join(h['problems'])}" if h["problems"] else ""))
        return checks["ok"]

    def refused_at_backend(self, before: dict[str, int]) -> tuple[int, int]:
        """(backend connections opened since ``before``, those of them closed without a byte), less the STATS
        connections that ask. A silent connection is counted when the backend reads its EOF, a moment after the
        peer refused the client: wait for the count to catch up, at most 2 s."""
        deadline = time.monotonic() + 2.0
        asked = 0
        while True:
            after = self.backend.stats()
            asked += 1
            opened = after["connections"] - before["connections"] - asked
            silent = after["silent_connections"] - before["silent_connections"]
            if opened == silent or time.monotonic() > deadline:
                return opened, silent
            time.sleep(0.05)

    def check_http(self, peer: Peer) -> dict[str, Any]:
        """The HTTP identity-mode listeners: the require port refuses no certificate and a foreign CA (no request
        reaches the backend); a good certificate's request arrives with the peer's certificate header (XFCC;
        Traefik's X-Forwarded-Tls-Client-Cert-Info), X-Client-Subject and X-Client-Verify: SUCCESS (peers that
        send them), X-Forwarded-For and -Proto; an anonymous request on the optional port arrives with
        X-Client-Verify: NONE and no certificate header, and the copies of those headers the client forged are
        gone."""
        pki = self.pki
        before = self.backend.stats()["http_requests"]
        no_cert = clients.http_probe(peer.http_require_port, pki, None)
        other = clients.http_probe(peer.http_require_port, pki, "other")
        other_opt = clients.http_probe(peer.http_optional_port, pki, "other")
        leaked = self.backend.stats()["http_requests"] - before
        forged = forged_headers(peer)
        good = clients.http_probe(peer.http_require_port, pki, "client", forged)
        anon = clients.http_probe(peer.http_optional_port, pki, None, forged)
        problems = []
        for label, result in (("no cert", no_cert), ("other CA", other), ("other CA, optional port", other_opt)):
            if result[0]:
                problems.append(f"{label}: admitted")
        if leaked:
            problems.append(f"{leaked} request(s) of refused clients reached the backend")

        g, a = good[2], anon[2]
        if not good[0]:
            problems.append(f"good cert: {good[1]}")
        else:
            verified_headers(peer, "good cert", g, problems)
        if not anon[0]:
            problems.append(f"optional port, no cert: {anon[1]}")
        else:
            if peer.verify_headers:
                expect_header(problems, "no cert", a, "X-Client-Verify", lambda v: v == ["NONE"], "NONE")
            expect_header(problems, "no cert", a, "X-Forwarded-For", lambda v: v == ["127.0.0.1"], "127.0.0.1")
            expect_header(problems, "no cert", a, "X-Forwarded-Proto", lambda v: v == ["https"], "https")
            absent = [peer.cert_header.lower()] + (["x-client-subject"] if peer.verify_headers else [])
            for name in absent:
                if name in a:
                    problems.append(f"no cert: the backend got {name}: {a[name]} (forged, or an empty identity)")

        def res(r: tuple[bool, str, dict[str, list[str]]]) -> dict[str, Any]:
            return {"reached": r[0], "detail": r[1]}

        identity = (peer.cert_header.lower(), "x-client-subject", "x-client-verify", "x-forwarded-for",
                    "x-forwarded-proto")
        return {
            "no_cert": res(no_cert), "other_ca": res(other), "other_ca_optional_port": res(other_opt),
            "backend_requests_from_refused": leaked,
            "good": {**res(good), "headers": {k: v for k, v in g.items() if k in identity}},
            "optional_no_cert": {**res(anon), "headers": {k: v for k, v in a.items() if k in identity}},
            "problems": problems, "ok": not problems, "cert_header": peer.cert_header,
        }

    def check_h2(self, peer: Peer) -> dict[str, Any]:
        """The HTTP/2 listener (client certificate required), with nghttp, which speaks only h2: no certificate and
        a foreign CA are refused and none of their requests reaches the backend; the good certificate's request,
        with every identity header forged, arrives with the peer's own (as in :meth:`check_http`). Then h2load
        itself: one request without the library that gives it the certificate must fail, one with it must get
        through. So the measured h2load presents the certificate, and nothing else lets it in."""
        pki = self.pki
        before = self.backend.stats()["http_requests"]
        no_cert = clients.h2_probe(peer.h2_port, pki, None)
        other = clients.h2_probe(peer.h2_port, pki, "other")
        leaked = self.backend.stats()["http_requests"] - before
        good = clients.h2_probe(peer.h2_port, pki, "client", forged_headers(peer))
        problems = [f"{label}: admitted" for label, result in (("no cert", no_cert), ("other CA", other))
                    if result[0]]
        if leaked:
            problems.append(f"{leaked} request(s) of refused clients reached the backend")
        if good[0]:
            verified_headers(peer, "good cert", good[2], problems)
        else:
            problems.append(f"good cert: {good[1]}")
        try:
            loads.h2load(peer.h2_port, pki, None, connections=1, streams=1, requests=1)
            problems.append("h2load without the client certificate: admitted")
        except loads.LoadError:
            pass  # refused, as it must be
        try:
            result = loads.h2load(peer.h2_port, pki, self.h2_preload, connections=1, streams=1, requests=1)
            h2load = f"{result.requests} request succeeded over {result.protocol} (refused without the certificate)"
        except loads.LoadError as exc:
            h2load = f"failed: {exc}"
            problems.append(f"h2load with the client certificate: {exc}")
        identity = (peer.cert_header.lower(), "x-client-subject", "x-client-verify", "x-forwarded-for",
                    "x-forwarded-proto")

        def res(r: tuple[bool, str, dict[str, list[str]]]) -> dict[str, Any]:
            return {"reached": r[0], "detail": r[1]}

        return {
            "no_cert": res(no_cert), "other_ca": res(other), "backend_requests_from_refused": leaked,
            "good": {**res(good), "headers": {k: v for k, v in good[2].items() if k in identity}},
            "h2load": h2load, "problems": problems, "ok": not problems, "cert_header": peer.cert_header,
        }

    # ---- measuring ----

    def window(self, peer: Peer | None) -> procfs.Window:
        watch = {"backend": self.backend.pid}
        if peer is not None:
            watch["proxy"] = peer.pid
        return procfs.Window(ours=[self.backend.pid, *(p.pid for p in self.peers.values())], watch=watch,
                             cpus=(self.s.proxy_cpu, self.s.load_cpu))

    def patience_left(self) -> float:
        return self.s.patience - self.waited

    def wait_quiet(self) -> None:
        """Before a run: wait (bounded by ``quiet_wait`` and by what is left of ``patience``) until the rest of
        the machine is quiet."""
        started = time.monotonic()
        deadline = started + min(self.s.quiet_wait, self.patience_left())
        try:
            while time.monotonic() < deadline:
                w = self.window(None).start()
                time.sleep(0.5)
                acct = w.stop()
                share = acct["foreign"] / acct["elapsed"]
                if share <= self.s.foreign_limit:
                    return
                if time.monotonic() >= deadline:
                    log(f"machine still busy ({share:.0%} of a core foreign: {acct['foreign_top'][:3]}); "
                        f"measuring anyway")
                    return
                time.sleep(0.5)
        finally:
            self.waited += time.monotonic() - started

    def measure(self, peer: Peer, test: str) -> dict[str, Any]:
        attempts: list[dict[str, Any]] = []
        for attempt in range(1 + self.s.retries):
            if attempt and self.patience_left() <= 0:
                log(f"{peer.spec} {test}: no patience left for another attempt; keeping the disturbed run")
                break
            self.wait_quiet()
            attempt_started = time.monotonic()
            stats0 = self.backend.stats() if test in ("wrk_http", "h2") else None
            w = self.window(peer).start()
            try:
                result = self.load(peer, test)
            except loads.LoadError as exc:
                w.stop()
                log(f"{peer.spec} {test}: FAILED: {exc}")
                return {"ok": False, "error": str(exc), "attempts": attempts}
            acct = w.stop()
            if attempt:
                self.waited += time.monotonic() - attempt_started
            run = self.units(test, result, acct)
            if stats0 is not None:
                self.identity_delivery(run, stats0, self.backend.stats(), *self.identity_counter(peer, test))
                if not run["ok"]:
                    log(f"{peer.spec} {test}: FAILED: {run['error']}")
                    return {**run, "attempts": attempts}
            disturbed = run["foreign_share"] > self.s.foreign_limit
            run["disturbed"] = disturbed
            attempts.append(run)
            log(f"{peer.spec} {test}: {run['summary']}  [proxy {run['proxy_busy']:.0%}, load core "
                f"{run['load_core_busy']:.0%}, backend {run['backend_busy']:.0%}, foreign {run['foreign_share']:.1%}"
                + (f" DISTURBED by {acct['foreign_top'][:3]}" if disturbed else "") + "]")
            if not disturbed:
                break
        kept = min(attempts, key=lambda r: r["foreign_share"])
        return {**kept, "kept": True, "attempts": [{k: v for k, v in a.items() if k != "attempts"}
                                                    for a in attempts]}

    def load(self, peer: Peer, test: str) -> Any:
        s = self.s
        if test in ("full", "resumed"):
            return loads.s_time(peer.require_port, self.pki, reuse=test == "resumed", clients=s.hs_clients,
                                seconds=s.hs_seconds)
        if test in ("bulk_up", "bulk_down"):
            return loads.bulk(peer.require_port, self.pki, test.removeprefix("bulk_"), s.bulk_bytes)
        if test in ("bulk2_up", "bulk2_down"):
            return loads.bulk_s_client(peer.require_port, self.pki, test.removeprefix("bulk2_"), s.bulk_bytes)
        if test in ("wrk", "wrk_http"):
            port = peer.optional_port if test == "wrk" else peer.http_optional_port
            return loads.wrk(f"https://127.0.0.1:{port}/", connections=s.wrk_connections, seconds=s.wrk_seconds)
        if test == "h2":
            return loads.h2load(peer.h2_port, self.pki, self.h2_preload, connections=s.h2_connections,
                                streams=s.h2_streams, seconds=s.wrk_seconds)
        raise ValueError(test)

    @staticmethod
    def identity_counter(peer: Peer, test: str) -> tuple[str, str]:
        """(the backend's counter, the header it counts) that every request of an HTTP identity-mode run must reach:
        for wrk, which has no certificate, X-Client-Verify (NONE), or X-Forwarded-For from a peer without it
        (Traefik gives an anonymous request no other identity header); for h2load, which presents the client
        certificate, the peer's certificate header (XFCC, or Traefik's X-Forwarded-Tls-Client-Cert-Info)."""
        if test == "h2":
            return "cert_requests", peer.cert_header
        return ("verify_requests", "X-Client-Verify") if peer.verify_headers else (
            "identity_requests", "X-Forwarded-For")

    @staticmethod
    def identity_delivery(run: dict[str, Any], before: dict[str, int], after: dict[str, int], counter: str,
                          header: str) -> None:
        """After an HTTP identity-mode run: did every request reach the backend with the identity header that
        ``counter`` counts (see identity_counter), and how many backend connections did the proxy open for them
        (nginx and Traefik pool them; mtls-proxy opens one per client connection over HTTP/1.1, one per stream
        over HTTP/2)?"""
        requests = after["http_requests"] - before["http_requests"]
        with_verify = after[counter] - before[counter]
        run.update(backend_requests=requests, backend_requests_with_identity=with_verify, identity_header=header,
                   backend_xfcc_requests=after["xfcc_requests"] - before["xfcc_requests"],
                   # less the second STATS connection itself
                   backend_connections=after["connections"] - before["connections"] - 1,
                   identity_share=with_verify / requests if requests else 0.0)
        if requests < 0.99 * run["count"] or run["identity_share"] < 0.999:
            run["ok"] = False
            run["error"] = (f"the client counted {run['count']} requests; {requests} reached the backend, "
                            f"{with_verify} of them with {header}: the identity headers were not added to every "
                            "request")

    def units(self, test: str, result: Any, acct: dict[str, Any]) -> dict[str, Any]:
        proxy_cpu = acct["cpu"]["proxy"]
        elapsed = acct["elapsed"]
        run: dict[str, Any] = {
            "ok": True,
            "elapsed": elapsed,
            "proxy_cpu_s": proxy_cpu,
            "proxy_busy": proxy_cpu / elapsed,
            "backend_busy": acct["cpu"]["backend"] / elapsed,
            "load_core_busy": acct["cpu_util"].get(self.s.load_cpu, 0.0),
            "proxy_core_busy": acct["cpu_util"].get(self.s.proxy_cpu, 0.0),
            "proxy_core_softirq_s": acct["softirq"].get(self.s.proxy_cpu, 0.0),
            "foreign_share": acct["foreign"] / elapsed,
            "per_process_cpu_s": acct["per_process"]["proxy"],
            "foreign_top": acct["foreign_top"],
            "kernel_s": acct["kernel"],
        }
        # cpu: the process tree's CPU per unit (the headline). cpu_si: the same plus the softirq time on the
        # proxy's core, the kernel network work the proxy caused that no process is charged for.
        if test in ("full", "resumed"):
            count, per_unit, rate = result.connections, result.connections / 1e3, result.rate
            run["reused"] = result.reused / result.connections
        elif test.startswith("bulk"):
            count, per_unit, rate = result["bytes"], result["bytes"] / 1e9, result["mb_per_s"]
        elif test == "h2":
            count, per_unit, rate = result.requests, result.requests / 1e6, result.rate
            run.update(mean=result.mean_us, max=result.max_us, errors=result.errors, protocol=result.protocol,
                       connections=self.s.h2_connections, streams=self.s.h2_streams)
        else:
            count, per_unit, rate = result.requests, result.requests / 1e6, result.rate
            run.update(p50=result.p50_us, p99=result.p99_us, errors=result.errors)
        run.update(count=count, rate=rate, cpu=proxy_cpu / per_unit,
                   cpu_si=(proxy_cpu + run["proxy_core_softirq_s"]) / per_unit)
        if test in ("full", "resumed"):
            run["summary"] = (f"{rate:.0f} hs/s, {run['cpu']:.3f} CPU-ms/hs"
                              + (f", {run['reused']:.0%} reused" if test == "resumed" else ""))
        elif test.startswith("bulk"):
            run["summary"] = f"{rate:.0f} MB/s, {run['cpu']:.3f} CPU-s/GB"
        elif test == "h2":
            run["summary"] = (f"{rate:.0f} req/s, mean {result.mean_us:.0f} µs per request, {run['cpu']:.1f} CPU-µs/req"
                              + (f", {result.errors}" if result.errors else ""))
        else:  # wrk, wrk_http
            run["summary"] = (f"{rate:.0f} req/s, p50 {result.p50_us:.0f} µs, p99 {result.p99_us:.0f} µs, "
                              f"{run['cpu']:.1f} CPU-µs/req" + (f", {result.errors}" if result.errors else ""))
        return run

    def backend_ceiling(self) -> None:
        """wrk straight at the backend (no TLS): how many requests/s it can answer, and at what CPU."""
        w = self.window(None).start()
        try:
            result = loads.wrk(f"http://127.0.0.1:{self.backend.port}/", connections=self.s.wrk_connections,
                               seconds=max(1, self.s.wrk_seconds // 2))
        except loads.LoadError as exc:
            log(f"backend ceiling: {exc}")
            return
        acct = w.stop()
        backend = acct["cpu"]["backend"]
        self.data["backend_ceiling"] = {"rate": result.rate, "backend_busy": backend / acct["elapsed"],
                                        "cpu_us": backend / result.requests * 1e6}
        log(f"backend alone: {result.rate:.0f} req/s, backend at {backend / acct['elapsed']:.0%} of a core")

    def wait_for_ports(self, needed: int) -> None:
        """Each idle-connection test leaves 2 × N local ports in TIME_WAIT for 60 s (client → proxy and proxy →
        backend); four of them in a row would exhaust the 28,000 ephemeral ports. Wait (at most 70 s) for the
        previous test's ports to come back."""
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        deadline = time.monotonic() + 70
        while procfs.time_wait_sockets() + 2 * needed > (high - low) * 0.8 and time.monotonic() < deadline:
            time.sleep(2)

    def memory_idle_conns(self, peer: Peer) -> None:
        mem = self.data["peers"][peer.spec]["memory"]
        count = self.s.idle_conns
        self.wait_for_ports(count)
        before = procfs.tree_kb(peer.pid, "VmRSS")
        for attempt in (1, 2):
            try:
                with loads.IdleClients(peer.require_port, self.pki, count):
                    time.sleep(self.s.settle)  # let lazily allocated buffers settle
                    after = procfs.tree_kb(peer.pid, "VmRSS")
                    threads = sum(procfs.threads(pid) for pid in procfs.descendants(peer.pid))
                break
            except loads.LoadError as exc:
                log(f"{peer.spec}: idle connections, attempt {attempt}: {exc}")
                if attempt == 2:
                    mem["idle_error"] = str(exc)
                    return
                mem["idle_first_attempt_error"] = str(exc)
                self.wait_for_ports(count)
                before = procfs.tree_kb(peer.pid, "VmRSS")
        mem["idle"] = {"count": count, "rss_before_kb": before, "rss_after_kb": after,
                       "per_conn_kb": (after - before) / count, "threads": threads}
        mem["final_hwm_kb"] = procfs.tree_kb(peer.pid, "VmHWM")
        log(f"{peer.spec}: {count} idle connections: RSS {before / 1024:.1f} -> {after / 1024:.1f} MB, "
            f"{(after - before) / count:.1f} KB each, {threads} threads")

    def run_profiles(self) -> None:
        target = next((p for spec, p in self.peers.items() if spec.startswith("mtls-proxy") and p.workers == 1),
                      None)
        if target is None:
            return
        if self.s.memprof_conns:
            self.wait_quiet()
            log(f"memory breakdown: {self.s.memprof_conns} idle connections through a traced mtls-proxy")
            self.data["memory_breakdown"] = memprof.breakdown(
                self.pki, self.backend.port, self.workdir / "memprof", count=self.s.memprof_conns,
                cpu=self.s.proxy_cpu, settle=self.s.settle, wait_for_ports=self.wait_for_ports)
            log(f"memory breakdown: {json.dumps(self.data['memory_breakdown'])[:600]}")
        if not pyspy.available():
            self.data["profiles"] = {"mtls-proxy": {"error": "py-spy is not installed (pip install py-spy)"}}
            return
        seconds = self.s.profile_seconds
        profiles = {}

        def hs() -> None:
            loads.s_time(target.require_port, self.pki, reuse=False, clients=self.s.hs_clients, seconds=seconds)

        def bulk(direction: str) -> Callable[[], None]:
            def go() -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    loads.bulk(target.require_port, self.pki, direction, 512 * 2**20)
            return go

        def wrk(port: int) -> Callable[[], None]:
            def go() -> None:
                loads.wrk(f"https://127.0.0.1:{port}/", connections=self.s.wrk_connections, seconds=seconds)
            return go

        loads_to_profile = [
            ("full handshakes", f"`openssl s_time -new -www /`, {self.s.hs_clients} clients, {seconds} s", hs),
            ("bulk down", f"backend → client, 512 MiB per connection, {seconds} s", bulk("down")),
            ("bulk up", f"client → backend, 512 MiB per connection, {seconds} s", bulk("up")),
        ]
        if self.use_wrk:
            loads_to_profile.append(("kept-alive requests",
                                     f"`wrk -c{self.s.wrk_connections}` on the optional port, {seconds} s",
                                     wrk(target.optional_port)))
            if target.http:
                loads_to_profile.append((
                    "kept-alive requests, HTTP identity mode",
                    f"`wrk -c{self.s.wrk_connections}` on the HTTP identity-mode optional port, {seconds} s",
                    wrk(target.http_optional_port)))
        if self.use_h2 and target.h2:
            def h2() -> None:
                loads.h2load(target.h2_port, self.pki, self.h2_preload, connections=self.s.h2_connections,
                             streams=self.s.h2_streams, seconds=seconds)

            loads_to_profile.append((
                "kept-alive requests, HTTP/2 identity mode",
                f"`h2load -c{self.s.h2_connections} -m{self.s.h2_streams}` with the client certificate on the "
                f"HTTP/2 port, {seconds} s", h2))
        for name, description, action in loads_to_profile:
            self.wait_quiet()
            log(f"profiling {target.spec}: {name}")
            slug = name.replace(" ", "-").replace(",", "").replace("/", "")
            profiles[name] = pyspy.record(target.pid, action, self.workdir / f"profile-{slug}",
                                          description=description, cpu=self.s.load_cpu)
        self.data["profiles"] = profiles

    # ---- the whole run ----

    def run(self) -> None:
        self.setup()
        measured = [p for p in self.peers.values() if self.check(p)]
        self.paced_backend()
        time.sleep(self.s.settle)
        for peer in self.peers.values():
            self.data["peers"][peer.spec]["memory"]["idle_rss_kb"] = procfs.tree_kb(peer.pid, "VmRSS")
        tests = [t for t in TESTS if (not t.startswith("wrk") or self.use_wrk) and (t != "h2" or self.use_h2)]
        if self.use_wrk and self.s.backend_ceiling:
            self.backend_ceiling()
        for rep in range(self.s.reps):
            if self.s.reps > 1:
                log(f"--- repetition {rep + 1} of {self.s.reps}")
            for test in tests:
                for peer in measured:
                    if not peer.runs(test):
                        continue
                    run = self.measure(peer, test)
                    self.data["peers"][peer.spec]["runs"].setdefault(test, []).append(run)
        for peer in measured:
            self.data["peers"][peer.spec]["memory"]["peak_rss_kb"] = procfs.tree_kb(peer.pid, "VmHWM")
        for peer in measured:
            if peer.runs("idle"):
                self.memory_idle_conns(peer)
        for entry in self.data["peers"].values():
            summary = entry["summary"]
            for test, runs in entry["runs"].items():
                summary[f"{test}_cpu"] = report.summarize(runs, "cpu")
                summary[f"{test}_cpu_si"] = report.summarize(runs, "cpu_si")
                summary[f"{test}_rate"] = report.summarize(runs, "rate")
                if test == "resumed":
                    summary["resumed_reused"] = report.summarize(runs, "reused")
                if test in ("wrk", "wrk_http"):
                    summary[f"{test}_p50"] = report.summarize(runs, "p50")
                    summary[f"{test}_p99"] = report.summarize(runs, "p99")
                if test == "h2":
                    summary["h2_mean"] = report.summarize(runs, "mean")
        if self.profile:
            self.run_profiles()
        self.data["waited_s"] = self.waited


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    h2load = "-"
    if shutil.which("h2load"):
        h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip() or "h2load"
    return {"cpu": model, "cpus": str(os.cpu_count()), "memory": f"{mem_gib:.0f} GiB", "os": os_name,
            "kernel": platform.release(), "python": platform.python_version(), "openssl_cli": openssl,
            "wrk": "wrk 4.1.0" if shutil.which("wrk") else "-", "h2load": h2load}


def code_version() -> str:
    """The commit measured, and whether the proxy's code differed from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if not head:
        return "?"
    return f"`{head}`" + (" with uncommitted changes in proxy/" if dirty else "")


def results_markdown(data: dict[str, Any], text: str) -> str:
    m = data["machine"]
    pinning = data["settings"]
    versions = "\n".join(f"| {report.label(spec)} | {entry.get('version', '?')} |"
                         for spec, entry in data["peers"].items())
    return f"""# Benchmark results

Generated by `bench/run.py` (see `bench/README.md`); regenerate with the command below. Hand-written notes, if
any, are at the end.

- date: {data['started']} (took {data['duration_s'] / 60:.1f} min)
- command: `{data['command']}`
- code: {data.get('code', '?')}
- machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}, {m['os']}, kernel {m['kernel']}
- pinning: proxy on CPU {pinning['proxy_cpu']}; clients, backend and harness on CPU {pinning['load_cpu']}
- clients: {m['openssl_cli']} (`s_time`; `s_client` as the second bulk client), \
Python {m['python']} `ssl` (bulk, checks, idle connections), {m['wrk']}, \
{m.get('h2load', '-')} (HTTP/2; nghttp from the same package for its checks)

| peer | version |
|---|---|
{versions}

{text}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s loads, 8 MiB bulk, 32 idle conns")
    parser.add_argument("--peers", default=DEFAULT_PEERS,
                        help=f"comma-separated peer specs (default {DEFAULT_PEERS}); known: {', '.join(KINDS)}; "
                             "options as name:key=value, e.g. mtls-proxy:workers=2:cpus=0-1")
    parser.add_argument("--reps", type=int, help="repetitions of every run (median kept)")
    parser.add_argument("--seconds", type=int, help="duration of each handshake and wrk run")
    parser.add_argument("--clients", type=int, help="parallel s_time processes")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk run")
    parser.add_argument("--wrk-connections", type=int)
    parser.add_argument("--idle-conns", type=int, help="idle TLS connections for the per-connection memory")
    parser.add_argument("--memprof-conns", type=int,
                        help="idle connections for mtls-proxy's memory breakdown (tracemalloc); 0 skips it")
    parser.add_argument("--retries", type=int, help="extra attempts for a run that foreign load disturbed")
    parser.add_argument("--patience", type=float,
                        help="seconds, in all, that waiting for a quiet machine and repeating runs may add")
    parser.add_argument("--foreign-limit", type=float,
                        help="foreign CPU (share of one core) that marks a run disturbed")
    parser.add_argument("--proxy-cpu", type=int)
    parser.add_argument("--load-cpu", type=int)
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    parser.add_argument("--no-h2", action="store_true", help="skip the HTTP/2 (h2load) runs")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--no-install", action="store_true", help="never apt-get or pip install missing peers")
    parser.add_argument("--skip-missing", action="store_true", help="drop peers that are not installed")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--results", type=Path, help="write the report as Markdown (e.g. bench/RESULTS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, profiles)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: print (and with --results write) the report of an earlier --json")
    args = parser.parse_args()

    if args.render:
        data = json.loads(args.render.read_text())
        text = report.render(data)
        print(text)
        if args.results:
            args.results.write_text(results_markdown(data, text))
        return 0

    settings = QUICK if args.quick else FULL
    overrides = {"reps": args.reps, "hs_seconds": args.seconds, "wrk_seconds": args.seconds,
                 "hs_clients": args.clients, "bulk_bytes": args.bulk_mib and args.bulk_mib * 2**20,
                 "wrk_connections": args.wrk_connections, "idle_conns": args.idle_conns,
                 "memprof_conns": args.memprof_conns, "retries": args.retries,
                 "foreign_limit": args.foreign_limit, "patience": args.patience, "proxy_cpu": args.proxy_cpu,
                 "load_cpu": args.load_cpu}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if os.cpu_count() and max(settings.proxy_cpu, settings.load_cpu) >= os.cpu_count():
        parser.error(f"this machine has {os.cpu_count()} CPUs; choose --proxy-cpu/--load-cpu below that")

    specs = [s.strip() for s in args.peers.split(",") if s.strip()]
    try:
        kinds = [parse_spec(spec)[0] for spec in specs]
    except PeerError as exc:
        parser.error(str(exc))
    need_h2 = not args.no_h2 and any(kind.h2_capable for kind in kinds)
    missing = install_missing(kinds, need_wrk=not args.no_wrk, allowed=not args.no_install, need_h2=need_h2)
    if missing:
        still = [spec for spec, kind in zip(specs, kinds, strict=False) if needs(kind)]
        if not args.skip_missing:
            print(f"missing: {' '.join(missing)} (install them, run as root, or pass --skip-missing)",
                  file=sys.stderr)
            return 2
        log(f"skipping {', '.join(still) or 'nothing'}; missing packages: {' '.join(missing)}")
        specs = [spec for spec, kind in zip(specs, kinds, strict=False) if not needs(kind)]
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    h2_missing = h2_tools_missing() if need_h2 else []

    # The harness, the backend and the clients share the load core; each peer gets the proxy core.
    os.sched_setaffinity(0, {settings.load_cpu})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mtls-bench-"))
    bench = Bench(settings, specs, workdir, use_wrk=use_wrk, profile=not args.quick and not args.no_profile,
                  use_h2=need_h2 and not h2_missing)
    if h2_missing:
        bench.data["h2_unavailable"] = f"not installed: {' '.join(h2_missing)}"
        log(f"no HTTP/2 row: {bench.data['h2_unavailable']}")
    bench.data.update(started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                      command="python bench/run.py " + shlex.join(sys.argv[1:]), workdir=str(workdir),
                      code=code_version(),
                      use_wrk=use_wrk)
    try:
        bench.run()
    finally:
        bench.teardown()
        bench.data["duration_s"] = time.monotonic() - started
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(bench.data, indent=1, default=str))

    text = report.render(bench.data)
    print(text)
    if args.results:
        args.results.write_text(results_markdown(bench.data, text))
        log(f"wrote {args.results}")
    log(f"done in {bench.data['duration_s']:.0f} s")
    failed = [spec for spec, e in bench.data["peers"].items()
              if "error" in e or not e.get("checks", {}).get("ok") or "idle_error" in e.get("memory", {})
              or any(not r.get("ok") for runs in e["runs"].values() for r in runs)]
    if failed:
        log(f"rows without valid numbers: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
