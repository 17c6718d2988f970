"""TLS clients of the benchmark, on the stdlib ``ssl`` module (the system's OpenSSL), blocking sockets.

As a program (each run is its own process, pinned with the harness to the load core):

``python bench/clients.py bulk --port P --direction up|down --bytes N --pki DIR``
    one mTLS connection; ``up`` sends N bytes (``SINK N``) and waits for the backend's ``OK``, ``down`` asks for
    N bytes (``SOURCE N``) and reads them with ``recv_into``. Prints one JSON line: bytes, seconds, MB/s.
``python bench/clients.py idle --port P --count N --pki DIR``
    opens N mTLS connections, proves each one reached the backend (``PING``/``PONG``), prints ``READY N``, then
    holds them until a line arrives on stdin (or ``--hold`` seconds pass) and closes them all.

As a module, :func:`probe` makes one connection with or without a client certificate and says what happened:
the harness uses it to check that every peer refuses a client without a certificate before measuring it.
:func:`http_probe` does the same for an HTTP identity-mode listener, and returns the request head the backend
received (``GET /echo``), so the harness can check which identity headers the proxy added. :func:`h2_probe`
asks the same over HTTP/2, with ``nghttp`` (from nghttp2-client, like h2load, but with ``--cert``/``--key``).
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

SERVER_NAME = "localhost"
CHUNK = 256 * 1024


def context(pki: Path, cert: str | None = "client", tls13: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0, nodelay: bool = True) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:port. ``nodelay`` sets TCP_NODELAY, as curl, urllib3 and Go do; Python's bare
    sockets and ``openssl s_client`` don't, which matters when the server is silent after the handshake (see
    :func:`first_response`)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if nodelay:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname=SERVER_NAME)
    except BaseException:
        raw.close()
        raise


def probe(port: int, pki: Path, cert: str | None, timeout: float = 5.0) -> tuple[bool, str]:
    """(reached the backend, what happened). Sends ``PING``; only a ``PONG`` counts as reaching it.

    In TLS 1.3 the client finishes its handshake before the server has looked at the client's certificate, so a
    refusal shows up on the first read: an alert (``certificate required``, ``unknown ca``), or a plain close.
    """
    try:
        sock = connect(port, context(pki, cert), timeout)
    except (ssl.SSLError, OSError) as exc:
        return False, f"handshake failed: {exc}"
    try:
        sock.sendall(b"PING\n")
        data = read_line(sock, 64)
    except (ssl.SSLError, OSError) as exc:
        return False, f"refused after the handshake: {exc}"
    finally:
        sock.close()
    if data == b"PONG\n":
        return True, "PONG"
    return False, f"closed without an answer ({data!r})"


def http_probe(port: int, pki: Path, cert: str | None, forged: dict[str, str] | None = None,
               timeout: float = 5.0) -> tuple[bool, str, dict[str, list[str]]]:
    """(reached the backend, what happened, the headers the backend received, lowercased name -> values).

    Sends ``GET /echo`` (HTTP/1.1, ``Connection: close``) with the ``forged`` headers, which the proxy must replace
    or remove. Only the backend's echo counts as reaching it: a proxy that answers itself (nginx's 400 "No
    required SSL certificate was sent") has refused the client.
    """
    extra = "".join(f"{name}: {value}\r\n" for name, value in (forged or {}).items())
    request = f"GET /echo HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n".encode()
    try:
        sock = connect(port, context(pki, cert), timeout)
    except (ssl.SSLError, OSError) as exc:
        return False, f"handshake failed: {exc}", {}
    data = b""
    try:
        sock.sendall(request)
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except (ssl.SSLError, OSError) as exc:
        if not data:
            return False, f"refused after the handshake: {exc}", {}
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not body.upper().startswith(b"GET /ECHO "):
        title = body[body.find(b"<title>") + 7: body.find(b"</title>")] if b"<title>" in body else body[:60]
        return False, f"{status or 'closed without an answer'} {title.decode(errors='replace')}".strip(), {}
    return True, status, echoed_headers(body)


def echoed_headers(body: bytes) -> dict[str, list[str]]:
    """The headers of the request head the backend echoed (``GET /echo``), lowercased name -> values."""
    headers: dict[str, list[str]] = {}
    for line in body.decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return headers


def h2_probe(port: int, pki: Path, cert: str | None, forged: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[bool, str, dict[str, list[str]]]:
    """:func:`http_probe` over HTTP/2: ``nghttp`` sends ``GET /echo`` with the ``forged`` headers (lowercase, as
    HTTP/2 wants them). nghttp speaks nothing but h2, so an answer also proves that ALPN chose HTTP/2. The URL names
    ``localhost``, as h2load's does (see loads.h2load); the peers listen on 127.0.0.1 only, and nghttp tries the
    addresses ``localhost`` resolves to in turn."""
    cmd = ["nghttp", "--timeout", str(int(timeout))]
    if cert is not None:
        cmd += ["--cert", str(pki / f"{cert}.crt"), "--key", str(pki / f"{cert}.key")]
    for name, value in (forged or {}).items():
        cmd += ["-H", f"{name.lower()}: {value}"]
    cmd.append(f"https://localhost:{port}/echo")
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout + 5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nghttp: {exc}", {}
    body = proc.stdout.replace(b"\n", b"\r\n") if b"\r\n" not in proc.stdout else proc.stdout
    if proc.returncode != 0 or not body.upper().startswith(b"GET /ECHO "):
        if b"<title>" in body:  # the peer answered itself (nginx's 400 page)
            return False, body[body.find(b"<title>") + 7: body.find(b"</title>")].decode(errors="replace"), {}
        # nghttp says no more than this when the server ends the connection (a TLS alert or a close).
        said = [line for line in proc.stderr.decode(errors="replace").splitlines() if "WARNING" not in line]
        return False, f"no response: {' '.join(said)[-120:] or f'exit {proc.returncode}'}", {}
    return True, "HTTP/2 200", echoed_headers(body)


def first_response(port: int, pki: Path, count: int, nodelay: bool) -> dict[str, float]:
    """Median milliseconds of ``count`` sequential connections: connect + handshake, then ``PING`` to ``PONG``.

    Without TCP_NODELAY the client's first request waits in Nagle's algorithm until its last handshake flight is
    acknowledged. A server that sends its TLS 1.3 session tickets right after the handshake acknowledges it at
    once; one that stays silent until it has data lets the delayed-ACK timer run (40 ms on Linux), and the first
    request pays that.
    """
    ctx = context(pki)
    handshakes, responses = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        sock = connect(port, ctx, nodelay=nodelay)
        t1 = time.perf_counter()
        try:
            _ping(sock)
        finally:
            sock.close()
        handshakes.append(t1 - t0)
        responses.append(time.perf_counter() - t1)
    handshakes.sort()
    responses.sort()
    return {"handshake_ms": handshakes[count // 2] * 1e3, "first_response_ms": responses[count // 2] * 1e3}


def paced(port: int, pki: Path | None, rate: float, seconds: float, conns: int = 8) -> dict[str, float]:
    """Latency of ``PING`` → ``PONG`` at a fixed rate far below saturation: p50 and p99 in µs.

    ``conns`` kept-alive connections (mTLS with the client certificate; plain TCP when ``pki`` is None, for the
    backend alone) take the requests in turn, one every 1/``rate`` s on a fixed schedule. A request is timed from
    when it was due, or from the end of the one before if that ended later: so a slow answer also counts against
    the requests it held up, and this client's own sleep does not.
    """
    ctx = context(pki) if pki is not None else None
    socks: list[socket.socket] = []
    try:
        for _ in range(conns):
            if ctx is None:
                raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(raw)
            else:
                socks.append(connect(port, ctx))
        for sock in socks:  # the first request of each connection is not timed (it may still set things up)
            _ping(sock)
        interval = 1 / rate
        count = int(rate * seconds)
        times = []
        start = previous_end = time.perf_counter() + 0.01
        for i in range(count):
            due = start + i * interval
            while (left := due - time.perf_counter()) > 0:
                if left > 0.0002:
                    time.sleep(left - 0.0002)  # sleep most of the gap, spin the last 200 µs
            begin = max(due, previous_end)
            _ping(socks[i % conns])
            previous_end = time.perf_counter()
            times.append(previous_end - begin)
    finally:
        for sock in socks:
            sock.close()
    times.sort()
    return {"requests": count, "rate": rate, "p50_us": times[len(times) // 2] * 1e6,
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6}


def read_line(sock: socket.socket, piece: int) -> bytes:
    """What ``sock`` sends up to and including a newline, read ``piece`` bytes at a time; less if it closes first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(piece)
        if not chunk:
            break
        data += chunk
    return data


