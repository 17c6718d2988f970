"""The benchmark's smoke run, ``python bench/run.py --quick``: every peer configured, checked and measured once.

The full benchmark (bench/README.md) is not part of the test suite; this keeps it from rotting. It fails when the
harness breaks: a peer that does not start, a peer that admits a client without a certificate (or with one from
another CA), a row without numbers, an HTTP identity-mode listener whose requests reach the backend without the
identity headers (or with forged ones), an HTTP/2 listener whose h2load requests do not carry the client
certificate's identity to the backend, or a two-worker row whose work does not reach both workers. It asserts
nothing about speed: the quick loads last a second each.

The peers come from Debian packages (.ci/run installs them). Outside CI a peer that is not installed is left out
(mtls-proxy is always there), and so is the HTTP/2 row without h2load and nghttp (nghttp2-client) and a C compiler
(for bench/h2load_cert.c); in CI (``CI`` set) every peer, wrk and the HTTP/2 tools must be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def _installed(peer: str) -> bool:
    if peer == "nginx":
        return shutil.which("nginx") is not None and NGINX_STREAM_MODULE.exists()
    if peer == "haproxy":
        return shutil.which("haproxy") is not None
    if peer == "stunnel":
        return shutil.which("stunnel4") is not None
    return True


def h2_tools() -> bool:
    """What the benchmark's HTTP/2 row needs: h2load and nghttp, and a C compiler for bench/h2load_cert.c."""
    return all(shutil.which(tool) for tool in ("h2load", "nghttp")) and bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.timeout(120)
