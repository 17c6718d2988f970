"""proxy/daemon/capacity.py: the sizing arithmetic, the cgroup memory limit, and memory given back after a burst.

The arithmetic and the cgroup files are pure (a temporary folder stands in for /sys/fs/cgroup). Giving memory back
is tested on the real daemon: bench/reliability.py holds 1,500 mTLS connections through ``mtls-proxy run``, closes
them, and watches the daemon's RSS.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config.schema import parse
from proxy.daemon import capacity
from proxy.daemon.capacity import (
    HEADROOM,
    PER_CONNECTION_BYTES,
    BurstWatch,
    MiB,
    cgroup_memory_limit,
    max_connections_for,
    memory_needed,
    memory_warnings,
)

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"


def config_with(*max_connections: int, workers: int = 1):
    listeners = [{
        "name": f"l{i}", "listen": f"127.0.0.1:{8443 + i}",
        "tls": {"cert": "/etc/x/tls.crt", "key": "/etc/x/tls.key"},
        "client_auth": {"mode": "require", "trusted_ca": "/etc/x/ca.crt"},
        "backend": {"address": "127.0.0.1:8080"}, "max_connections": n,
    } for i, n in enumerate(max_connections)]
    return parse({"workers": workers, "listeners": listeners})


def cgroup_v2(tmp_path: Path, value: str) -> Path:
    (tmp_path / "memory.max").write_text(value + "\n")
    return tmp_path


def cgroup_v1(tmp_path: Path, value: str) -> Path:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(value + "\n")
    return tmp_path


# ---- the cgroup limit ---------------------------------------------------------------------------------------------


def test_cgroup_v2_limit_in_bytes(tmp_path):
    assert cgroup_memory_limit(cgroup_v2(tmp_path, str(256 * MiB))) == 256 * MiB


def test_cgroup_v2_max_means_no_limit(tmp_path):
    assert cgroup_memory_limit(cgroup_v2(tmp_path, "max")) is None


def test_cgroup_v1_limit(tmp_path):
    assert cgroup_memory_limit(cgroup_v1(tmp_path, str(512 * MiB))) == 512 * MiB


def test_cgroup_v1_unlimited_is_its_huge_number(tmp_path):
    assert cgroup_memory_limit(cgroup_v1(tmp_path, "9223372036854771712")) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_memory_limit(tmp_path) is None


def test_unreadable_limit_means_no_limit(tmp_path):
    assert cgroup_memory_limit(cgroup_v2(tmp_path, "lots")) is None


# ---- the arithmetic ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("limit_mib", [128, 256, 512, 1024, 4096])
def test_max_connections_for_a_limit_is_the_most_that_fit(limit_mib, workers):
    limit = limit_mib * MiB
    most = max_connections_for(limit, workers)
    assert memory_needed(most, workers) <= limit * (1 - HEADROOM) < memory_needed(most + 1, workers)


def test_each_connection_costs_the_measured_figure():
    assert memory_needed(1000) - memory_needed(0) == 1000 * PER_CONNECTION_BYTES == 1000 * 48 * 1024


def test_workers_cost_more_at_idle_than_one_process():
    assert memory_needed(0, workers=2) > memory_needed(0, workers=1)


def test_too_small_a_limit_fits_no_connection():
    assert max_connections_for(32 * MiB) == 0


# ---- the warnings ---------------------------------------------------------------------------------------------


def test_no_warning_without_a_limit(tmp_path):
    assert memory_warnings(config_with(10_000), cgroup_v2(tmp_path, "max")) == []


def test_no_warning_when_the_connections_fit(tmp_path):
    root = cgroup_v2(tmp_path, str(256 * MiB))
    assert memory_warnings(config_with(max_connections_for(256 * MiB)), root) == []


def test_warning_names_each_listener_and_the_limit(tmp_path):
    root = cgroup_v2(tmp_path, str(256 * MiB))
    (warning,) = memory_warnings(config_with(2000, 8000), root)
    assert "listeners[0].max_connections=2000" in warning
    assert "listeners[1].max_connections=8000" in warning
    assert "10000 connections" in warning
    assert "256 MiB" in warning
    assert f"about {max_connections_for(256 * MiB)} in total" in warning


def test_limits_add_up_over_listeners(tmp_path):
    root = cgroup_v2(tmp_path, str(256 * MiB))
    half = max_connections_for(256 * MiB) // 2
    assert memory_warnings(config_with(half, half), root) == []
    assert memory_warnings(config_with(half + 1, half + 1), root) != []


def test_each_worker_has_its_own_limit(tmp_path):
    root = cgroup_v1(tmp_path, str(1024 * MiB))
    per_worker = max_connections_for(1024 * MiB, workers=4) // 4
    assert memory_warnings(config_with(per_worker, workers=4), root) == []
    (warning,) = memory_warnings(config_with(per_worker * 2, workers=4), root)
    assert "x 4 workers" in warning


# ---- the shipped examples -------------------------------------------------------------------------------------------


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"memory limit {quantity!r} is not in Mi or Gi"
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def _sidecar_memory_limit() -> int:
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (proxy,) = [c for c in containers if c["name"] == "mtls-proxy"]
    return _mebibytes(proxy["resources"]["limits"]["memory"]) * MiB


def test_kubernetes_example_fits_its_memory_limit(tmp_path):
    """The sidecar's max_connections must pause accepts before its memory limit kills the pod."""
    config = parse(yaml.safe_load((KUBERNETES / "mtls-proxy.yaml").read_text()))
    assert memory_warnings(config, cgroup_v2(tmp_path, str(_sidecar_memory_limit()))) == []


