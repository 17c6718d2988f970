"""The client side of one TLS handshake, watched closely: the blocking I/O of ``mtls-proxy probe``.

One call of :func:`attempt` opens one TCP connection, runs the handshake pinned to one TLS version, and then
listens for a moment (or asks one HTTP question) to learn whether the server kept the connection. Everything it
saw goes into an :class:`Observation`; deciding what that means is :mod:`proxy.ops.probe_verdict`'s job.

How the facts are collected, all through pyOpenSSL's public API:

- The server's certificate chain comes from the verify callback, which records OpenSSL's verdict for each
  certificate and always answers "go on": a probe wants to see the client-certificate part of the handshake even
  when the server's own certificate is wrong.
- The info callback reports every handshake state and every alert. "read server certificate request" is how we
  know the server asked for a client certificate, also when its list of CA names is empty; an alert read from the
  server carries its exact code. A completed handshake in which the server sent no Certificate message resumed a
  session (TLS 1.2 abbreviated handshake and TLS 1.3 PSK handshake alike).
- ``Connection.get_client_ca_list()`` returns, on a client, the CA names of the CertificateRequest.

In TLS 1.3 the client's handshake is complete before the server has even read the client's certificate, so a
refusal only arrives afterwards, as an alert on the next read; that is why every handshake is followed by a read.

The socket is non-blocking and every wait is a ``select`` against a deadline, so nothing here waits longer than
the timeout it was given.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from OpenSSL import SSL, crypto

from proxy.ops.probe_certs import DN, dn_from_components
from proxy.tls.classify import openssl_reasons

__all__ = [
    "VERSIONS",
    "ClientSettings",
    "ConnectError",
    "Observation",
    "SettingsError",
    "Target",
    "attempt",
    "build_context",
]

VERSIONS: dict[str, int] = {"1.3": SSL.TLS1_3_VERSION, "1.2": SSL.TLS1_2_VERSION}

# The words OpenSSL's SSL_state_string_long uses for the states we look for (stable since OpenSSL 1.1.0).
_STATE_SERVER_HELLO = b"read server hello"
_STATE_SERVER_CERTIFICATE = b"read server certificate"  # a prefix of two other states: compared by endswith
_STATE_CERTIFICATE_REQUEST = b"read server certificate request"

# What the HTTP question reads at most: enough for nginx's whole error page, which says why it refused.
_HTTP_RESPONSE_LIMIT = 16384

T = TypeVar("T")


class ConnectError(Exception):
    """The TCP connection could not be made (refused, unreachable, unresolvable, timed out)."""


class SettingsError(Exception):
    """OpenSSL cannot use a file we were given; ``option`` names the command-line option it came from."""

    def __init__(self, option: str, reasons: str) -> None:
        super().__init__(f"{option}: {reasons}")
        self.option = option
        self.reasons = reasons


class _Deadline(Exception):
    """A wait reached its deadline."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    servername: str | None  # SNI, and the name the server's certificate is checked against

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ClientSettings:
    cacert: Path | None  # None: the system's trust store
    cert: Path | None
    key: Path | None
    alpn: tuple[str, ...] = ()
    timeout: float = 5.0
    http: bool = False


@dataclass
class Observation:
    """Everything one connection showed. Raw facts; probe_verdict judges them."""

    version_asked: str
    sent_certificate: bool  # a client certificate was configured (OpenSSL sends it when asked)
    server_hello: bool = False
    certificate_requested: bool = False
    server_certificate: bool = False  # the server sent a Certificate message (a resumed handshake does not)
    handshake_done: bool = False
    handshake_seconds: float = 0.0
    ca_names: list[DN] = field(default_factory=list)
    server_chain: list[x509.Certificate] = field(default_factory=list)
    verify_errors: list[tuple[int, int]] = field(default_factory=list)  # (X509 error, depth), in OpenSSL's order
    alerts_read: list[tuple[int, int]] = field(default_factory=list)  # (level, description) the server sent
    alerts_sent: list[tuple[int, int]] = field(default_factory=list)
    alert_after_handshake: bool = False
    timed_out: bool = False
    eof: bool = False  # the TCP connection ended without a TLS alert
    closed_after_handshake: bool = False  # close_notify or EOF while we listened after the handshake
    closed_after_seconds: float | None = None
    data: bytes = b""  # the first bytes the server sent after the handshake
    local_error: str | None = None  # OpenSSL's words for a failure no alert explains
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    http_response: bytes | None = None
    session: SSL.Session | None = None

    @property
    def fatal_alert(self) -> int | None:
        """The description code of the first alert the server sent other than close_notify."""
        for _level, description in self.alerts_read:
            if description != 0:
                return description
        return None


