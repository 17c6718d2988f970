"""Reloading the whole config file: SIGHUP, the file watch and `mtls-proxy reload`, against real daemon processes.

Each test starts `python -m proxy run`, rewrites its config file, reloads, and checks with real TLS clients what
changed and what did not: listeners added, removed, moved and renamed, allow rules, backends, the admin endpoint,
the log settings; a config that fails, and a port in use, change nothing. With `workers: 2` every worker must end
up on the new config. The planner that matches old listeners to new ones is tested without processes first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.schema import parse
from proxy.daemon.server import plan_listeners
from tests.conftest import TestPKI as PKIFiles  # aliased: pytest would try to collect Test*
from tests.conftest import client_context, free_port, listener_config, poll_until
from tests.daemonkit import connect_tls

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
CLIENT_TIMEOUT = 10.0


# ---- the planner, without processes --------------------------------------------------------------------------------


def listeners(test_pki: PKIFiles, *specs: tuple[str, str]) -> tuple:
    """ListenerConfigs named and placed as ``specs`` says: (name, listen address)."""
    return parse({"listeners": [listener_config(test_pki, "127.0.0.1:1", name=name, listen=listen)
                                for name, listen in specs]}, source="t").listeners


def test_the_plan_keeps_a_listener_whose_name_and_address_stay(test_pki):
    old = listeners(test_pki, ("a", "127.0.0.1:8443"), ("b", "127.0.0.1:8444"))
    new = listeners(test_pki, ("b", "127.0.0.1:8444"), ("a", "127.0.0.1:8443"), ("c", "127.0.0.1:8445"))
    plan = plan_listeners(old, new)
    assert dict(plan.same) == {0: 1, 1: 0}
    assert plan.bind == (2,) and plan.removed == () and not plan.takes_over


def test_the_plan_moves_a_listener_by_removing_and_binding_it(test_pki):
    old = listeners(test_pki, ("a", "127.0.0.1:8443"))
    new = listeners(test_pki, ("a", "127.0.0.1:9443"))
    plan = plan_listeners(old, new)
    assert plan.bind == (0,) and plan.removed == (0,) and not plan.same and not plan.takes_over


def test_the_plan_hands_the_sockets_of_a_renamed_listener_over(test_pki):
    old = listeners(test_pki, ("a", "127.0.0.1:8443"), ("b", "127.0.0.1:8444"))
    new = listeners(test_pki, ("renamed", "127.0.0.1:8443"), ("b", "127.0.0.1:8444"))
    plan = plan_listeners(old, new)
    assert dict(plan.takes_over) == {0: 0} and dict(plan.same) == {1: 1}
    assert plan.bind == () and plan.removed == (0,)  # the old one still drains its connections


def test_the_plan_binds_every_new_listener_on_port_0(test_pki):
    # Port 0 is a different port each time: only the same name keeps the one it got.
    old = listeners(test_pki, ("a", "127.0.0.1:0"))
    new = listeners(test_pki, ("a", "127.0.0.1:0"), ("b", "127.0.0.1:0"))
    plan = plan_listeners(old, new)
    assert dict(plan.same) == {0: 0} and plan.bind == (1,) and not plan.takes_over


async def test_a_drain_reaches_the_runtimes_of_earlier_generations(nursery, test_pki, tmp_path):
    # An HTTP/2 client's connection keeps the runtime it was accepted with; a drain must send it GOAWAY too.
    from proxy.config.materials import load_all
    from proxy.config.schema import load
    from proxy.daemon.server import Proxy

    path = tmp_path / "proxy.yaml"
    config = {"reload": {"watch_interval": 0},
              "listeners": [listener_config(test_pki, "127.0.0.1:1"), listener_config(test_pki, "127.0.0.1:1",
                                                                                      name="gone")]}
    path.write_text(yaml.safe_dump(config))
    loaded = load(path)
    proxy = Proxy(loaded, load_all(loaded), admin=False, config_path=path)
    await nursery.start(proxy.run)
    first, gone = proxy.runtimes
    config["listeners"] = [listener_config(test_pki, "127.0.0.1:2")]
    path.write_text(yaml.safe_dump(config))
    assert await proxy.reload()
    [second] = proxy.runtimes
    assert second is not first and second.config.backend.address != first.config.backend.address
    await trio.testing.wait_all_tasks_blocked()
    assert gone.draining.is_set()  # removed: its listener drains now
    assert not first.draining.is_set() and not second.draining.is_set()
    proxy.stop()
    assert first.draining.is_set() and second.draining.is_set()


# ---- backends ------------------------------------------------------------------------------------------------------


class TaggedEcho(socketserver.ThreadingTCPServer):
    """An echo backend in threads of the test process that puts its tag before every chunk it sends back, so a
    client can tell which backend it reached."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tag: bytes) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                with contextlib.suppress(OSError):
                    while data := self.request.recv(65536):
                        self.request.sendall(tag + data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def backends() -> Iterator[tuple[TaggedEcho, TaggedEcho]]:
    first, second = TaggedEcho(b"A:"), TaggedEcho(b"B:")
    try:
        yield first, second
    finally:
        first.close()
        second.close()


# ---- the daemon ----------------------------------------------------------------------------------------------------


def listener(name: str, test_pki: PKIFiles, backend: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "listen": f"127.0.0.1:{free_port()}",
        "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
        "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
        "backend": {"address": backend, "connect_timeout": 2},
        "timeouts": {"handshake": 5, "idle": 30},
    }
    config.update(overrides)
    return config


@dataclass
class Daemon:
    """One `python -m proxy run` process on ``dir/proxy.yaml``; its log in ``dir/stderr.log``."""

    dir: Path
    config: dict[str, Any]
    proc: subprocess.Popen | None = None
    admin: str = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.dir / "proxy.yaml"
        self.stderr_path = self.dir / "stderr.log"
        self.write(self.config)

    def write(self, config: dict[str, Any]) -> None:
        """Replace the config file (whole, as an editor's save does)."""
        self.config = config
        partial = self.dir / "proxy.yaml.partial"
        partial.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(partial, self.config_path)

    def start(self) -> Daemon:
        self.admin = self.config["admin"]["listen"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while self.get("/readyz")[0] != 200:
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode} before it was ready:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon was not ready after {START_TIMEOUT}s:\n{self.stderr()}")
            time.sleep(0.03)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("logger") == "proxy.access"]

    def get(self, path: str, admin: str | None = None) -> tuple[int | None, bytes]:
        try:
            with urllib.request.urlopen(f"http://{admin or self.admin}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None, b""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, (code, body)
        return json.loads(body)

    def sample(self, name: str, **labels: str) -> float | None:
        code, body = self.get("/metrics")
        assert code == 200, code
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    def attempt(self) -> int:
        return self.status()["last_reload"]["attempt"]

    def reload(self, how: str = "sighup") -> dict[str, Any]:
        """SIGHUP (or nothing: the file watch), then the ``last_reload`` of /status once it has moved."""
        before = self.attempt()
        if how == "sighup":
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

        def moved() -> dict[str, Any] | None:
            code, body = self.get("/status")
            last = json.loads(body)["last_reload"] if code == 200 else None
            return last if last is not None and last["attempt"] > before else None

        return poll_until(moved, timeout=30, what="the reload's result in /status")

    def listener_port(self, name: str) -> int:
        [entry] = [lc for lc in self.config["listeners"] if lc["name"] == name]
        return int(entry["listen"].rsplit(":", 1)[1])


@pytest.fixture
def daemon_factory(tmp_path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(listeners_: list[dict[str, Any]], **top: Any) -> Daemon:
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "log": {"level": "info", "format": "json"},
            "reload": {"watch_interval": 0},
            "drain_timeout": 5,
            **top,
            "listeners": listeners_,
        }
        daemon = Daemon(directory, config)
        started.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        for daemon in started:
            daemon.stop()


def edited(config: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A deep copy of ``config`` with top-level keys replaced."""
    copy = json.loads(json.dumps(config))
    copy.update(top)
    return copy


# ---- clients -------------------------------------------------------------------------------------------------------


def ask(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send ``payload``; what comes back before the backend has answered it (b"" if the connection ends)."""
    tls.sendall(payload)
    got = b""
    while not got.endswith(payload):
        chunk = tls.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def answer(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes | str:
    """One new connection: the backend's answer to ``payload``, or how the attempt failed."""
    try:
        with connect_tls(port, ctx, timeout=CLIENT_TIMEOUT) as tls:
            return ask(tls, payload) or "closed"
    except ConnectionRefusedError:
        return "refused"
    except (ssl.SSLError, OSError) as exc:
        return f"failed: {exc}"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---- single process ------------------------------------------------------------------------------------------------


def test_sighup_adds_a_listener_and_the_running_one_serves_on(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    alice = client_context(test_pki, test_pki.alice)
    with connect_tls(daemon.listener_port("api"), alice, timeout=CLIENT_TIMEOUT) as open_one:
        assert ask(open_one, b"before") == b"A:before"
        config = edited(daemon.config)
        config["listeners"].append(listener("extra", test_pki, second.address))
        daemon.write(config)
        assert daemon.reload()["result"] == "success"
        assert ask(open_one, b"after") == b"A:after"  # the listener that stayed did not drop its connection
    assert answer(daemon.listener_port("extra"), alice) == b"B:ping"
    assert answer(daemon.listener_port("api"), alice) == b"A:ping"
    status = daemon.status()
    assert [(entry["name"], entry["state"]) for entry in status["listeners"]] == [
        ("api", "accepting"), ("extra", "accepting")]
    assert daemon.sample("mtls_proxy_reloads_total", result="success") == 1.0
    assert daemon.sample("mtls_proxy_certificate_expiry_timestamp_seconds", listener="extra", role="server",
                         subject="CN=localhost") is not None
    [line] = [r for r in daemon.records() if r["msg"].startswith("reloaded ")]
    assert line["msg"] == f"reloaded {daemon.config_path}: listeners added: extra"


def test_a_removed_listener_refuses_new_connections_and_its_open_one_finishes(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address), listener("old", test_pki, second.address)])
    alice = client_context(test_pki, test_pki.alice)
    old_port = daemon.listener_port("old")
    with connect_tls(old_port, alice, timeout=CLIENT_TIMEOUT) as open_one:
        assert ask(open_one, b"one") == b"B:one"
        config = edited(daemon.config)
        config["listeners"] = config["listeners"][:1]
        daemon.write(config)
        assert daemon.reload()["result"] == "success"
        assert refused(old_port)
        # Removed, draining: /status still shows it, and its connection goes on.
        assert [(e["name"], e["state"]) for e in daemon.status()["listeners"]] == [
            ("api", "accepting"), ("old", "removed")]
        assert ask(open_one, b"two") == b"B:two"
    poll_until(lambda: [r for r in daemon.records() if r["msg"].startswith("listener old removed")],
               what="the removed listener's drain line")
    [drained] = [r for r in daemon.records() if r["msg"].startswith("listener old removed")]
    assert (drained["drained"], drained["forced"]) == (1, 0)
    [line] = [r for r in daemon.access() if r["listener"] == "old"]
    assert line["outcome"] == "ok" and line["bytes_up"] == len(b"onetwo")
    assert [e["name"] for e in daemon.status()["listeners"]] == ["api"]
    assert answer(daemon.listener_port("api"), alice) == b"A:ping"


def test_a_removed_listener_drains_for_drain_timeout_then_closes_what_is_left(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address), listener("old", test_pki, second.address)],
                            drain_timeout=0.5)
    alice = client_context(test_pki, test_pki.alice)
    with connect_tls(daemon.listener_port("old"), alice, timeout=CLIENT_TIMEOUT) as stuck:
        assert ask(stuck, b"x") == b"B:x"
        config = edited(daemon.config)
        config["listeners"] = config["listeners"][:1]
        daemon.write(config)
        daemon.reload()
        stuck.settimeout(5)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert stuck.recv(10) == b""  # cut at the drain deadline
    [drained] = poll_until(lambda: [r for r in daemon.records() if r["msg"].startswith("listener old removed")],
                           what="the removed listener's drain line")
    assert (drained["drained"], drained["forced"]) == (0, 1)
    assert daemon.proc.poll() is None  # the process serves on
    assert answer(daemon.listener_port("api"), alice) == b"A:ping"