def test_quick_benchmark_measures_every_peer(tmp_path: Path) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the benchmark pins the proxy and the load generator to two different CPUs")
    for tool in ("openssl", "taskset"):
        assert shutil.which(tool), f"{tool} is needed by the benchmark"
    # floor (bench/floor.py) is the reference row: it must pass the same checks and relay every load.
    peers = [p for p in ("nginx", "haproxy", "stunnel", "mtls-proxy", "floor") if _installed(p)]
    workers_row = "mtls-proxy:workers=2:cpus=0-1:tests=full"
    absent = [p for p in ("nginx", "haproxy", "stunnel") if p not in peers]
    has_wrk = shutil.which("wrk") is not None
    has_h2 = h2_tools()
    if os.environ.get("CI"):
        assert not absent and has_wrk, f"not installed: {absent + ([] if has_wrk else ['wrk'])} (.ci/run installs them)"
        assert has_h2, "h2load, nghttp (nghttp2-client) or cc is not installed (.ci/run installs them)"

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/run.py", "--quick", "--no-install", "--peers", ",".join([*peers, workers_row]),
           "--json", str(out), "--results", str(tmp_path / "RESULTS.md")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())

    tests = ["full", "resumed", "bulk_up", "bulk_down", "bulk2_up", "bulk2_down"] + (["wrk"] if has_wrk else [])
    http_peers = [p for p in peers if p in ("nginx", "mtls-proxy")]
    for spec in peers:
        entry = data["peers"][spec]
        assert "error" not in entry, entry["error"]

        # Refused before being measured: no certificate, a certificate from another CA. Neither reached the backend.
        checks = entry["checks"]
        assert not checks["no_cert"]["reached"], f"{spec} admitted a client without a certificate"
        assert not checks["other_ca"]["reached"], f"{spec} admitted a certificate from another CA"
        assert not checks["other_ca_optional_port"]["reached"], f"{spec}'s optional port admitted another CA"
        assert checks["backend_connections_from_refused"] == 0
        assert checks["good"]["reached"], checks["good"]["detail"]
        assert checks["optional_no_cert"]["reached"], checks["optional_no_cert"]["detail"]
        assert checks["ok"]

        for test in tests:
            (run,) = entry["runs"][test]
            assert run["ok"], f"{spec} {test}: {run.get('error')}"
            assert run["rate"] > 0 and run["count"] > 0, f"{spec} {test}: {run}"
            assert run["cpu"] is not None and run["cpu"] >= 0
            summary = entry["summary"]
            assert summary[f"{test}_rate"] > 0 and summary[f"{test}_cpu"] is not None
        # Handshakes take milliseconds of CPU: a zero would mean the proxy's process tree was not found.
        assert entry["runs"]["full"][0]["proxy_cpu_s"] > 0, f"{spec}: no CPU time read from /proc"
        assert entry["runs"]["resumed"][0]["reused"] > 0.9, f"{spec}: sessions were not resumed"

        memory = entry["memory"]
        assert memory["idle_rss_kb"] > 1000
        assert memory["peak_rss_kb"] >= memory["idle_rss_kb"] * 0.9
        assert memory["idle"]["count"] == data["settings"]["idle_conns"]
        assert memory["idle"]["rss_after_kb"] > 0

        latency = entry["latency"]
        assert latency["nodelay"]["first_response_ms"] > 0
        paced = latency["paced"]
        assert paced["requests"] == int(data["settings"]["paced_rate"] * data["settings"]["paced_seconds"])
        assert 0 < paced["p50_us"] <= paced["p99_us"]

    assert 0 < data["paced_backend"]["p50_us"] <= data["paced_backend"]["p99_us"]
    assert "## Added latency at a fixed rate" in (tmp_path / "RESULTS.md").read_text()

    # The HTTP identity mode: nginx's http {} module and mtls-proxy's backend.protocol: http, checked and measured.
    for spec in http_peers:
        entry = data["peers"][spec]
        http = entry["checks"]["http"]
        assert http["ok"], f"{spec}: {http['problems']}"
        assert not http["no_cert"]["reached"] and not http["other_ca"]["reached"]
        assert http["backend_requests_from_refused"] == 0
        assert http["good"]["headers"]["x-client-verify"] == ["SUCCESS"]
        assert "CN=bench-client" in http["good"]["headers"]["x-forwarded-client-cert"][0]
        assert http["optional_no_cert"]["headers"]["x-client-verify"] == ["NONE"]
        assert "x-forwarded-client-cert" not in http["optional_no_cert"]["headers"], "a forged XFCC got through"
        if has_wrk:
            (run,) = entry["runs"]["wrk_http"]
            assert run["ok"], f"{spec} wrk_http: {run.get('error')}"
            assert run["rate"] > 0 and run["cpu"] is not None
            assert run["identity_share"] == 1.0, f"{spec}: requests without the identity headers: {run}"
    for spec in ("haproxy", "stunnel"):
        if spec in peers:
            assert "wrk_http" not in data["peers"][spec]["runs"]
            assert "h2" not in data["peers"][spec]["runs"] and "h2" not in data["peers"][spec]["checks"]

    # HTTP/2: h2load with the client certificate on each HTTP peer's h2 port, refused without it, and every request
    # at the backend with the verified client's XFCC.
    for spec in http_peers if has_h2 else []:
        entry = data["peers"][spec]
        h2 = entry["checks"]["h2"]
        assert h2["ok"], f"{spec}: {h2['problems']}"
        assert not h2["no_cert"]["reached"] and not h2["other_ca"]["reached"]
        assert h2["backend_requests_from_refused"] == 0
        assert h2["h2load"].startswith("1 request succeeded over h2"), h2["h2load"]
        assert h2["good"]["headers"]["x-client-verify"] == ["SUCCESS"]
        (xfcc,) = h2["good"]["headers"]["x-forwarded-client-cert"]
        assert "CN=bench-client" in xfcc and "forged" not in xfcc
        (run,) = entry["runs"]["h2"]
        assert run["ok"], f"{spec} h2: {run.get('error')}"
        assert run["protocol"] == "h2" and run["streams"] == 32 and run["connections"] == 8
        assert run["rate"] > 0 and run["cpu"] is not None
        assert run["identity_header"] == "X-Forwarded-Client-Cert" and run["identity_share"] == 1.0, run

    # Two workers: both take handshakes, and the row has a CPU per handshake.
    entry = data["peers"][workers_row]
    assert "error" not in entry, entry["error"]
    assert entry["checks"]["ok"] and entry["workers"] == 2
    assert set(entry["runs"]) == {"full"}, "tests=full must limit the row to the full handshakes"
    (run,) = entry["runs"]["full"]
    assert run["ok"] and run["cpu"] > 0
    busy = [name for name, seconds in run["per_process_cpu_s"].items() if seconds > 0]
    assert len(busy) >= 2, f"the handshakes did not reach both workers: {run['per_process_cpu_s']}"

    report = proc.stdout
    assert "## CPU per unit of work" in report and "## Targets of issue 5" in report
    for spec in peers:
        assert f"| {spec} |" in report or f"| **{spec}** |" in report
    assert "| **mtls-proxy:workers=2:cpus=0-1** |" in report and "## Worker processes" in report
    if has_h2:
        assert "## HTTP/2 identity mode" in report and "| **mtls-proxy** |" in report.split("## HTTP/2")[1]
        assert "Issue 14's goal" in report and "- **mtls-proxy**: " in report
    if has_wrk and "mtls-proxy" in http_peers:
        assert "## HTTP identity mode" in report
        unmeasured = "small requests on kept-alive connections, HTTP identity mode | ≤ 3.0× nginx | not measured"
        assert unmeasured not in report


def test_the_relay_micro_benchmark_runs():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "relay.py"), "--requests", "200"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "µs of CPU per request through the HTTP relay (200 requests)" in result.stdout


def test_the_stream_micro_benchmark_runs():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "stream.py"), "--mib", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"client to server: [\d.]+ CPU-s/GiB, server to client: [\d.]+ CPU-s/GiB \(2 MiB\)\n",
                        result.stdout), result.stdout


@pytest.mark.parametrize("kind", ["full", "resumed"])
def test_the_handshake_micro_benchmark_runs(kind):
    args = ["--handshakes", "20"] + (["--resumed"] if kind == "resumed" else [])
    result = subprocess.run([sys.executable, str(REPO / "bench" / "handshake.py"), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"[\d.]+ µs of CPU per {kind} handshake on the server side \(median of 20\)\n",
                        result.stdout), result.stdout
