"""The backend every proxy forwards to: one process, plain blocking sockets, a thread per connection.

The first bytes of a connection choose what it does:

``GET ...`` (any HTTP method)
    HTTP/1.1 keep-alive responder: a fixed 13-byte body per request, for wrk and for ``openssl s_time -www``.
    An HTTP/1.0 request without keep-alive gets ``Connection: close`` and the connection is closed after the
    response, which is what ``s_time`` waits for. Kept-alive connections are handed to one epoll thread
    (:class:`HttpLoop`), see there why. ``GET /echo`` answers with the request head it received as the body: the
    harness checks with it that an HTTP identity-mode proxy really added (and replaced) the identity headers.
``SINK n``
    reads exactly n bytes with ``recv_into`` into one preallocated buffer, answers ``OK``.
``SOURCE n``
    sends n bytes with ``sendall`` from one preallocated buffer, then half-closes.
``PING``
    answers ``PONG`` per line until EOF: the idle-connection test uses it to prove that a connection reached
    the backend, then leaves it open.
``STATS``
    one JSON line of counters: connections accepted, connections closed before sending a byte
    (``silent_connections``), HTTP requests, and how many of those carried identity
    headers: ``identity_requests`` (``X-Forwarded-Client-Cert`` or ``X-Forwarded-For``), ``verify_requests``
    (``X-Client-Verify``), ``xfcc_requests`` (``X-Forwarded-Client-Cert``), for the HTTP identity-mode row, and
    ``cert_requests``: those that carried a verified client's certificate header, XFCC or Traefik's
    ``X-Forwarded-Tls-Client-Cert-Info``, for the HTTP/2 row (whose client presents a certificate).

Why this is not the bottleneck: the byte paths are ``recv_into``/``sendall`` on 1 MiB buffers (one system call
per MiB, the GIL released in each), and an HTTP request costs one ``recv`` and one ``send`` of a prebuilt
response. Most of what remains is the kernel's loopback TCP, which any backend pays. The harness reads this
process's CPU time from /proc for every run and reports it, and before the runs it measures the backend's own
HTTP ceiling (wrk straight at it, no TLS).

Run: ``python bench/backend.py [--port 0]``; it prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import select
import socket
import sys
import threading

BUFFER = 1 << 20
BODY = b"hello, world\n"
RESPONSE_11 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
RESPONSE_10 = (
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
) + BODY
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ")
IDENTITY_HEADERS = (b"x-forwarded-client-cert:", b"x-forwarded-for:")
CERT_HEADERS = (b"\nx-forwarded-client-cert:", b"\nx-forwarded-tls-client-cert-info:")

stats = {"connections": 0, "silent_connections": 0, "http_requests": 0, "identity_requests": 0,
         "verify_requests": 0, "xfcc_requests": 0, "cert_requests": 0, "bytes_in": 0, "bytes_out": 0}
_zeros = memoryview(bytes(BUFFER))


def _read_line(conn: socket.socket, buf: bytearray, have: int) -> tuple[bytes, int]:
    """Read until the first newline; return the line and how many bytes after it are already in ``buf``."""
    view = memoryview(buf)
    while b"\n" not in buf[:have]:
        if have == len(buf):
            raise ValueError("command line too long")
        n = conn.recv_into(view[have:])
        if n == 0:
            raise EOFError
        have += n
    end = buf.index(b"\n", 0, have)
    return bytes(buf[:end]).strip(), have - end - 1


class HttpLoop:
    """Every kept-alive HTTP connection is served by one thread on epoll.

    With a thread per kept-alive connection the backend cost 15 µs of CPU per request here, which made it as
    expensive as the proxies it serves (every thread wakes, takes the GIL, answers, sleeps). One thread that reads
    whatever is ready and answers every complete request head in it costs 11 µs.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        # Only the loop thread reads this dict; handler threads add to it. Single dict operations are atomic.
        self.conns: dict[int, tuple[socket.socket, bytearray]] = {}
        threading.Thread(target=self.run, daemon=True).start()

    def add(self, conn: socket.socket, first: bytes) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        pending = bytearray(first)
        self.conns[conn.fileno()] = (conn, pending)
        if not self.answer(conn, pending):
            self.drop(conn.fileno())
            return
        self.epoll.register(conn.fileno(), select.EPOLLIN)

    def drop(self, fd: int) -> None:
        conn, _ = self.conns.pop(fd, (None, None))
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
            conn.close()

    def answer(self, conn: socket.socket, pending: bytearray) -> bool:
        """Answer the complete request heads in ``pending``; False when the connection is to be closed."""
        out = []
        keep = True
        while keep:
            end = pending.find(b"\r\n\r\n")
            if end < 0:
                break
            raw = bytes(pending[: end + 4])
            head = raw.lower()
            del pending[: end + 4]
            stats["http_requests"] += 1
            if b"x-forwarded-" in head and any(h in head for h in IDENTITY_HEADERS):
                stats["identity_requests"] += 1
            if b"\nx-client-verify:" in head:
                stats["verify_requests"] += 1
            if b"\nx-forwarded-client-cert:" in head:
                stats["xfcc_requests"] += 1
            if any(h in head for h in CERT_HEADERS):
                stats["cert_requests"] += 1
            request_line = head.split(b"\r\n", 1)[0]
            http11 = request_line.endswith(b"http/1.1")
            keep = b"connection: close" not in head if http11 else b"connection: keep-alive" in head
            if request_line.startswith(b"get /echo "):
                out.append(_echo(raw, keep, http11))
            else:
                out.append(RESPONSE_11 if keep else RESPONSE_10)
        if len(pending) > 65536:
            return False
        if out:
            data = b"".join(out)
            try:
                sent = conn.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):  # rare: the client stopped reading; finish it blocking
                conn.setblocking(True)
                conn.settimeout(10)
                conn.sendall(data[sent:])
                conn.setblocking(False)
        return keep

    def run(self) -> None:
        while True:
            for fd, _ in self.epoll.poll():
                conn, pending = self.conns.get(fd, (None, None))
                if conn is None:
                    continue
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.drop(fd)
                    continue
                pending += data
                try:
                    keep = self.answer(conn, pending)
                except OSError:
                    keep = False
                if not keep:
                    self.drop(fd)


