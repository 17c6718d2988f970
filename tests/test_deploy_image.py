"""The container image, built and run for real: no Docker engine, no image registry.

deploy/build-image.sh --local-base makes a Debian base image with debootstrap (cached in podman's store under a
tag keyed by a hash of its recipe, so only the first run on a machine pays for it), then builds the Dockerfile
with `podman build --isolation chroot`. The test then runs the image the way the Kubernetes example does: the
sidecar config from deploy/kubernetes/mtls-proxy.yaml, the certificates in cert-manager's Secret layout, a
read-only root filesystem, every capability dropped, no privilege escalation, the image's own non-root user. It
completes mTLS handshakes through it from the host, scrapes its /metrics, runs its HEALTHCHECK and stops it with
SIGTERM (a drain, exit 0).

Two settings adapt podman to this kind of machine and are harmless elsewhere: `--runtime runc`, and explicit
ulimits no higher than the current ones (podman's defaults, nofile=1048576 and nproc=4194304, need
CAP_SYS_RESOURCE, which a CI sandbox may not grant: runc then fails with "error setting rlimit type 7:
operation not permitted"). `--network host` lets the container reach the test's backend on 127.0.0.1, as the
proxy reaches the application in a pod.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import (
    PROXY_UID,
    REPO,
    find_tool,
    free_port,
    http_get,
    run,
    sidecar_config,
    wait_until,
    write_cert_manager_secret,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

IMAGE = "localhost/mtls-proxy:test"
CONTAINER = "mtls-proxy-test"
BUILD_TIMEOUT = 1100.0  # the first run on a machine debootstraps the base image (about a minute here)


def podman() -> str:
    find_tool("runc")
    find_tool("debootstrap")
    return find_tool("podman")


@pytest.fixture(scope="module")
def image() -> str:
    tool = podman()
    started = time.monotonic()
    result = run(["bash", str(REPO / "deploy" / "build-image.sh"), "--local-base", "--tag", IMAGE],
                 timeout=BUILD_TIMEOUT, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == IMAGE
    print(f"\nimage built in {time.monotonic() - started:.1f} s")
    # Earlier builds of the same tag leave untagged images behind. Those of the last day are the layer cache
    # of the next build (pruning them costs the next run its pip install); older ones go.
    run([tool, "image", "prune", "--force", "--filter", "until=24h"], check=False)
    return IMAGE


def inspect(tool: str, ref: str) -> dict:
    return json.loads(run([tool, "image", "inspect", ref]).stdout)[0]


def test_image_metadata(image):
    tool = podman()
    document = inspect(tool, image)
    config = document["Config"]
    assert config["User"] == f"{PROXY_UID}:{PROXY_UID}"
    assert config["Entrypoint"] == ["mtls-proxy"]
    assert config["Cmd"] == ["run", "--config", "/etc/mtls-proxy/config.yaml"]
    assert set(config["ExposedPorts"]) == {"8443/tcp", "9090/tcp"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MTLS_PROXY_HEALTHCHECK_URL"] == "http://127.0.0.1:9090/healthz"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["PYTHONMALLOC"] == "malloc"  # memory goes back after a burst (bench/README.md, "Memory after a burst")
    # podman reports the Docker-format HEALTHCHECK beside Config.
    healthcheck = document["Healthcheck"]
    assert healthcheck["Test"][:2] == ["CMD", "python3"] and "MTLS_PROXY_HEALTHCHECK_URL" in healthcheck["Test"][-1]
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "mtls-proxy"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])


def container_run(tool: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    argv = [tool, "run", "--rm", "--runtime", "runc", *ulimits(), "--network", "host", "--read-only",
            "--health-interval", "disable"]
    if entrypoint:
        argv += ["--entrypoint", entrypoint]
    return run([*argv, IMAGE, *args], check=False)


def ulimits() -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    soft = min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", "nproc=4096:4096"]


def test_image_holds_no_build_tools_or_package_manager(image):
    tool = podman()
    probe = ("import importlib.util, os, shutil, sys; "
             "print(json.dumps({'pip': importlib.util.find_spec('pip') is not None, "
             "'setuptools': importlib.util.find_spec('setuptools') is not None, "
             "'compilers': [c for c in ('gcc', 'cc', 'make') if shutil.which(c)], "
             "'proxy': importlib.util.find_spec('proxy').origin, 'uid': os.getuid(), "
             "'python': sys.version_info[:2]}))")
    result = container_run(tool, "-c", "import json; " + probe, entrypoint="python3")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {"pip": False, "setuptools": False, "compilers": [], "uid": PROXY_UID,
                     "proxy": facts["proxy"], "python": facts["python"]}
    assert facts["proxy"].startswith("/opt/venv/lib/") and tuple(facts["python"]) >= (3, 11)


def test_image_check_command_runs_read_only(image):
    result = container_run(podman(), "--help")
    assert result.returncode == 0 and "run" in result.stdout and "check" in result.stdout, result.stderr


@contextlib.contextmanager
def running_container(tool: str, args: list[str]) -> Iterator[str]:
    subprocess.run([tool, "rm", "--force", CONTAINER], capture_output=True, timeout=60)
    run([tool, "run", "--detach", "--name", CONTAINER, *args, IMAGE])
    try:
        yield CONTAINER
    finally:
        logs = subprocess.run([tool, "logs", CONTAINER], capture_output=True, text=True, timeout=60)
        print(f"--- container log\n{logs.stdout}{logs.stderr}")
        subprocess.run([tool, "rm", "--force", "--time", "5", CONTAINER], capture_output=True, timeout=60)


GREETING = "hello from the application\n"


class Application(http.server.ThreadingHTTPServer):
    """The application behind the sidecar: a plain HTTP server on 127.0.0.1."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = GREETING.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def mtls_get(port: int, ca: Path, cert: Path | None, key: Path | None) -> str:
    """GET / through the proxy with Python's ssl: the response body, or why the handshake was refused."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert:
        context.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\nhost: localhost\r\n\r\n")
                response = b""
                while chunk := tls.recv(4096):
                    response += chunk
    except ssl.SSLError as exc:
        return f"refused: {exc.reason}"
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def test_container_serves_mtls_and_metrics(image, tmp_path):
    tool = podman()
    # A dev PKI from the CLI, laid out as cert-manager's Secret: tls.crt, tls.key, ca.crt. The Secret's files
    # are group-readable by the pod's fsGroup (defaultMode 0440); the same here, with the image's group.
    pki_dir = tmp_path / "pki"
    run([sys.executable, "-m", "proxy", "certs", "init", str(pki_dir)])
    secret = tmp_path / "tls"
    write_cert_manager_secret(pki_dir, secret)
    for path in secret.iterdir():
        shutil.chown(path, user=0, group=PROXY_UID)
        path.chmod(0o440)
    backend = Application()
    tls_port, admin_port = free_port(), free_port()
    # The Kubernetes example's config as it is, but for the ports (the host network is shared) and the backend.
    config = sidecar_config(Path("/etc/mtls-proxy/tls"), admin=f"127.0.0.1:{admin_port}",
                            listen=f"127.0.0.1:{tls_port}", backend=f"127.0.0.1:{backend.port}")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    config_path.chmod(0o444)

    args = ["--runtime", "runc", *ulimits(), "--network", "host",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            # No systemd timer here to run the health check periodically; the test runs it once, by hand.
            "--health-interval", "disable",
            "--env", f"MTLS_PROXY_HEALTHCHECK_URL=http://127.0.0.1:{admin_port}/healthz",
            "--volume", f"{config_path}:/etc/mtls-proxy/config.yaml:ro",
            "--volume", f"{secret}:/etc/mtls-proxy/tls:ro"]
    with running_container(tool, args) as name:
        def state() -> dict:
            return json.loads(run([tool, "inspect", name]).stdout)[0]["State"]

        wait_until(lambda: not state()["Running"] or http_get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200,
                   timeout=30, what="the container to be ready")
        if not state()["Running"]:
            logs = run([tool, "logs", name], check=False)
            pytest.fail(f"the container exited: {state()}\n{logs.stdout}{logs.stderr}")

        # mTLS through the container, from the host; without a client certificate: refused in the handshake.
        assert mtls_get(tls_port, pki_dir / "ca.crt", pki_dir / "client.crt", pki_dir / "client.key") == GREETING
        assert mtls_get(tls_port, pki_dir / "ca.crt", None, None).startswith("refused")
        # The README's curl command, as a user would type it.
        curl = run([find_tool("curl"), "--silent", "--show-error", "--max-time", "10",
                    "--cacert", str(pki_dir / "ca.crt"), "--cert", str(pki_dir / "client.crt"),
                    "--key", str(pki_dir / "client.key"), f"https://localhost:{tls_port}/"])
        assert curl.stdout == GREETING

        # Its metrics: the handshakes above, by result and reason, and the certificates it loaded.
        status, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
        assert status == 200
        metrics = body.decode()
        assert 'mtls_proxy_handshakes_total{listener="app",result="success"} 2.0' in metrics
        assert 'mtls_proxy_handshake_failures_total{listener="app",reason="no_client_cert"} 1.0' in metrics
        assert re.search(r'mtls_proxy_certificate_expiry_timestamp_seconds\{listener="app",role="server",', metrics)
        promtool = shutil.which("promtool")
        if promtool:
            lint = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True,
                                  timeout=30)
            assert lint.returncode == 0, lint.stdout + lint.stderr

        # The image's HEALTHCHECK, run by podman inside the container.
        health = run([tool, "healthcheck", "run", name], check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        # SIGTERM (podman stop) drains and exits 0.
        run([tool, "stop", "--time", "30", name], timeout=60)
        final = state()
        assert final["ExitCode"] == 0, final
        logs = run([tool, "logs", name]).stdout + run([tool, "logs", name]).stderr
        assert "SIGTERM: draining" in logs
