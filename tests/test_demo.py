"""`mtls-proxy demo`: the commands it prints work as printed, the backend shows the identity the proxy added and
never a forged one, and `--dir` reuses a demo PKI but never overwrites a key.

The demo runs as a real process with real curl; the checks of what `--dir` accepts also run in-process, through
`prepare_pki`, where building a broken PKI is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import queue
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.dev import pki
from proxy.dev.demo import DemoDirError, prepare_pki
from proxy.dev.demo_backend import demo_handler
from proxy.ops.admin_http import serve_http
from tests.conftest import poll_until as wait_until

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0  # seconds for the demo to print its commands
TOOL_TIMEOUT = 15.0  # seconds for one curl run or one refused demo

GREETING = "hello from the mtls-proxy demo backend"
PKI_FILES = ["ca.crt", "ca.key", "client.crt", "client.key", "server.crt", "server.key"]
WITH_CERT = "With the client certificate (the backend answers 200 and shows the identity headers it received):"
FORGED = "With a forged X-Forwarded-Client-Cert (the proxy replaces it: the backend sees only the proxy's):"
WITHOUT_CERT = "Without a client certificate (the handshake is refused):"


def run_tool(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL, **kw)


# ---- the demo process -------------------------------------------------------------------------------------------


class LineReader:
    """Reads a pipe in a thread so that waiting for a line can time out."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, wanted: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line {wanted!r} after {timeout}s; got:\n" + "\n".join(self.seen))
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"output ended before {wanted!r}; got:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if line == wanted:
                return self.seen


def _after(lines: list[str], header: str) -> str:
    """The command printed on the line under ``header``."""
    return lines[lines.index(header) + 1].strip()


def demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "demo", "--port", "0", "--admin-port", "0", *args]


@contextlib.contextmanager
def demo_process(*args: str, stderr_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``mtls-proxy demo ARGS`` on any free ports, up to its "Press Ctrl-C" line; killed on the way out."""
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(demo_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=REPO)
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    try:
        yield proc, reader.until("Press Ctrl-C to stop.", timeout=START_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.thread.join(5)  # EOF once the process is gone
        proc.stdout.close()


def stop_demo(proc: subprocess.Popen[str], signum: int, stderr_path: Path) -> None:
    proc.send_signal(signum)
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo did not exit within 10s of {signal.Signals(signum).name}:\n{stderr_path.read_text()}")
    assert code == 0, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()


def expected_xfcc(directory: Path) -> str:
    """The XFCC element the proxy must send for the demo client whose certificate is in ``directory``."""
    client = x509.load_pem_x509_certificate((directory / "client.crt").read_bytes())
    uris = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris, "the demo client has a URI SAN"
    subject = client.subject.rfc4514_string()
    fingerprint = client.fingerprint(hashes.SHA256()).hex()
    return f'Hash={fingerprint};Subject="{subject}";' + ";".join(f"URI={uri}" for uri in uris)


def xfcc_lines(echo: str) -> list[str]:
    """Every X-Forwarded-Client-Cert the backend echoed (it prints header names lowercased)."""
    return [line for line in echo.splitlines() if line.startswith("x-forwarded-client-cert:")]


def file_states(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Each file's mtime and content: what must not change when a PKI is reused or a folder refused."""
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(directory.iterdir())}


def served_certificate_sha256(url: str, ca: Path, cert: Path, key: Path) -> str:
    """SHA-256 of the certificate the demo serves at ``url``, seen by a client that makes one request."""
    host, port = url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            # A whole exchange, as curl makes: the demo is an HTTP proxy, not a TLS prober's target.
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert der
    return hashlib.sha256(der).hexdigest()