def _echo(head: bytes, keep: bool, http11: bool) -> bytes:
    version = b"HTTP/1.1" if http11 else b"HTTP/1.0"
    connection = b"" if keep else b"Connection: close\r\n"
    return (version + b" 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(head)
            + connection + b"\r\n" + head)


def _sink(conn: socket.socket, buf: bytearray, count: int, extra: int) -> None:
    view = memoryview(buf)
    got = extra
    while got < count:
        n = conn.recv_into(view, min(BUFFER, count - got))
        if n == 0:
            return
        got += n
    stats["bytes_in"] += got
    conn.sendall(b"OK\n")


def _source(conn: socket.socket, count: int) -> None:
    sent = 0
    while sent < count:
        piece = min(BUFFER, count - sent)
        conn.sendall(_zeros[:piece])
        sent += piece
    stats["bytes_out"] += sent
    conn.shutdown(socket.SHUT_WR)


def _ping(conn: socket.socket, buf: bytearray, line: bytes, extra: int) -> None:
    # The first PING is answered; so is every later line, until EOF.
    conn.sendall(b"PONG\n")
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return
        conn.sendall(b"PONG\n" * buf[:n].count(b"\n"))


def handle(conn: socket.socket | None, http_loop: HttpLoop) -> None:
    """Serve one accepted connection; an HTTP one is handed to ``http_loop``."""
    buf = bytearray(BUFFER)
    try:
        try:
            have = conn.recv_into(buf, 65536)
        except OSError:
            have = 0
        if have == 0:
            # Closed before sending a byte: a proxy that dials the backend before the client's handshake is done
            # (Traefik) leaves one of these for every client it then refuses.
            stats["silent_connections"] += 1
            return
        if buf.startswith(HTTP_METHODS):
            http_loop.add(conn, bytes(buf[:have]))
            conn = None  # the loop owns it now
            return
        line, extra = _read_line(conn, buf, have)
        word, _, arg = line.partition(b" ")
        if word == b"SINK":
            _sink(conn, buf, int(arg), extra)
        elif word == b"SOURCE":
            _source(conn, int(arg))
        elif word == b"PING":
            _ping(conn, buf, line, extra)
            return
        elif word == b"STATS":
            conn.sendall(json.dumps(stats).encode() + b"\n")
        else:
            conn.sendall(b"ERR unknown command\n")
            return
        # Wait for the client to close: closing first would leave the proxy an error instead of an EOF.
        conn.settimeout(30)
        while conn.recv_into(buf):
            pass
    except (OSError, ValueError, EOFError):
        pass
    finally:
        if conn is not None:
            conn.close()


def serve(port: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Thousands of idle connections mean thousands of threads: keep their stacks small.
    threading.stack_size(256 * 1024)
    http_loop = HttpLoop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        stats["connections"] += 1
        threading.Thread(target=handle, args=(conn, http_loop), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        serve(args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
