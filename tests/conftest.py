"""Shared fixtures: a test PKI on disk, an in-process proxy, backends, clients, the access log.

Everything runs over real TLS on real loopback sockets. The proxy runs in the
test's own trio loop (so its metrics registry can be read directly); clients
that must be independent TLS stacks (stdlib ``ssl``, ``openssl s_client``,
``curl``) run in threads or subprocesses.

Backends: ``echo_backend`` runs in the test's trio loop and counts what reaches
it; ``threaded_echo_backend`` runs in a thread, for the tests that drive a
daemon process and have no trio loop of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry

from proxy.config.materials import load_all
from proxy.config.schema import parse
from proxy.daemon.server import Proxy
from proxy.dev import pki
from proxy.ops.metrics import Metrics
from proxy.policy.identity import PeerIdentity

LISTENER = "test"


# ---- PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cred:
    """A certificate file (leaf + intermediates) and its key file."""

    cert: Path
    key: Path
    issued: pki.Issued


@dataclass(frozen=True)
class TestPKI:
    dir: Path
    server_ca: Path       # trusts the proxy's server certificate (clients use it)
    client_ca: Path       # the trusted client CA bundle: "Test Client CA"
    other_ca: Path        # a CA the proxy does not trust
    both_cas: Path        # client CA + other CA, for advertised_ca tests
    server: Cred
    alice: Cred           # CN=alice, OU=payments, O=Acme, URI spiffe://acme/ns/prod/alice, DNS alice.prod.svc
    bob: Cred             # CN=bob, OU=support, O=Acme, URI spiffe://acme/ns/dev/bob
    carol: Cred           # issued by an intermediate of the client CA; presents the intermediate
    untrusted: Cred       # CN=mallory, signed by the other CA
    expired: Cred
    not_yet_valid: Cred
    server_eku: Cred      # a certificate whose extended key usage is serverAuth only
    client_ca_issued: pki.Issued
    intermediate: pki.Issued


# A verified client's identity as the proxy builds it (alice of the test PKI, with fixed values), for the tests of
# the sans-IO relays, which need one without a certificate.
ALICE_IDENTITY = PeerIdentity(
    subject="CN=alice,OU=payments,O=Acme",
    issuer="CN=Acme Clients CA,O=Acme",
    serial="1d2c3b4a",
    sha256="ab" * 32,
    not_before=datetime(2024, 1, 1, tzinfo=UTC),
    not_after=datetime(2034, 1, 1, tzinfo=UTC),
    common_names=("alice",),
    organizational_units=("payments",),
    organizations=("Acme",),
    dns_sans=("alice.prod.svc",),
    uri_sans=("spiffe://acme/ns/prod/sa/alice",),
    ip_sans=(),
    email_sans=(),
    chain_issuers=("CN=Acme Clients CA,O=Acme",),
)


def _write(dir: Path, name: str, issued: pki.Issued) -> Cred:
    cert, key = dir / f"{name}.crt", dir / f"{name}.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return Cred(cert, key, issued)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory) -> TestPKI:
    d = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)
    server_ca = pki.make_ca("Test Server CA", organization="Acme")
    client_ca = pki.make_ca("Test Client CA", organization="Acme")
    other_ca = pki.make_ca("Other CA", organization="Elsewhere")
    intermediate = pki.make_ca("Test Client Intermediate", organization="Acme", parent=client_ca)

    (d / "server-ca.crt").write_bytes(server_ca.cert_pem())
    (d / "client-ca.crt").write_bytes(client_ca.cert_pem())
    (d / "other-ca.crt").write_bytes(other_ca.cert_pem())
    (d / "both-cas.crt").write_bytes(client_ca.cert_pem() + other_ca.cert_pem())

    def client(ca, cn, **kw):
        return pki.make_client_cert(ca, common_name=cn, organization="Acme", **kw)

    return TestPKI(
        dir=d,
        server_ca=d / "server-ca.crt",
        client_ca=d / "client-ca.crt",
        other_ca=d / "other-ca.crt",
        both_cas=d / "both-cas.crt",
        server=_write(d, "server", pki.make_server_cert(server_ca)),
        alice=_write(d, "alice", client(client_ca, "alice", organizational_unit="payments",
                                        uris=("spiffe://acme/ns/prod/alice",), dns_names=("alice.prod.svc",))),
        bob=_write(d, "bob", client(client_ca, "bob", organizational_unit="support", uris=("spiffe://acme/ns/dev/bob",))),
        carol=_write(d, "carol", client(intermediate, "carol", organizational_unit="payments")),
        untrusted=_write(d, "untrusted", client(other_ca, "mallory")),
        expired=_write(d, "expired", client(client_ca, "expired", not_before=now - timedelta(days=30),
                                            not_after=now - timedelta(days=1))),
        not_yet_valid=_write(d, "not-yet-valid", client(client_ca, "future", not_before=now + timedelta(days=1),
                                                        not_after=now + timedelta(days=30))),
        server_eku=_write(d, "server-eku", client(client_ca, "server-only",
                                                  extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,))),
        client_ca_issued=client_ca,
        intermediate=intermediate,
    )


# ---- backends ------------------------------------------------------------------


@dataclass
class Backend:
    """A plain TCP backend in the test's trio loop; counts what reaches it."""

    port: int = 0
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _connection_handler(backend: Backend, handler):
    """Serves one backend connection: counts it, runs ``handler``, closes; a peer that breaks off ends it quietly."""

    async def run(stream) -> None:
        backend.accepted += 1
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await handler(stream, backend)

    return run