def _ping(sock: socket.socket) -> None:
    """``PING``, and the backend's line back, which must be ``PONG`` (RuntimeError otherwise)."""
    sock.sendall(b"PING\n")
    answer = read_line(sock, 16)
    if answer != b"PONG\n":
        raise RuntimeError(f"no PONG: {answer!r}")


def bulk(port: int, pki: Path, direction: str, count: int) -> dict[str, float]:
    t0 = time.perf_counter()
    sock = connect(port, context(pki), timeout=120)
    t1 = time.perf_counter()
    if direction == "up":
        sock.sendall(b"SINK %d\n" % count)
        piece = memoryview(bytes(CHUNK))
        left = count
        while left:
            n = min(CHUNK, left)
            sock.sendall(piece[:n])
            left -= n
        answer = sock.recv(16)
        if answer != b"OK\n":
            raise SystemExit(f"the backend did not confirm the upload: {answer!r}")
    else:
        sock.sendall(b"SOURCE %d\n" % count)
        buf = bytearray(CHUNK)
        got = 0
        while got < count:
            n = sock.recv_into(buf)
            if n == 0:
                raise SystemExit(f"the connection ended after {got} of {count} bytes")
            got += n
    t2 = time.perf_counter()
    sock.close()
    seconds = t2 - t1
    return {"bytes": count, "seconds": seconds, "handshake_seconds": t1 - t0, "mb_per_s": count / seconds / 1e6}


def idle(port: int, pki: Path, count: int, hold: float) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = context(pki)
    socks = []
    deadline = time.monotonic() + max(30.0, count * 0.05)
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise SystemExit(f"opened only {i} of {count} connections in time")
            sock = connect(port, ctx)
            socks.append(sock)
            try:
                _ping(sock)
            except RuntimeError:
                raise SystemExit(f"connection {i} did not reach the backend") from None
        print(f"READY {len(socks)}", flush=True)
        select.select([sys.stdin], [], [], hold)
    finally:
        for sock in socks:
            sock.close()
    print("DONE", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="TLS clients of the benchmark")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bulk")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--pki", type=Path, required=True)
    b.add_argument("--direction", choices=("up", "down"), required=True)
    b.add_argument("--bytes", type=int, required=True)
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--pki", type=Path, required=True)
    i.add_argument("--count", type=int, required=True)
    i.add_argument("--hold", type=float, default=300.0)
    args = parser.parse_args()
    if args.cmd == "bulk":
        print(json.dumps(bulk(args.port, args.pki, args.direction, args.bytes)), flush=True)
    else:
        idle(args.port, args.pki, args.count, args.hold)


if __name__ == "__main__":
    main()