def test_changed_allow_rules_refuse_new_connections_while_an_open_one_goes_on(daemon_factory, test_pki, backends):
    first, _ = backends
    only = {"mode": "require", "trusted_ca": str(test_pki.client_ca)}
    daemon = daemon_factory([listener("api", test_pki, first.address,
                                      client_auth={**only, "allow": {"common_names": ["alice"]}})])
    port = daemon.listener_port("api")
    alice, bob = client_context(test_pki, test_pki.alice), client_context(test_pki, test_pki.bob)
    assert answer(port, bob) != b"A:ping"
    with connect_tls(port, alice, timeout=CLIENT_TIMEOUT) as open_one:
        assert ask(open_one, b"one") == b"A:one"
        config = edited(daemon.config)
        config["listeners"][0]["client_auth"] = {**only, "allow": {"common_names": ["bob"]}}
        daemon.write(config)
        assert daemon.reload()["result"] == "success"
        assert answer(port, alice) != b"A:ping"  # refused in the handshake now
        assert answer(port, bob) == b"A:ping"
        assert ask(open_one, b"two") == b"A:two"  # admitted under the old rules, it keeps going
    poll_until(lambda: daemon.sample("mtls_proxy_handshake_failures_total", listener="api", reason="forbidden") == 2,
               what="two refusals counted as forbidden")
    [line] = [r for r in daemon.records() if r["msg"].startswith("reloaded ")]
    assert line["msg"].endswith("changed: api")