def build_context(settings: ClientSettings, version: str) -> SSL.Context:
    """A client Context pinned to one TLS version. Raises SettingsError for a file OpenSSL cannot use."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(VERSIONS[version])
    ctx.set_max_proto_version(VERSIONS[version])
    with _blaming("--cacert"):
        if settings.cacert is not None:
            ctx.load_verify_locations(str(settings.cacert))
        else:
            ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    ctx.set_info_callback(_info_callback)
    if settings.cert is not None:
        with _blaming("--cert"):
            ctx.use_certificate_chain_file(str(settings.cert))
        with _blaming("--key" if settings.key else "--cert"):
            ctx.use_privatekey_file(str(settings.key or settings.cert))
        with _blaming("--key"):
            ctx.check_privatekey()
    if settings.alpn:
        ctx.set_alpn_protos([name.encode() for name in settings.alpn])
    return ctx


@contextmanager
def _blaming(option: str) -> Iterator[None]:
    try:
        yield
    except SSL.Error as exc:
        raise SettingsError(option, "; ".join(openssl_reasons(exc)) or "OpenSSL refused it") from None


def _observation(conn: SSL.Connection) -> Observation:
    found = conn.get_app_data()
    assert isinstance(found, Observation)
    return found


def _verify_callback(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        _observation(conn).verify_errors.append((errno, depth))
    return True  # see the module docstring: the probe goes on, the verdict is reported


def _info_callback(conn: SSL.Connection, where: int, ret: int) -> None:
    obs = _observation(conn)
    if where & SSL.SSL_CB_ALERT:
        alert = (ret >> 8, ret & 0xFF)
        (obs.alerts_read if where & SSL.SSL_CB_READ else obs.alerts_sent).append(alert)
        if obs.handshake_done and where & SSL.SSL_CB_READ:
            obs.alert_after_handshake = True
    elif where & SSL.SSL_CB_LOOP:
        state = conn.get_state_string()
        if state.endswith(_STATE_SERVER_HELLO):
            obs.server_hello = True
        elif state.endswith(_STATE_CERTIFICATE_REQUEST):
            obs.certificate_requested = True
        elif state.endswith(_STATE_SERVER_CERTIFICATE):
            obs.server_certificate = True


def connect(target: Target, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except socket.gaierror as exc:
        raise ConnectError(f"cannot resolve {target.host}: {exc.strerror}") from None
    except ConnectionRefusedError:
        raise ConnectError(f"connection refused by {target}: nothing listens there") from None
    except TimeoutError:
        raise ConnectError(f"no TCP connection to {target} within {timeout:g} s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {target}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def attempt(
    ctx: SSL.Context,
    target: Target,
    settings: ClientSettings,
    version: str,
    *,
    session: SSL.Session | None = None,
    listen: float | None = None,
) -> Observation:
    """One connection: handshake, then listen for at least ``listen`` seconds (None: not at all), or ask the
    HTTP question. The listening lasts twice the handshake if that is longer, and never more than the timeout.

    Raises ConnectError when the TCP connection cannot be made; every TLS outcome is in the Observation.
    """
    obs = Observation(version_asked=version, sent_certificate=settings.cert is not None)
    sock = connect(target, settings.timeout)
    conn = SSL.Connection(ctx, sock)
    conn.set_app_data(obs)
    conn.set_connect_state()
    if target.servername:
        conn.set_tlsext_host_name(target.servername.encode("idna"))
    if session is not None:
        conn.set_session(session)
    try:
        _handshake(conn, sock, obs, settings.timeout)
        if obs.handshake_done and settings.http and listen is not None:
            _ask_http(conn, sock, obs, target, settings.timeout)
        elif obs.handshake_done and listen is not None:
            # A refusal comes about one round trip after our Finished: on a slow link, wait longer.
            _listen(conn, sock, obs, min(settings.timeout, max(listen, 2 * obs.handshake_seconds)))
        if obs.handshake_done:
            obs.session = conn.get_session()
    finally:
        _close(conn, sock)
    return obs


def _handshake(conn: SSL.Connection, sock: socket.socket, obs: Observation, timeout: float) -> None:
    started = time.monotonic()
    try:
        _drive(conn.do_handshake, sock, started + timeout)
    except _Deadline:
        obs.timed_out = True
    except SSL.Error as exc:
        _failed(obs, exc)
    else:
        obs.handshake_done = True
        obs.version = conn.get_protocol_version_name()
        obs.cipher = conn.get_cipher_name()
        obs.alpn = conn.get_alpn_proto_negotiated().decode("ascii", "replace") or None
    finally:
        obs.handshake_seconds = time.monotonic() - started
        # The CertificateRequest and the server's chain arrive before the client's part of the handshake, so
        # they are there also when the server refused us during it.
        obs.ca_names = [dn_from_components(name.der(), name.get_components()) for name in conn.get_client_ca_list()]
        obs.server_chain = conn.get_peer_cert_chain(as_cryptography=True) or []


def _listen(conn: SSL.Connection, sock: socket.socket, obs: Observation, seconds: float) -> None:
    """Read for ``seconds``: an alert, a close, the server's first bytes, or silence (the server kept us)."""
    started = time.monotonic()
    while True:
        try:
            chunk = _drive(lambda: conn.recv(4096), sock, started + seconds)
        except _Deadline:
            return
        except SSL.Error as exc:
            _failed(obs, exc)
            obs.closed_after_handshake = True
            obs.closed_after_seconds = time.monotonic() - started
            return
        if chunk:
            obs.data = chunk
            return