async def _serve_backend(backend: Backend, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend.port = listeners[0].socket.getsockname()[1]
    task_status.started(backend)
    await trio.serve_listeners(_connection_handler(backend, handler), listeners)


async def serve_listeners_as_backend(nursery, listeners, handler) -> Backend:
    """Like the backends above, on listeners the test made (fixed port, Unix socket)."""
    backend = Backend()
    nursery.start_soon(trio.serve_listeners, _connection_handler(backend, handler), listeners)
    await trio.testing.wait_all_tasks_blocked()
    return backend


async def echo_handler(stream: trio.SocketStream, backend: Backend) -> None:
    """Echo every byte; on the client's EOF, half-close back."""
    while data := await stream.receive_some(65536):
        backend.received += data
        await stream.send_all(data)
    await stream.send_eof()


@pytest.fixture
async def echo_backend(nursery) -> Backend:
    return await nursery.start(_serve_backend, Backend(), echo_handler)


async def start_backend(nursery, handler) -> Backend:
    return await nursery.start(_serve_backend, Backend(), handler)


class _EchoRequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(30)
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def threaded_echo_backend() -> Iterator[str]:
    """An echo backend in threads of the test process, for tests of a daemon process (they have no trio loop to
    run ``echo_backend`` in); its ``host:port``. On the client's EOF it half-closes back."""
    server = _ThreadingTCPServer(("127.0.0.1", 0), _EchoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    """A port that was free a moment ago (for configs that need a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubernetes_secret(root: Path, version: str, issued: pki.Issued, ca_pem: bytes) -> None:
    """Lay out a Secret the way the kubelet does: files in a timestamped folder,
    `..data` pointing at it, and the visible names pointing through `..data`."""
    folder = root / f"..{version}"
    folder.mkdir()
    (folder / "tls.crt").write_bytes(issued.chain_pem())
    (folder / "tls.key").write_bytes(issued.key_pem())
    (folder / "ca.crt").write_bytes(ca_pem)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(folder.name)
    os.replace(tmp_link, root / "..data")  # the atomic swap
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


# ---- the proxy -----------------------------------------------------------------


@dataclass
class RunningProxy:
    proxy: Proxy
    port: int
    registry: CollectorRegistry
    admin: str | None

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value (0 when the series does not exist yet)."""
        labels.setdefault("listener", LISTENER)
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def failures(self, reason: str) -> float:
        return self.metric("mtls_proxy_handshake_failures_total", reason=reason)


def listener_config(test_pki: TestPKI, backend_address: str, **overrides: Any) -> dict:
    """A listener dict for config.parse(); nested dicts in overrides merge."""
    base: dict[str, Any] = {
        "name": LISTENER,
        "listen": "127.0.0.1:0",
        "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
        "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
        "backend": {"address": backend_address, "connect_timeout": 2},
        "timeouts": {"handshake": 5, "idle": 30},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


async def start_proxy(nursery, test_pki: TestPKI, backend_address: str, *, admin: bool = False,
                      top: dict | None = None, **overrides: Any) -> RunningProxy:
    """Run a proxy with one listener named "test"; ``top`` adds top-level
    config keys, the keyword arguments override the listener's."""
    config = parse(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "reload": {"watch_interval": 0},
            **(top or {}),
            "listeners": [listener_config(test_pki, backend_address, **overrides)],
        },
        source="test",
    )
    registry = CollectorRegistry()
    proxy = Proxy(config, load_all(config), metrics=Metrics(registry), admin=admin)
    bound = await nursery.start(proxy.run)
    port = int(bound.listeners[LISTENER][0].rsplit(":", 1)[1])
    return RunningProxy(proxy=proxy, port=port, registry=registry, admin=bound.admin)


def poll_until(predicate, timeout: float = 5.0, interval: float = 0.02, what: str = ""):
    """Blocking form of wait_for, for tests that drive separate processes:
    poll until predicate() returns something truthy, and return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll until predicate() is true: the proxy records metrics just after
    the client sees the outcome, so tests wait for them rather than race."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# ---- clients -------------------------------------------------------------------


def client_context(test_pki: TestPKI, cred: Cred | None = None, *, version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(test_pki.server_ca))
    if cred is not None:
        ctx.load_cert_chain(str(cred.cert), str(cred.key))
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@dataclass
class ClientResult:
    ok: bool
    data: bytes = b""
    error: str = ""
    version: str | None = None


def tls_exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", *, expect: int | None = None,
                 timeout: float = 10.0) -> ClientResult:
    """Blocking client (run it in a thread): connect, send payload, read back.

    With TLS 1.3 a rejected client certificate is reported by the server
    after the client's handshake has finished, so the failure shows up on
    the first read: the whole exchange is one attempt, and any error fails it.
    """
    expect = len(payload) if expect is None else expect
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                version = tls.version()
                tls.sendall(payload)
                got = bytearray()
                while len(got) < expect:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                if len(got) < expect:
                    return ClientResult(False, bytes(got), "connection closed early", version)
                return ClientResult(True, bytes(got), "", version)
    except (OSError, ssl.SSLError) as exc:
        return ClientResult(False, b"", f"{type(exc).__name__}: {exc}")


async def exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", **kw) -> ClientResult:
    return await trio.to_thread.run_sync(lambda: tls_exchange(port, ctx, payload, **kw))


def served_fingerprint(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", *, timeout: float = 10.0) -> str:
    """SHA-256 (hex) of the certificate the proxy on ``port`` serves to a new connection (blocking: run it in a
    thread from trio).

    The connection must be admitted and reach an echo backend: ``payload`` goes there and back, or an assertion
    fails (with TLS 1.3 a refused client certificate shows only once the client reads).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = tls.recv(len(payload) - len(got))
                assert chunk, "the proxy closed the connection"
                got += chunk
            assert got == payload
            der = tls.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


# ---- the access log ------------------------------------------------------------


class AccessLog:
    """The ``proxy.access`` records caplog captured: one per finished connection, its fields in ``fields``."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    @property
    def records(self) -> list[logging.LogRecord]:
        return [r for r in self._caplog.records if r.name == "proxy.access"]

    @property
    def fields(self) -> list[dict]:
        return [r.fields for r in self.records]

    async def wait(self, count: int = 1) -> list[dict]:
        """The fields, once ``count`` connections have completely finished (the line is their last act)."""
        await wait_for(lambda: len(self.records) >= count)
        return self.fields


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> AccessLog:
    caplog.set_level(logging.INFO, logger="proxy.access")
    return AccessLog(caplog)