def test_a_changed_backend_takes_the_new_connections_and_the_open_one_stays(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    port = daemon.listener_port("api")
    alice = client_context(test_pki, test_pki.alice)
    with connect_tls(port, alice, timeout=CLIENT_TIMEOUT) as open_one:
        assert ask(open_one, b"one") == b"A:one"
        config = edited(daemon.config)
        config["listeners"][0]["backend"]["address"] = second.address
        daemon.write(config)
        assert daemon.reload()["result"] == "success"
        assert answer(port, alice) == b"B:ping"
        assert ask(open_one, b"two") == b"A:two"
    assert daemon.status()["listeners"][0]["backend"] == second.address


def test_a_moved_listener_refuses_on_the_old_port_and_serves_on_the_new(daemon_factory, test_pki, backends):
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    old_port, new_port = daemon.listener_port("api"), free_port()
    config = edited(daemon.config)
    config["listeners"][0]["listen"] = f"127.0.0.1:{new_port}"
    daemon.write(config)
    daemon.reload()
    alice = client_context(test_pki, test_pki.alice)
    assert refused(old_port)
    assert answer(new_port, alice) == b"A:ping"
    assert daemon.status()["listeners"][0]["listen"] == f"127.0.0.1:{new_port}"


def test_a_new_log_level_and_format_apply(daemon_factory, test_pki, backends):
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    port = daemon.listener_port("api")
    alice = client_context(test_pki, test_pki.alice)
    assert answer(port, alice) == b"A:ping"
    poll_until(lambda: [r for r in daemon.access() if r["outcome"] == "ok"], what="the first access line")

    daemon.write(edited(daemon.config, log={"level": "warning", "format": "text"}))
    daemon.reload()
    assert answer(port, alice) == b"A:ping"  # an access line at info: no longer written
    assert answer(port, client_context(test_pki, test_pki.untrusted)) != b"A:ping"  # at warning: written
    refusal = poll_until(lambda: [line for line in daemon.stderr().splitlines() if "reason=unknown_ca" in line],
                         what="the refused client's access line, as text")
    assert refusal[0].split()[1:4] == ["warning", "proxy.access", "connection"]
    assert len([r for r in daemon.access() if r["outcome"] == "ok"]) == 1
    assert "Traceback" not in daemon.stderr()


def test_a_bad_config_changes_nothing_and_is_counted_logged_and_shown(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    port = daemon.listener_port("api")
    alice = client_context(test_pki, test_pki.alice)
    good = daemon.config
    config = edited(good)
    config["listeners"][0]["backend"]["address"] = second.address  # would apply, if the rest were good
    config["listeners"].append(listener("extra", test_pki, second.address,
                                        client_auth={"mode": "sometimes", "trusted_ca": str(test_pki.client_ca)}))
    daemon.write(config)
    last = daemon.reload()
    assert last["result"] == "failure"
    assert "listeners[1].client_auth.mode: " in last["error"]
    assert str(daemon.config_path) in last["error"]
    assert answer(port, alice) == b"A:ping"  # the old backend, still
    assert refused(daemon.listener_port("extra"))
    assert daemon.sample("mtls_proxy_reloads_total", result="failure") == 1.0
    assert daemon.sample("mtls_proxy_reloads_total", result="success") == 0.0
    [line] = [r for r in daemon.records() if r["msg"].startswith("reload failed")]
    assert line["level"] == "error" and "listeners[1].client_auth.mode" in line["msg"]
    assert daemon.status()["listeners"][0]["backend"] == first.address

    # Fixed: the next reload applies everything.
    config["listeners"][1]["client_auth"]["mode"] = "require"
    daemon.write(config)
    assert daemon.reload()["result"] == "success"
    assert answer(port, alice) == b"B:ping"
    assert answer(daemon.listener_port("extra"), alice) == b"B:ping"


def test_a_port_in_use_fails_the_whole_reload(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    port = daemon.listener_port("api")
    alice = client_context(test_pki, test_pki.alice)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        config = edited(daemon.config)
        config["listeners"][0]["backend"]["address"] = second.address
        config["listeners"].append(listener("extra", test_pki, second.address, listen=f"127.0.0.1:{taken}"))
        daemon.write(config)
        last = daemon.reload()
    assert last["result"] == "failure"
    assert f"listener extra: cannot listen on 127.0.0.1:{taken}: Address already in use" in last["error"]
    assert answer(port, alice) == b"A:ping"  # the backend change did not apply either
    assert [e["name"] for e in daemon.status()["listeners"]] == ["api"]
    assert daemon.sample("mtls_proxy_reloads_total", result="failure") == 1.0


def test_the_file_watch_reloads_a_changed_config_file(daemon_factory, test_pki, backends, tmp_path):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)], reload={"watch_interval": 0.1})
    alice = client_context(test_pki, test_pki.alice)
    config = edited(daemon.config)
    config["listeners"][0]["backend"]["address"] = second.address
    daemon.write(config)
    assert daemon.reload(how="watch")["result"] == "success"
    assert answer(daemon.listener_port("api"), alice) == b"B:ping"

    # A config naming a certificate not written yet fails; writing the certificate is a change that retries it.
    cert, key = tmp_path / "later.crt", tmp_path / "later.key"
    config["listeners"].append(listener("later", test_pki, first.address, tls={"cert": str(cert), "key": str(key)}))
    daemon.write(config)
    assert daemon.reload(how="watch")["result"] == "failure"
    key.write_bytes(test_pki.server.key.read_bytes())
    cert.write_bytes(test_pki.server.cert.read_bytes())
    poll_until(lambda: daemon.status()["last_reload"]["result"] == "success", timeout=10,
               what="the reload retried once the certificate was written")
    assert answer(daemon.listener_port("later"), alice) == b"A:ping"


