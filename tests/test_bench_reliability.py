"""The reliability benchmark's quick run, ``python bench/reliability.py --quick``, against the real daemon.

It holds 500 connections, sends a burst of 150 silent ones while healthy clients connect, makes 2,000 connections
with mixed outcomes, breaks the backend two ways and rotates the certificate under load for 10 s (bench/README.md,
"Reliability"). The test asserts what must hold on any machine: the daemon survives, leaks no file descriptor,
counts every connection and every failure under its reason, and never fails a good client. Nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reliability") / "quick.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "reliability.py"), "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert out.exists(), run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert run.returncode == (1 if data["broken"] else 0), run.stderr[-3000:]
    return data


def test_no_invariant_is_broken(quick_run):
    assert quick_run["broken"] == []


def test_the_daemon_survives_every_phase(quick_run):
    phases = quick_run["results"]
    assert set(phases) == {"held", "slowloris", "mixed", "faults", "rotation"}
    assert all(phase["daemon_alive"] for phase in phases.values())


def test_every_connection_is_held(quick_run):
    held = quick_run["results"]["held"]
    assert (held["held"], held["errors"]) == (held["target"], 0)


def test_healthy_clients_never_fail_during_a_slowloris_burst(quick_run):
    slowloris = quick_run["results"]["slowloris"]
    assert slowloris["silent"] == 150
    assert slowloris["baseline"]["errors"] == slowloris["attack"]["errors"] == 0


def test_mixed_outcomes_leak_no_fd_and_are_all_counted(quick_run):
    mixed = quick_run["results"]["mixed"]
    assert mixed["fds_after"] <= mixed["fds_before"]
    assert mixed["counted_connections"] == mixed["total"] == 2000
    assert mixed["counted_success"] == mixed["attempts"]["good"] == mixed["outcomes"]["good"]["ok"]
    assert mixed["counted_success"] + mixed["counted_failure"] == mixed["total"]


@pytest.mark.parametrize(("kind", "reason"), [("no_cert", "no_client_cert"), ("wrong_ca", "unknown_ca"),
                                              ("plain_http", "not_tls"), ("early_close", "client_closed")])
def test_each_refused_kind_is_counted_under_its_reason(quick_run, kind, reason):
    mixed = quick_run["results"]["mixed"]
    assert mixed["outcomes"][kind] == {"refused": mixed["attempts"][kind]}
    assert mixed["reasons"][reason] == mixed["attempts"][kind]


def test_backend_faults_close_the_client_and_are_counted(quick_run):
    faults = quick_run["results"]["faults"]
    attempts = faults["attempts"]
    assert faults["down"]["outcomes"] == faults["resets"]["outcomes"] == {"closed": attempts}
    assert faults["down"]["counted_backend_failures"] == attempts
    assert faults["resets"]["counted_connections"] == attempts
    assert faults["fds_after"] <= faults["fds_before"]


def test_certificate_rotation_under_load_fails_no_client(quick_run):
    rotation = quick_run["results"]["rotation"]
    assert rotation["rotations"] >= 3
    assert rotation["client_errors"] == 0 and rotation["outcomes"]["ok"] > 0
    assert (rotation["reloads_success"], rotation["reloads_failure"]) == (rotation["reloads_expected"], 0)
