"""At the file-descriptor limit the daemon stays calm: the admin endpoint answers, the log is quiet, no reload is
counted as failed, and clients get through again once the crowd leaves.

Each daemon runs in its own process with a low RLIMIT_NOFILE, so the test runner is never short of descriptors.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from proxy.config.schema import parse
from proxy.daemon import fdlimit
from proxy.daemon.server import Proxy
from tests.conftest import listener_config
from tests.daemonkit import (
    HoldingBackend,
    client_context,
    close_all,
    free_port,
    open_silent_tcp,
    proxy_config,
    start_daemon,
    tls_request_ok,
    wait_until,
)

FD_LIMIT = 256  # room for (256 - 128) / 2 = 64 connections
HOGS = FD_LIMIT + 44  # more silent clients than the process has descriptors


@pytest.mark.slow
def test_at_the_fd_limit_admin_answers_and_nothing_fails(test_pki, tmp_path):
    backend = HoldingBackend()
    config = proxy_config(test_pki, backend.address, port=free_port(), admin_port=free_port(),
                          log={"format": "text"}, reload={"watch_interval": 0.2})
    daemon = start_daemon(tmp_path, config, fd_limit=FD_LIMIT)
    hogs: list[socket.socket] = []
    try:
        # Silent clients sit in the handshake (30 s timeout) holding a descriptor each; the ones the proxy does
        # not take wait in the kernel's backlog.
        hogs = open_silent_tcp(daemon.port, HOGS)
        capacity = fdlimit.connection_capacity(FD_LIMIT)
        wait_until(lambda: daemon.metric("mtls_proxy_active_connections", listener="main") >= capacity,
                   timeout=15, what=f"{capacity} connections", alive=daemon.proc)
        time.sleep(1)  # the accept loops take whatever more they would
        for path in ("/healthz", "/metrics", "/readyz", "/status"):
            assert daemon.admin_get(path)[0] == 200, path
        time.sleep(0.5)  # a few file-watch polls at the limit
        assert daemon.metric("mtls_proxy_reloads_total", result="failure") == 0
        assert daemon.metric("mtls_proxy_active_connections", listener="main") == capacity
        # A certificate file changes at the limit: the reserve has room to reload it.
        cert = test_pki.server.cert
        cert.write_bytes(cert.read_bytes())
        wait_until(lambda: daemon.metric("mtls_proxy_reloads_total", result="success") == 1, timeout=10,
                   what="the reload", alive=daemon.proc)
        assert daemon.metric("mtls_proxy_reloads_total", result="failure") == 0

        close_all(hogs)
        assert tls_request_ok(daemon.port, client_context(test_pki), timeout=10)
    finally:
        close_all(hogs)
        code = daemon.stop()
        backend.close()
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("cannot accept") <= 1, log[-3000:]  # the budget keeps EMFILE away; if not, one line an episode
    assert "reload failed" not in log
    assert code == 0


# A real EMFILE on a real listening socket: the admin endpoint's HTTP server in a process whose descriptor table
# is full, with a client waiting in the backlog; then descriptors are freed.
_FULL_TABLE_SERVER = textwrap.dedent("""
    import logging, os, sys, trio
    from proxy.ops.admin_http import Response, serve_http

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    async def ok(request):
        return Response(body=b"ok\\n")

    async def main():
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_http, ok, "127.0.0.1", 0)
            hogs = []
            try:
                while True:
                    hogs.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            print(port, flush=True)
            sys.stdin.readline()  # the client is waiting in the backlog
            await trio.sleep(1.0)  # accept() fails with EMFILE all this time
            for fd in hogs:
                os.close(fd)
            await trio.sleep(float(sys.argv[1]))
            nursery.cancel_scope.cancel()

    trio.run(main)
""")


@pytest.mark.slow
def test_emfile_on_the_admin_endpoint_is_one_episode_in_the_log():
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.Popen([sys.executable, "-c", _FULL_TABLE_SERVER, "3"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=low_limit)
    try:
        port = int(proc.stdout.readline())
        answers: list[int] = []
        client = threading.Thread(target=lambda: answers.append(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status))
        client.start()
        proc.stdin.write("connected\n")
        proc.stdin.flush()
        client.join(15)
        _, log = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answers == [200]
    assert "Traceback" not in log, log
    assert log.count("cannot accept: Too many open files") == 1, log
    retries = [line for line in log.splitlines() if "accepting again after" in line]
    assert len(retries) == 1, log
    assert int(retries[0].split("after ")[1].split()[0]) >= 3, retries  # it did retry, quietly


def test_capacity_warning_names_the_field_and_the_limit(test_pki):
    config = parse({"listeners": [listener_config(test_pki, "127.0.0.1:1", max_connections=10000)]}, source="t")
    (warning,) = fdlimit.fd_capacity_warnings(config, limit=1024)
    assert "max_connections add up to 10000" in warning
    assert "RLIMIT_NOFILE 1024" in warning and "holds 448" in warning
    assert fdlimit.fd_capacity_warnings(config, limit=20_128 + 128) == []


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one():
    def soft_below_hard():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    out = subprocess.run([sys.executable, "-c", "from proxy.daemon.fdlimit import raise_nofile_limit as r; print(r())"],
                         capture_output=True, text=True, preexec_fn=soft_below_hard, check=True)
    assert int(out.stdout) == 4096


def test_a_bug_while_reloading_keeps_the_old_material_and_counts_a_failure(test_pki, monkeypatch):
    from proxy.config.materials import load_all

    config = parse({"listeners": [listener_config(test_pki, "127.0.0.1:1")]}, source="t")
    proxy = Proxy(config, load_all(config), admin=False)
    before = proxy.runtimes[0].tls

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the material pipeline")

    monkeypatch.setattr("proxy.daemon.server.load_listener_materials", broken)
    assert proxy.reload_certificates() is False
    assert proxy.runtimes[0].tls is before
    assert proxy.metrics.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "failure"}) == 1
    assert proxy.last_reload["error"] == "RuntimeError: a bug in the material pipeline"


def test_a_reload_without_descriptors_is_postponed_not_failed(test_pki):
    # Only the reload runs with the descriptor table full (this process's, for a moment, with no I/O of its own).
    from proxy.config.materials import load_all

    config = parse({"listeners": [listener_config(test_pki, "127.0.0.1:1")]}, source="t")
    proxy = Proxy(config, load_all(config), admin=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hogs: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        try:
            while True:
                hogs.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        postponed = proxy.reload_certificates()
    finally:
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert postponed is False
    assert proxy.metrics.registry.get_sample_value("mtls_proxy_reloads_total", {"result": "failure"}) == 0
    assert proxy.reload_certificates() is True  # descriptors back: the same reload works