def test_a_tcp_backend_that_is_down_shows_in_status(daemon_factory, test_pki):
    closed = f"127.0.0.1:{free_port()}"
    daemon = daemon_factory([listener("api", test_pki, closed)])
    assert daemon.status()["listeners"][0]["last_backend_error"] is None
    assert answer(daemon.listener_port("api"), client_context(test_pki, test_pki.alice)) == "closed"
    error = poll_until(lambda: daemon.status()["listeners"][0]["last_backend_error"], what="the backend error")
    assert f"connect to {closed} failed" in error["error"] and "Connection refused" in error["error"]
    assert abs(time.time() - _unix(error["time"])) < 60
    assert daemon.sample("mtls_proxy_backend_connect_failures_total", listener="api") == 1.0


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_a_moved_admin_endpoint_answers_at_its_new_address(daemon_factory, test_pki, backends):
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    old_admin, new_admin = daemon.admin, f"127.0.0.1:{free_port()}"
    daemon.write(edited(daemon.config, admin={"listen": new_admin}))
    before = daemon.attempt()
    daemon.proc.send_signal(signal.SIGHUP)
    poll_until(lambda: daemon.get("/readyz", admin=new_admin)[0] == 200, what="the admin endpoint at its new address")
    daemon.admin = new_admin
    assert daemon.attempt() == before + 1
    assert daemon.get("/readyz", admin=old_admin)[0] is None  # nothing listens there any more