def test_readme_sizing_table_matches_the_arithmetic():
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Sizing"):]
    rows = re.findall(r"^\| (\d+) (MiB|GiB) \| ([\d,]+) \| ([\d,]+) \|", section, re.MULTILINE)
    assert len(rows) >= 4
    for amount, unit, one, two in rows:
        limit = int(amount) * MiB * (1024 if unit == "GiB" else 1)
        # The table rounds down to a hundred: what it says must fit, and be within a hundred of the most.
        for shown, workers in ((one, 1), (two, 2)):
            most = max_connections_for(limit, workers)
            assert most - 100 < int(shown.replace(",", "")) <= most, (amount, unit, workers)


# ---- giving memory back ---------------------------------------------------------------------------------------------


def test_burst_watch_trims_once_the_count_falls_well_below_its_peak():
    watch = BurstWatch()
    assert [watch.should_trim(n) for n in (0, 500, 2000, 1500, 1100)] == [False] * 5
    assert watch.should_trim(900)  # under half of 2,000
    assert not watch.should_trim(900)  # the peak is now 900: nothing fell since
    assert not watch.should_trim(500)  # under half of 900 but only 400 fewer: not worth a trim
    assert watch.should_trim(400)


def test_burst_watch_ignores_small_swings():
    watch = BurstWatch()
    assert not any(watch.should_trim(n) for n in (150, 30, 180, 0, 150, 10))


def test_malloc_trim_is_found_on_glibc():
    assert capacity.malloc_trim is not None


@pytest.mark.slow
def test_daemon_gives_memory_back_after_a_burst(tmp_path):
    """1,500 idle mTLS connections grow the daemon by about 70 MB; 15 s after they close, most of it is back.

    Without the trim RSS stays at its peak (glibc keeps the freed heap mapped); with it, measured: 56 -> 126 MB
    held -> 79 MB. Python's own allocator keeps a third of the growth (pymalloc arenas that still hold a live
    object each), so the margin is: at most 60 % of the growth remains.
    """
    out = tmp_path / "held.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "reliability.py"), "--quick", "--only", "held",
                    "--held", "1500", "--settle", "15", "--json", str(out)],
                   check=True, timeout=240, stdout=subprocess.DEVNULL)
    held = json.loads(out.read_text())["results"]["held"]
    assert held["held"] == 1500 and held["daemon_alive"]
    growth = held["rss_peak_mb"] - held["rss_before_mb"]
    assert growth > 40, held  # the burst really cost memory
    remaining = held["rss_settled_mb"] - held["rss_before_mb"]
    assert remaining < 0.6 * growth, f"RSS {held['rss_before_mb']:.0f} MB idle, {held['rss_peak_mb']:.0f} MB " \
                                     f"held, {held['rss_settled_mb']:.0f} MB {held['settle_seconds']:.0f} s after"