def sha256_of_pem(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


# ---- what the printed commands show ----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_prints_working_commands_and_cleans_up(tmp_path):
    stderr_path = tmp_path / "demo-stderr.log"
    with demo_process(stderr_path=stderr_path) as (proc, lines):
        pki_line = next(line for line in lines if "PKI (CA, server and client certificates):" in line)
        directory = Path(pki_line.split(": ", 1)[1].strip())
        assert directory.is_dir() and directory.name.startswith("mtls-proxy-demo-")
        assert "  (made for this demo)" in lines

        with_cert = _after(lines, WITH_CERT)
        forged = _after(lines, FORGED)
        without_cert = _after(lines, WITHOUT_CERT)
        metrics_cmd = _after(lines, "Metrics:")
        assert with_cert.startswith("curl ") and "--cert" in with_cert
        assert without_cert.startswith("curl ") and "--cert" not in without_cert
        # The forging command is the working one plus the forged header, so only the proxy can explain the answer.
        forged_argv = shlex.split(forged)
        header_at = forged_argv.index("-H")
        assert forged_argv[header_at + 1] == "X-Forwarded-Client-Cert: forged"
        assert forged_argv[:header_at] + forged_argv[header_at + 2:] == shlex.split(with_cert)

        # paste-ready: one line each, run as printed
        ok = run_tool(shlex.split(with_cert))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines()[:2] == [GREETING, "GET /"]
        assert xfcc_lines(ok.stdout) == [f"x-forwarded-client-cert: {expected_xfcc(directory)}"], ok.stdout
        assert "x-forwarded-proto: https" in ok.stdout.splitlines()

        replaced = run_tool(forged_argv)
        assert replaced.returncode == 0, replaced.stderr
        assert xfcc_lines(replaced.stdout) == [f"x-forwarded-client-cert: {expected_xfcc(directory)}"], replaced.stdout
        assert "forged" not in replaced.stdout

        refused_run = run_tool(shlex.split(without_cert))
        assert refused_run.returncode != 0
        assert GREETING not in refused_run.stdout

        line = 'mtls_proxy_handshake_failures_total{listener="demo",reason="no_client_cert"} 1.0'

        def scraped() -> bool:
            result = run_tool(shlex.split(metrics_cmd))
            return result.returncode == 0 and line in result.stdout.splitlines()

        wait_until(scraped, what=f"{line!r} from the printed metrics command")

        stop_demo(proc, signal.SIGINT, stderr_path)
        assert not directory.exists(), "the demo left its temporary PKI behind"


# ---- --dir ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_dir_is_kept_after_sigterm_and_reused_as_it_is(tmp_path):
    keep = tmp_path / "pki"  # missing: the demo creates it
    stderr_path = tmp_path / "demo-stderr.log"
    with demo_process("--dir", str(keep), stderr_path=stderr_path) as (proc, lines):
        assert f"  PKI (CA, server and client certificates): {keep}" in lines
        assert "  (made for this demo)" in lines
        stop_demo(proc, signal.SIGTERM, stderr_path)
    # --dir: the PKI is the user's to keep
    assert sorted(p.name for p in keep.iterdir()) == PKI_FILES
    before = file_states(keep)
    client_sha256 = sha256_of_pem(keep / "client.crt")
    server_sha256 = sha256_of_pem(keep / "server.crt")

    with demo_process("--dir", str(keep), stderr_path=stderr_path) as (proc, lines):
        assert "  (found there and reused, nothing rewritten)" in lines
        ok = run_tool(shlex.split(_after(lines, WITH_CERT)))
        assert ok.returncode == 0, ok.stderr
        [xfcc] = xfcc_lines(ok.stdout)
        assert xfcc.startswith(f"x-forwarded-client-cert: Hash={client_sha256};"), xfcc
        url = shlex.split(_after(lines, WITHOUT_CERT))[-1]
        served = served_certificate_sha256(url, keep / "ca.crt", keep / "client.crt", keep / "client.key")
        assert served == server_sha256
        stop_demo(proc, signal.SIGTERM, stderr_path)
    assert file_states(keep) == before, "reusing the demo PKI rewrote a file"


@pytest.fixture
def refused_dirs(tmp_path) -> dict[str, Path]:
    """Folders `demo --dir` must refuse, each next to what the message must say."""
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine\n")
    partial = tmp_path / "partial"
    pki.write_dev_pki(partial)
    (partial / "client.key").unlink()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    return {"unrelated": unrelated, "partial": partial, "a-file": a_file}


REFUSALS = [
    ("unrelated", "holds files that are not part of a demo PKI: notes.txt"),
    ("partial", "holds a partial demo PKI, without client.key"),
    ("a-file", "is not a folder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, problem", REFUSALS, ids=[case for case, _ in REFUSALS])
def test_demo_refuses_a_dir_it_would_overwrite_with_exit_2_writing_nothing(refused_dirs, case, problem):
    target = refused_dirs[case]
    before = file_states(target) if target.is_dir() else target.read_bytes()
    result = run_tool(demo_argv("--dir", str(target)), cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"mtls-proxy: error: --dir {target} {problem}; give --dir a new or empty folder" in result.stderr
    assert "Press Ctrl-C" not in result.stdout  # refused before anything was served
    assert (file_states(target) if target.is_dir() else target.read_bytes()) == before


def test_an_empty_dir_gets_a_new_pki_and_a_complete_one_is_reused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    made = prepare_pki(empty)
    assert not made.reused
    assert sorted(p.name for p in empty.iterdir()) == PKI_FILES
    before = file_states(empty)

    again = prepare_pki(empty)
    assert again.reused and again.paths == made.paths
    assert file_states(empty) == before


def test_a_pki_from_certs_init_is_reused(tmp_path):
    written = pki.write_dev_pki(tmp_path / "from-certs-init")
    before = file_states(written.dir)
    assert prepare_pki(written.dir).reused
    assert file_states(written.dir) == before


# Each breaks one thing in a complete dev PKI: the demo could not serve with it, or not show the client.
def _foreign_client(directory: Path) -> None:
    other_ca = pki.make_ca("another CA")
    client = pki.make_client_cert(other_ca, common_name="demo-client")
    (directory / "client.crt").write_bytes(client.chain_pem())
    (directory / "client.key").write_bytes(client.key_pem())


def _swapped_key(directory: Path) -> None:
    (directory / "server.key").write_bytes((directory / "client.key").read_bytes())


def _expired_server(directory: Path) -> None:
    ca = _rebuild_ca(directory)
    past = datetime.now(UTC) - timedelta(days=1)
    server = pki.make_server_cert(ca, not_before=past - timedelta(days=30), not_after=past)
    (directory / "server.crt").write_bytes(server.chain_pem())
    (directory / "server.key").write_bytes(server.key_pem())


def _server_for_another_host(directory: Path) -> None:
    server = pki.make_server_cert(_rebuild_ca(directory), dns_names=("example.test",), ip_addresses=("10.0.0.1",))
    (directory / "server.crt").write_bytes(server.chain_pem())
    (directory / "server.key").write_bytes(server.key_pem())


def _server_key_no_client_can_verify(directory: Path) -> None:
    # Passes the demo's own checks; the proxy's (proxy.config.materials) refuse the curve.
    ca = _rebuild_ca(directory)
    key = ec.generate_private_key(ec.SECP256K1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(pki.Issued(cert=cert, key=key).key_pem())


def _not_pem(directory: Path) -> None:
    (directory / "ca.crt").write_text("hello\n")


def _symlinked_key(directory: Path) -> None:
    target = directory.parent / "elsewhere.key"
    (directory / "client.key").rename(target)
    (directory / "client.key").symlink_to(target)


def _rebuild_ca(directory: Path) -> pki.Issued:
    """The CA of the PKI in ``directory``, able to sign more (the dev PKI keeps its key)."""
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return pki.Issued(cert=cert, key=key)


UNUSABLE = [
    ("foreign-client", _foreign_client, "client.crt is not signed by ca.crt"),
    ("swapped-key", _swapped_key, "server.key does not match server.crt"),
    ("expired-server", _expired_server, "server.crt expired on "),
    ("other-host", _server_for_another_host, "server.crt is not issued for 127.0.0.1, where the demo listens"),
    ("unverifiable-curve", _server_key_no_client_can_verify, "{dir}/server.crt: server certificate key is on curve "
     "secp256k1"),
    ("not-pem", _not_pem, "ca.crt holds no PEM certificate"),
    ("symlinked-key", _symlinked_key, "client.key is not a regular file"),
]


@pytest.mark.parametrize("breakage, problem", [(b, p) for _, b, p in UNUSABLE], ids=[i for i, _, _ in UNUSABLE])
def test_a_complete_looking_pki_the_demo_cannot_use_is_refused_untouched(tmp_path, breakage, problem):
    directory = tmp_path / "pki"
    pki.write_dev_pki(directory)
    breakage(directory)
    before = file_states(directory)
    with pytest.raises(DemoDirError) as refused:
        prepare_pki(directory)
    message = str(refused.value)
    expected = problem.format(dir=directory)
    assert message.startswith(f"{directory} holds a demo PKI that cannot be reused: {expected}"), message
    assert file_states(directory) == before


# ---- other demo behaviours --------------------------------------------------------------------------------------


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield blocker.getsockname()[1]


@pytest.mark.slow
def test_demo_on_a_port_in_use_exits_1(occupied_port):
    result = run_tool([sys.executable, "-m", "proxy", "demo", "--port", str(occupied_port), "--admin-port", "0"],
                      cwd=REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"127.0.0.1:{occupied_port}" in result.stderr
    assert "pick other ports with --port / --admin-port" in result.stderr


async def test_demo_backend_echoes_the_request(nursery):
    host, port = await nursery.start(serve_http, demo_handler("hi from the test"), "127.0.0.1", 0)
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "test"), ("X-Client-Subject", "CN=alice,O=Acme"), ("connection", "close")]
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(client.send(h11.Request(method="GET", target="/hello?x=1", headers=headers))
                              + client.send(h11.EndOfMessage()))
        response, body = None, b""
        with trio.fail_after(5):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    assert response is not None and response.status_code == 200
    assert (b"content-type", b"text/plain; charset=utf-8") in response.headers
    lines = body.decode().splitlines()
    assert lines[:2] == ["hi from the test", "GET /hello?x=1"]
    assert "host: test" in lines
    assert "x-client-subject: CN=alice,O=Acme" in lines
