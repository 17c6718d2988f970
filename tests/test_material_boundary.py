"""Odd TLS material in every field: `check` explains it, a live reload keeps the old material serving.

The cases are generated: each material field (tls.cert, tls.key, client_auth.trusted_ca, advertised_ca, crl)
gets odd inputs (weak RSA 1024, DSA, Ed448, Ed25519, small and odd curves, truncated or garbled PEM, a certificate
and key of different kinds, the wrong kind of PEM block). Each input goes to `mtls-proxy check` in its own folder
(all the processes run at once) and to a SIGHUP reload of one running `mtls-proxy run`.

Some inputs are accepted on purpose, decided from what OpenSSL really does (measured; see proxy/config/materials.py):
an Ed448 or Ed25519 server key serves TLS 1.2 and 1.3; a DSA, Ed448 or brainpoolP256r1 CA verifies the clients it
issued; an RSA 1024 CA in advertised_ca only lends its name to the CertificateRequest. For those the test asserts
that the new material is served, not refused. Refused: keys under OpenSSL's security level (RSA 1024, secp192r1),
server keys no client can use (DSA, brainpoolP256r1; every handshake failed), and files that are not what the
field needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from proxy.config.materials import ListenerMaterials, ServerCredentials
from proxy.config.schema import ConfigError, parse
from proxy.dev import pki
from proxy.tls.context import build_server_tls

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds for one `check` or daemon start; each takes well under one
RELOAD_TIMEOUT = 10  # seconds for a reload to show in /metrics

BASE_FILES = ("server.crt", "server.key", "client-ca.crt", "advertised.crt", "crl.pem")
FIELD_FILE = {
    "tls.cert": "server.crt",
    "tls.key": "server.key",
    "client_auth.trusted_ca": "client-ca.crt",
    "client_auth.advertised_ca": "advertised.crt",
    "client_auth.crl": "crl.pem",
}


# ---- certificates -------------------------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _digest_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    # EdDSA signs the message itself; every other kind signs a SHA-256 digest.
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _certificate(subject: str, public_key, issuer: x509.Name, issuer_key, *, ca: bool,
                 eku: x509.ObjectIdentifier | None = None, dns: str | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, _digest_for(issuer_key))


@dataclass(frozen=True)
class Client:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Case:
    """One odd input: the files it replaces, and what must happen."""

    id: str
    field: str  # the config field the message must name
    files: dict[str, bytes]
    accepted: bool = False
    expect: tuple[str, ...] = ()  # parts of the message, for a refused input
    served_der: bytes | None = None  # accepted server material: the certificate that must be served
    client: Client | None = None  # accepted trust material: a client that must get through


@dataclass
class Material:
    server_ca: pki.Issued
    client_ca: pki.Issued
    base: dict[str, bytes]
    base_client: Client
    cases: list[Case] = field(default_factory=list)


def _server_pair(server_ca: pki.Issued, key) -> tuple[bytes, bytes, bytes]:
    """(cert PEM, key PEM, cert DER) of a localhost server certificate for ``key``, issued by the server CA."""
    cert = _certificate("localhost", key.public_key(), server_ca.cert.subject, server_ca.key, ca=False,
                        eku=ExtendedKeyUsageOID.SERVER_AUTH, dns="localhost")
    return _pem(cert), _key_pem(key), cert.public_bytes(serialization.Encoding.DER)


def _ca_with_client(name: str, key) -> tuple[bytes, Client]:
    """A self-signed CA with ``key``, and a client (EC P-256) it issued."""
    ca = _certificate(name, key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key,
                      ca=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(f"client of {name}", client_key.public_key(), ca.subject, key, ca=False,
                          eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    return _pem(ca), Client(_pem(client), _key_pem(client_key))


def _with_undecodable_extension(name: str, key, issuer: x509.Name | None = None, issuer_key=None) -> x509.Certificate:
    """A certificate whose basicConstraints is three bytes of garbage: cryptography loads it, then fails to decode
    the extension on first access."""
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x01\x02\x03"), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(issuer_key or key, hashes.SHA256())
    )


def _truncated(pem: bytes) -> bytes:
    return pem[: len(pem) // 2]


def _garbled(label: str) -> bytes:
    """A PEM block whose base64 body decodes to text, not DER."""
    return f"-----BEGIN {label}-----\nTm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END {label}-----\n".encode()


def _build_material() -> Material:
    server_ca = pki.make_ca("Boundary Server CA")
    client_ca = pki.make_ca("Boundary Client CA")
    server = pki.make_server_cert(server_ca)
    alice = pki.make_client_cert(client_ca, common_name="alice")
    other_ca = pki.make_ca("Boundary Other CA")
    base = {
        "server.crt": server.chain_pem(),
        "server.key": server.key_pem(),
        "client-ca.crt": client_ca.cert_pem(),
        "advertised.crt": client_ca.cert_pem(),
        "crl.pem": pki.crl_pem(pki.make_crl(client_ca, [])),
    }
    material = Material(server_ca, client_ca, base, Client(alice.chain_pem(), alice.key_pem()))

    keys = {
        "rsa1024": rsa.generate_private_key(65537, 1024),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "dsa2048": dsa.generate_private_key(2048),
        "ed448": ed448.Ed448PrivateKey.generate(),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "secp192r1": ec.generate_private_key(ec.SECP192R1()),
        "brainpoolP256r1": ec.generate_private_key(ec.BrainpoolP256R1()),
    }
    add = material.cases.append

    # tls.cert and tls.key
    def server_case(id: str, key_name: str, *, accepted: bool = False, expect: tuple[str, ...] = ()) -> None:
        cert, key, der = _server_pair(server_ca, keys[key_name])
        add(Case(id, "tls.cert", {"server.crt": cert, "server.key": key}, accepted=accepted, expect=expect,
                 served_der=der if accepted else None))

    server_case("server-rsa1024", "rsa1024", expect=("key too small: RSA 1024 bits", "needs 2048 or more"))
    server_case("server-secp192r1", "secp192r1", expect=("key too small: EC secp192r1",))
    server_case("server-dsa", "dsa2048", expect=("DSA 2048 bits", "every handshake would fail"))
    server_case("server-brainpool", "brainpoolP256r1", expect=("curve brainpoolP256r1", "every handshake would fail"))
    server_case("server-ed448", "ed448", accepted=True)
    server_case("server-ed25519", "ed25519", accepted=True)
    rsa_cert, _, _ = _server_pair(server_ca, keys["rsa2048"])
    add(Case("server-rsa-cert-ec-key", "tls.key", {"server.crt": rsa_cert, "server.key": base["server.key"]},
             expect=("does not match the certificate", "RSA 2048 bits in the certificate, EC secp256r1 in the key")))
    add(Case("server-cert-truncated", "tls.cert", {"server.crt": _truncated(base["server.crt"])},
             expect=("contains no certificate",)))
    add(Case("server-cert-garbled", "tls.cert", {"server.crt": _garbled("CERTIFICATE")},
             expect=("not a valid X.509 certificate",)))
    add(Case("server-cert-empty", "tls.cert", {"server.crt": b""}, expect=("not a PEM file",)))
    odd_key = ec.generate_private_key(ec.SECP256R1())
    add(Case("server-cert-undecodable-extension", "tls.cert", {
        "server.crt": _pem(_with_undecodable_extension("localhost", odd_key, server_ca.cert.subject, server_ca.key)),
        "server.key": _key_pem(odd_key)}, expect=("cannot be decoded",)))
    add(Case("server-key-truncated", "tls.key", {"server.key": _truncated(base["server.key"])},
             expect=("contains no private key",)))
    add(Case("server-key-is-a-certificate", "tls.key", {"server.key": base["server.crt"]},
             expect=("contains no private key (PEM blocks found: CERTIFICATE)",)))

    # client_auth.trusted_ca and client_auth.advertised_ca
    def ca_case(id: str, field_name: str, key_name: str, *, accepted: bool = False,
                expect: tuple[str, ...] = ()) -> None:
        ca, client = _ca_with_client(f"{key_name} CA", keys[key_name])
        trusts = field_name == "client_auth.trusted_ca"
        add(Case(id, field_name, {FIELD_FILE[field_name]: ca}, accepted=accepted, expect=expect,
                 client=client if accepted and trusts else None))

    ca_case("trusted-rsa1024", "client_auth.trusted_ca", "rsa1024", expect=("key too small: RSA 1024 bits",))
    ca_case("trusted-secp192r1", "client_auth.trusted_ca", "secp192r1", expect=("key too small: EC secp192r1",))
    ca_case("trusted-dsa", "client_auth.trusted_ca", "dsa2048", accepted=True)
    ca_case("trusted-ed448", "client_auth.trusted_ca", "ed448", accepted=True)
    ca_case("trusted-brainpool", "client_auth.trusted_ca", "brainpoolP256r1", accepted=True)
    add(Case("trusted-truncated", "client_auth.trusted_ca", {"client-ca.crt": _truncated(base["client-ca.crt"])},
             expect=("contains no certificate",)))
    add(Case("trusted-a-leaf", "client_auth.trusted_ca", {"client-ca.crt": material.base_client.cert},
             expect=("is not a CA certificate",)))
    add(Case("trusted-undecodable-extension", "client_auth.trusted_ca",
             {"client-ca.crt": _pem(_with_undecodable_extension("Odd CA", ec.generate_private_key(ec.SECP256R1())))},
             expect=("cannot be decoded",)))
    ca_case("advertised-rsa1024", "client_auth.advertised_ca", "rsa1024", accepted=True)
    ca_case("advertised-ed448", "client_auth.advertised_ca", "ed448", accepted=True)
    add(Case("advertised-truncated", "client_auth.advertised_ca",
             {"advertised.crt": _truncated(base["advertised.crt"])}, expect=("contains no certificate",)))

    # client_auth.crl
    add(Case("crl-truncated", "client_auth.crl", {"crl.pem": _truncated(base["crl.pem"])},
             expect=("contains no CRL",)))
    add(Case("crl-der-garbage", "client_auth.crl", {"crl.pem": b"\x30\x03\x02\x01"}, expect=("not a CRL",)))
    add(Case("crl-is-a-certificate", "client_auth.crl", {"crl.pem": base["client-ca.crt"]},
             expect=("contains no CRL (PEM blocks found: CERTIFICATE)",)))
    add(Case("crl-of-another-ca", "client_auth.crl", {"crl.pem": pki.crl_pem(pki.make_crl(other_ca, []))},
             accepted=True))
    return material


@pytest.fixture(scope="module")
def material() -> Material:
    return _build_material()


# The ids, known at collection time; the material (a DSA key takes half a second) is made once, by the fixture.
_CASE_IDS = [
    "server-rsa1024", "server-secp192r1", "server-dsa", "server-brainpool", "server-ed448", "server-ed25519",
    "server-rsa-cert-ec-key", "server-cert-truncated", "server-cert-garbled", "server-cert-empty",
    "server-cert-undecodable-extension", "server-key-truncated", "server-key-is-a-certificate",
    "trusted-rsa1024", "trusted-secp192r1", "trusted-dsa", "trusted-ed448", "trusted-brainpool", "trusted-truncated",
    "trusted-a-leaf", "trusted-undecodable-extension", "advertised-rsa1024", "advertised-ed448", "advertised-truncated",
    "crl-truncated", "crl-der-garbage", "crl-is-a-certificate", "crl-of-another-ca",
]


def test_every_generated_case_is_parametrized(material):
    assert [case.id for case in material.cases] == _CASE_IDS


def _case(material: Material, case_id: str) -> Case:
    return next(case for case in material.cases if case.id == case_id)


# ---- configs on disk ----------------------------------------------------------------------------------------


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)


def _config(directory: Path, listen: str, admin: str, backend: str) -> dict:
    return {
        "admin": {"listen": admin},
        "reload": {"watch_interval": 0},  # SIGHUP only: each case reloads exactly once
        "log": {"level": "info", "format": "json"},
        "listeners": [{
            "name": "boundary",
            "listen": listen,
            "tls": {"cert": str(directory / "server.crt"), "key": str(directory / "server.key")},
            "client_auth": {
                "mode": "require",
                "trusted_ca": str(directory / "client-ca.crt"),
                "advertised_ca": str(directory / "advertised.crt"),
                "crl": str(directory / "crl.pem"),
            },
            "backend": {"address": backend, "connect_timeout": 2},
            "timeouts": {"handshake": 5, "idle": 30},
        }],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


# ---- `check`, every case at once ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_runs(material, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Each case in its own folder, every `check` process at once (bounded by TIMEOUT each)."""

    def run(case: Case) -> tuple[Path, subprocess.CompletedProcess[str]]:
        directory = tmp_path_factory.mktemp(case.id)
        _write_files(directory, {**material.base, **case.files})
        config = directory / "proxy.yaml"
        config.write_text(yaml.safe_dump(_config(directory, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")))
        result = subprocess.run(_proxy_argv("check", "--config", str(config)), capture_output=True, text=True,
                                timeout=TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL)
        return directory, result

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {case.id: pool.submit(run, case) for case in material.cases}
        return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_check_explains_odd_material_or_accepts_it(material, check_runs, case_id):
    case = _case(material, case_id)
    directory, result = check_runs[case_id]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    if case.accepted:
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
        return
    assert result.returncode == 2, (result.stdout, result.stderr)
    path = directory / FIELD_FILE[case.field]
    assert f"listeners[0].{case.field}: {path}: " in result.stderr, result.stderr
    for part in case.expect:
        assert part in result.stderr, f"{part!r} not in:\n{result.stderr}"


def test_run_refuses_what_check_refuses_before_binding(check_runs):
    directory, _ = check_runs["server-rsa1024"]
    result = subprocess.run(_proxy_argv("run", "--config", str(directory / "proxy.yaml")), capture_output=True,
                            text=True, timeout=TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"listeners[0].tls.cert: {directory / 'server.crt'}: server certificate key too small" in result.stderr


# ---- a running daemon, reloaded with each case ----------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@dataclass
class Daemon:
    directory: Path
    proc: subprocess.Popen
    port: int
    admin: str
    server_ca: Path

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as response:
            return response.read()

    def reloads(self, result: str) -> float:
        text = self.get("/metrics").decode()
        match = re.search(rf'^mtls_proxy_reloads_total{{result="{result}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    def reload(self, result: str) -> None:
        """SIGHUP, then wait until the reload is counted under ``result`` (and not under the other one)."""
        other = "failure" if result == "success" else "success"
        before, other_before = self.reloads(result), self.reloads(other)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while self.reloads(result) == before:
            assert self.reloads(other) == other_before, f"the reload was counted as {other}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no reload counted within {RELOAD_TIMEOUT}s:\n{self.stderr()}"
            time.sleep(0.02)

    def stderr(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")

    def handshake(self, client: Client) -> str:
        """Connect as ``client``, echo a byte through the backend; the served certificate's SHA-256."""
        ctx = ssl.create_default_context(cafile=str(self.server_ca))
        cert, key = self.directory / "client.crt", self.directory / "client.key"
        _write_files(self.directory, {"client.crt": client.cert, "client.key": client.key})
        ctx.load_cert_chain(str(cert), str(key))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"x")
                assert tls.recv(1) == b"x"  # verified and forwarded
                return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


@pytest.fixture(scope="module")
def daemon(material, tmp_path_factory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("daemon")
    _write_files(directory, material.base)
    (directory / "server-ca.crt").write_bytes(material.server_ca.cert_pem())
    backend = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port, admin = _free_port(), f"127.0.0.1:{_free_port()}"
    config = directory / "proxy.yaml"
    config.write_text(yaml.safe_dump(_config(directory, f"127.0.0.1:{port}", admin,
                                             f"127.0.0.1:{backend.server_address[1]}")))
    with open(directory / "stderr.log", "wb") as err:
        proc = subprocess.Popen(_proxy_argv("run", "--config", str(config)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    running = Daemon(directory, proc, port, admin, directory / "server-ca.crt")
    try:
        _wait_ready(running)
        yield running
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}:\n{running.stderr()}"
        assert "Traceback" not in running.stderr(), running.stderr()
    finally:
        proc.kill()
        proc.wait(10)
        backend.shutdown()
        backend.server_close()


def _wait_ready(daemon: Daemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if daemon.get("/readyz"):
                return
        except OSError:
            pass
        if daemon.proc.poll() is not None:
            pytest.fail(f"the daemon exited with {daemon.proc.returncode}:\n{daemon.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the daemon was not ready after {TIMEOUT}s:\n{daemon.stderr()}")
        time.sleep(0.03)


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_reload_keeps_serving_through_odd_material(material, daemon, case_id):
    case = _case(material, case_id)
    base_fingerprint = hashlib.sha256(x509.load_pem_x509_certificate(material.base["server.crt"])
                                      .public_bytes(serialization.Encoding.DER)).hexdigest()
    assert daemon.handshake(material.base_client) == base_fingerprint
    _write_files(daemon.directory, case.files)
    try:
        if case.accepted:
            daemon.reload("success")
            _assert_served(daemon, material, case)
        else:
            daemon.reload("failure")
            assert daemon.proc.poll() is None, daemon.stderr()
            assert daemon.handshake(material.base_client) == base_fingerprint  # the old material, still
            error = json.loads(daemon.get("/status"))["last_reload"]["error"]
            assert f"listeners[0].{case.field}: {daemon.directory / FIELD_FILE[case.field]}: " in error
            for part in case.expect:
                assert part in error
    finally:
        _write_files(daemon.directory, material.base)
        if case.accepted:
            daemon.reload("success")  # back to the base material for the next case


def _assert_served(daemon: Daemon, material: Material, case: Case) -> None:
    client = case.client or material.base_client
    fingerprint = daemon.handshake(client)
    if case.served_der is not None:
        assert fingerprint == hashlib.sha256(case.served_der).hexdigest()


# ---- the boundary itself, behind materials.py's checks ------------------------------------------------------


def test_build_server_tls_turns_what_openssl_refuses_into_a_config_error(material, tmp_path):
    """materials.py refuses an RSA 1024 server key first; this feeds one past it, as a caller that builds
    ListenerMaterials itself would, and OpenSSL's "ee key too small" must still become a ConfigError."""
    weak = rsa.generate_private_key(65537, 1024)
    cert_pem, key_pem, _ = _server_pair(material.server_ca, weak)
    _write_files(tmp_path, {**material.base, "server.crt": cert_pem, "server.key": key_pem})
    config = parse(_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"), source="test")
    materials = ListenerMaterials(
        server=ServerCredentials(chain=(x509.load_pem_x509_certificate(cert_pem),), key=weak,
                                 cert_path=tmp_path / "server.crt", key_path=tmp_path / "server.key"),
        trusted_ca=(material.client_ca.cert,), advertised_ca=(material.client_ca.cert,), crls=(), warnings=())
    with pytest.raises(ConfigError) as info:
        build_server_tls(config.listeners[0], materials, index=0)
    assert info.value.problems == (
        f"listeners[0].tls.cert: {tmp_path / 'server.crt'}: key too small: RSA 1024 bits; "
        "OpenSSL's security level (2, 112-bit security) needs 2048 or more",
    )