def _ask_http(conn: SSL.Connection, sock: socket.socket, obs: Observation, target: Target, timeout: float) -> None:
    """Send one ``GET /`` and keep the start of the answer: some servers (nginx) refuse a certificate only there."""
    host = target.servername or str(target)
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mtls-proxy-probe\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    response = bytearray()
    try:
        # One small write: OpenSSL takes it whole (a partial write only happens above a record's 16 KiB).
        _drive(lambda: conn.send(request.encode()), sock, deadline)
        while len(response) < _HTTP_RESPONSE_LIMIT:
            response += _drive(lambda: conn.recv(4096), sock, deadline)
    except _Deadline:
        pass
    except SSL.Error as exc:
        # After an answer, a close is what Connection: close asked for; before one, it is the server's verdict.
        if not response:
            _failed(obs, exc)
            obs.closed_after_handshake = True
            obs.closed_after_seconds = time.monotonic() - started
    obs.http_response = bytes(response) or None


def _failed(obs: Observation, exc: SSL.Error) -> None:
    """Record why an SSL call failed: an alert the info callback saw, a close, or OpenSSL's own words."""
    if isinstance(exc, SSL.ZeroReturnError):
        return  # close_notify: the info callback recorded it as alert 0
    reasons = openssl_reasons(exc)
    if isinstance(exc, SSL.SysCallError) or any("unexpected eof" in reason.lower() for reason in reasons):
        obs.eof = True
    elif not obs.alerts_read:
        obs.local_error = "; ".join(reasons) or type(exc).__name__


def _drive(operation: Callable[[], T], sock: socket.socket, deadline: float) -> T:
    """Run a pyOpenSSL call on a non-blocking socket to completion, waiting in select until ``deadline``."""
    while True:
        try:
            return operation()
        except SSL.WantReadError:
            readable, writable = [sock], []
        except SSL.WantWriteError:
            readable, writable = [], [sock]
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline
        ready = select.select(readable, writable, [], left)
        if not any(ready):
            raise _Deadline


def _close(conn: SSL.Connection, sock: socket.socket) -> None:
    """Say goodbye politely if the connection still allows it (one try, no waiting), then close."""
    try:
        conn.shutdown()
    except SSL.Error:
        pass
    finally:
        sock.close()