# ---- `mtls-proxy reload` -------------------------------------------------------------------------------------------


def reload_command(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "reload", "--config", str(daemon.config_path), *args],
                          capture_output=True, text=True, timeout=90, cwd=REPO)


def test_the_reload_command_checks_signals_and_reports(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    alice = client_context(test_pki, test_pki.alice)
    good = edited(daemon.config)
    good["listeners"][0]["backend"]["address"] = second.address
    daemon.write(good)
    result = reload_command(daemon)
    assert result.returncode == 0, result.stderr
    assert f"{daemon.config_path}: reloaded by pid {daemon.proc.pid}" in result.stdout
    assert answer(daemon.listener_port("api"), alice) == b"B:ping"

    # A config that fails `check` is refused here: the process is not even signalled.
    bad = edited(good)
    bad["listeners"][0]["tls"]["cert"] = str(test_pki.dir / "missing.crt")
    daemon.write(bad)
    result = reload_command(daemon)
    assert result.returncode == 2, result.stderr
    assert "listeners[0].tls.cert: " in result.stderr and "not reloaded" in result.stderr
    assert daemon.attempt() == 1
    assert daemon.stderr().count("SIGHUP") == 1  # the first reload's

    # A port in use passes `check`; the process refuses it, and says so.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = edited(good)
        taken["listeners"].append(listener("extra", test_pki, first.address,
                                           listen=f"127.0.0.1:{blocker.getsockname()[1]}"))
        daemon.write(taken)
        result = reload_command(daemon)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Address already in use" in result.stderr
    assert daemon.attempt() == 2


def test_the_reload_command_finds_a_moved_admin_endpoint_with_admin(daemon_factory, test_pki, backends):
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    old_admin = daemon.admin
    daemon.write(edited(daemon.config, admin={"listen": f"127.0.0.1:{free_port()}"}))
    result = reload_command(daemon)
    assert result.returncode == 1 and "--admin" in result.stderr  # nothing answers where the new file says
    result = reload_command(daemon, "--admin", old_admin)
    assert result.returncode == 0, result.stderr


def test_the_reload_command_refuses_a_file_the_process_does_not_run(daemon_factory, test_pki, backends, tmp_path):
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)])
    other = tmp_path / "other.yaml"
    other.write_text(daemon.config_path.read_text())
    result = subprocess.run([sys.executable, "-m", "proxy", "reload", "--config", str(other)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert f"runs {daemon.config_path}, not {other}" in result.stderr
    assert daemon.attempt() == 0


# ---- worker processes ----------------------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return {int(line) for line in out.split()}


def test_with_workers_every_worker_ends_up_on_the_new_config(daemon_factory, test_pki, backends):
    first, second = backends
    only = {"mode": "require", "trusted_ca": str(test_pki.client_ca)}
    daemon = daemon_factory([listener("api", test_pki, first.address,
                                      client_auth={**only, "allow": {"common_names": ["alice"]}})], workers=2)
    poll_until(lambda: len(children(daemon.proc.pid)) == 3, what="two workers and the admin child")
    before = children(daemon.proc.pid)
    port = daemon.listener_port("api")
    alice, bob = client_context(test_pki, test_pki.alice), client_context(test_pki, test_pki.bob)
    with connect_tls(port, alice, timeout=CLIENT_TIMEOUT) as open_one:
        assert ask(open_one, b"one") == b"A:one"
        config = edited(daemon.config)
        config["listeners"][0]["client_auth"] = {**only, "allow": {"common_names": ["bob"]}}
        config["listeners"].append(listener("extra", test_pki, second.address))
        daemon.write(config)
        last = daemon.reload()
        assert last["result"] == "success"
        assert daemon.status()["pid"] == daemon.proc.pid  # the supervisor takes the signals
        # The old generation drains: the one worker with a connection waits for it, the other is gone.
        poll_until(lambda: len(children(daemon.proc.pid) & before) == 1, what="the idle old worker to exit")
        # Connections are spread over the workers by the kernel: none of these reaches an old one.
        for _ in range(16):
            assert answer(port, alice) != b"A:ping"
            assert answer(port, bob) == b"A:ping"
            assert answer(daemon.listener_port("extra"), alice) == b"B:ping"
        assert ask(open_one, b"two") == b"A:two"  # on its old worker, under the old rules
    poll_until(lambda: not children(daemon.proc.pid) & before, what="the old generation to be gone")
    assert len(children(daemon.proc.pid)) == 3
    assert daemon.sample("mtls_proxy_reloads_total", result="success") == 1.0
    assert [e["name"] for e in daemon.status()["listeners"]] == ["api", "extra"]
    assert "Traceback" not in daemon.stderr()


def test_with_workers_a_bad_config_changes_nothing(daemon_factory, test_pki, backends):
    first, second = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)], workers=2)
    poll_until(lambda: len(children(daemon.proc.pid)) == 3, what="two workers and the admin child")
    before = children(daemon.proc.pid)
    alice = client_context(test_pki, test_pki.alice)
    config = edited(daemon.config)
    config["listeners"][0]["backend"]["address"] = second.address
    config["listeners"][0]["tls"]["cert"] = str(test_pki.dir / "missing.crt")
    daemon.write(config)
    last = daemon.reload()
    assert last["result"] == "failure" and "listeners[0].tls.cert: " in last["error"]
    assert daemon.status()["last_reload"]["error"] == last["error"]
    time.sleep(0.5)
    # The workers are the ones from before (a new admin child shows the failure in /status).
    assert len(children(daemon.proc.pid) & before) == 2 and len(children(daemon.proc.pid)) == 3
    for _ in range(8):
        assert answer(daemon.listener_port("api"), alice) == b"A:ping"
    assert daemon.sample("mtls_proxy_reloads_total", result="failure") == 1.0
    assert daemon.sample("mtls_proxy_reloads_total", result="success") == 0.0


def test_with_workers_no_scrape_is_cut_when_a_reload_replaces_the_admin_child(daemon_factory, test_pki, backends):
    """Every reload forks a new admin child on the same socket; the old one finishes what it answers."""
    first, _ = backends
    daemon = daemon_factory([listener("api", test_pki, first.address)], workers=2)
    poll_until(lambda: len(children(daemon.proc.pid)) == 3, what="two workers and the admin child")
    done = threading.Event()
    outcomes: list[str] = []

    def scrape_until_done() -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://{daemon.admin}/metrics", timeout=5) as response:
                    body = response.read()
                outcomes.append("whole" if response.status == 200 and b"mtls_proxy_build_info" in body else "wrong")
            except Exception as exc:  # any failure of a scrape is what this test looks for
                outcomes.append(repr(exc))

    scrapers = [threading.Thread(target=scrape_until_done) for _ in range(3)]
    for thread in scrapers:
        thread.start()
    try:
        for _ in range(4):
            daemon.write(edited(daemon.config))
            assert daemon.reload()["result"] == "success"
    finally:
        done.set()
        for thread in scrapers:
            thread.join(10)
    assert outcomes.count("whole") > 20, outcomes[:5]
    assert [o for o in outcomes if o != "whole"] == [], daemon.stderr()[-3000:]


def test_with_workers_a_backend_that_is_down_shows_in_status(daemon_factory, test_pki):
    closed = f"127.0.0.1:{free_port()}"
    daemon = daemon_factory([listener("api", test_pki, closed)], workers=2)
    alice = client_context(test_pki, test_pki.alice)
    for _ in range(4):
        assert answer(daemon.listener_port("api"), alice) == "closed"
    error = poll_until(lambda: daemon.status()["listeners"][0]["last_backend_error"], timeout=10,
                       what="the backend error gathered from the workers")
    assert f"connect to {closed} failed" in error["error"]
    poll_until(lambda: daemon.sample("mtls_proxy_backend_connect_failures_total", listener="api") == 4.0,
               what="four failures summed over the workers")
