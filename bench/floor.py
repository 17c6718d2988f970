"""The floor: what a new connection through a TLS-terminating TCP proxy in Python on trio costs at the least.

A reference point for the benchmark, not a product: bench/run.py runs it as the peer ``floor`` beside nginx and
mtls-proxy (``--peers nginx,mtls-proxy,floor``), so the handshake rows show how much of mtls-proxy's cost per
connection is Python and trio themselves, and how much is what mtls-proxy does for each connection on top. Its
relay is the plain one (a ``bytes`` object per record, one poll per wake): mtls-proxy's data plane, which reads
into buffers it keeps and polls again within a wake, costs less per request and per byte, so the floor's
kept-alive and bulk rows are no floor.

It has mtls-proxy's data-plane design (proxy.relay.dataplane) and nothing else: one trio task waits on a nested
epoll and, on each wake, drives every ready socket in a loop. It accepts, runs each handshake with OpenSSL on the
socket (the client certificate verified by OpenSSL alone, against the bench CA: no Python callback), connects to
the backend, relays with backpressure (a side that cannot take more stops reading the other) and half-close, and
closes. No identity, allow rules, resumption check, handshake or idle deadline, metrics, access log, drain, reload
or task per connection: each of those is something mtls-proxy does and this does not.

The two ports are the benchmark's: ``--require-port`` demands a client certificate, ``--optional-port`` verifies one
if the client presents it. Both take TLS 1.2 and 1.3 and keep OpenSSL's default session tickets.

Run: ``python bench/floor.py --require-port P --optional-port Q --backend-port B --pki DIR`` (DIR holds the bench
PKI: server.crt, server.key, ca.crt).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import select
import socket
from pathlib import Path

import trio
from OpenSSL import SSL

CHUNK = 256 * 1024  # what one read takes, from either side: mtls-proxy's data plane reads as much
RECORD = 16 * 1024  # the most plaintext one TLS record carries
IN, OUT = select.EPOLLIN, select.EPOLLOUT
# SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: a write that OpenSSL could not finish is retried with the same bytes,
# from a new bytes object.
_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2


def server_context(pki: Path, *, require: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF)
    ctx.set_mode(_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    ctx.use_certificate_chain_file(str(pki / "server.crt"))
    ctx.use_privatekey_file(str(pki / "server.key"))
    ctx.load_verify_locations(str(pki / "ca.crt"))
    ctx.set_verify(SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require else 0))
    # Resumption with client certificates needs a session id context.
    ctx.set_session_id(hashlib.sha256(b"floor-" + (b"require" if require else b"optional")).digest()[:32])
    return ctx


class Connection:
    """One client: its TLS session on the client socket, then the backend socket and the bytes in flight."""

    __slots__ = ("backend", "backend_eof", "backend_shut", "client", "client_eof", "connecting", "down",
                 "handshake_wants", "handshaking", "loop", "tls", "up")

    def __init__(self, loop: Loop, client: socket.socket, ctx: SSL.Context) -> None:
        self.loop = loop
        self.client = client
        self.tls = SSL.Connection(ctx, client)
        self.tls.set_accept_state()
        self.backend: socket.socket | None = None
        self.handshaking = True
        self.handshake_wants = IN
        self.connecting = False
        self.up = memoryview(b"")  # decrypted from the client, not yet taken by the backend
        self.down = memoryview(b"")  # from the backend, not yet taken by OpenSSL
        self.client_eof = False
        self.backend_eof = False
        self.backend_shut = False  # the client's half-close passed on

    # ---- events ----

    def on_client(self) -> None:
        if self.handshaking:
            self.handshake()
        else:
            if self.down:
                self.write_client()
            if not self.up and not self.client_eof:
                self.read_client()

    def on_backend(self) -> None:
        if self.connecting:
            code = self.sock().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, "backend connect failed")
            self.connecting = False
        self.write_backend()
        if not self.down and not self.backend_eof:
            self.read_backend()

    # ---- steps ----

    def sock(self) -> socket.socket:
        """The backend socket, which exists from the end of the handshake on."""
        assert self.backend is not None
        return self.backend

    def handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            self.handshake_wants = IN
            return
        except SSL.WantWriteError:
            self.handshake_wants = OUT
            return
        self.handshaking = False
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend = backend
        self.loop.by_fd[backend.fileno()] = self
        self.loop.masks[backend.fileno()] = 0
        self.loop.epoll.register(backend.fileno(), 0)
        code = backend.connect_ex(self.loop.backend_address)
        if code == errno.EINPROGRESS:
            self.connecting = True
        elif code:
            raise OSError(code, "backend connect failed")
        self.read_client()  # a request often comes right behind the last handshake flight: no wake for it

    def read_client(self) -> None:
        """Records until OpenSSL wants more from the socket, about CHUNK bytes at most, then on to the backend."""
        pieces = []
        size = 0
        try:
            while size < CHUNK:
                # A whole record at a time: a record read in part would leave the rest in OpenSSL, where no
                # readiness event would ever call for it.
                piece = self.tls.recv(RECORD)
                pieces.append(piece)
                size += len(piece)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:  # close_notify, or a FIN (OP_IGNORE_UNEXPECTED_EOF)
            self.client_eof = True
        self.up = memoryview(b"".join(pieces))
        self.write_backend()

    def write_backend(self) -> None:
        """What the client sent, as far as the backend takes it; its half-close once all of it is taken."""
        if self.connecting:
            return
        if self.up:
            try:
                sent = self.sock().send(self.up)
            except BlockingIOError:
                return
            self.up = self.up[sent:]
        if not self.up and self.client_eof and not self.backend_shut:
            self.backend_shut = True
            self.sock().shutdown(socket.SHUT_WR)

    def read_backend(self) -> None:
        try:
            data = self.sock().recv(CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.backend_eof = True
            return
        self.down = memoryview(data)
        self.write_client()

    def write_client(self) -> None:
        while self.down:
            try:
                sent = self.tls.send(self.down)  # one record at a time: pyOpenSSL allows partial writes
            except SSL.WantWriteError:
                return
            self.down = self.down[sent:]

    # ---- interest ----

    def interests(self) -> tuple[int, int]:
        """What to wait for on the client and on the backend socket."""
        if self.handshaking:
            return self.handshake_wants, 0
        client = (OUT if self.down else 0) | (IN if not self.up and not self.client_eof else 0)
        if self.connecting:
            return client, OUT
        backend = (OUT if self.up else 0) | (IN if not self.down and not self.backend_eof else 0)
        return client, backend

    def close(self) -> None:
        if not self.handshaking:
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()  # close_notify, best effort
        for sock in (self.client, self.backend):
            if sock is not None:
                self.loop.by_fd.pop(sock.fileno(), None)
                self.loop.masks.pop(sock.fileno(), None)
                sock.close()  # closing takes it out of the epoll


class Loop:
    """The one task: a nested epoll over the listening sockets and every connection's sockets."""

    def __init__(self, listeners: dict[socket.socket, SSL.Context], backend_address: tuple[str, int]) -> None:
        self.epoll = select.epoll()
        self.listeners = {sock.fileno(): (sock, ctx) for sock, ctx in listeners.items()}
        self.backend_address = backend_address
        self.by_fd: dict[int, Connection] = {}
        self.masks: dict[int, int] = {}
        for fd in self.listeners:
            self.epoll.register(fd, IN)

    async def run(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.epoll.fileno())
            for fd, events in self.epoll.poll(0):
                if fd in self.listeners:
                    self.accept(*self.listeners[fd])
                    continue
                conn = self.by_fd.get(fd)
                if conn is None:
                    continue
                try:
                    if events & select.EPOLLERR:  # reported whatever the mask: a reset, or a refused connect
                        raise OSError("socket error")
                    if fd == conn.client.fileno():
                        conn.on_client()
                    else:
                        conn.on_backend()
                    if conn.backend_eof and not conn.down:
                        conn.close()
                    else:
                        self.watch(conn)
                except (SSL.Error, OSError):
                    conn.close()

    def accept(self, listener: socket.socket, ctx: SSL.Context) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # a connection that died in the backlog, or out of descriptors: the next wake retries
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, client, ctx)
            self.by_fd[client.fileno()] = conn
            self.masks[client.fileno()] = IN
            self.epoll.register(client.fileno(), IN)

    def watch(self, conn: Connection) -> None:
        wanted = conn.interests()
        for sock, mask in zip((conn.client, conn.backend), wanted, strict=True):
            if sock is None:
                continue
            fd = sock.fileno()
            if self.masks.get(fd) != mask:
                self.masks[fd] = mask
                self.epoll.modify(fd, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--require-port", type=int, required=True)
    parser.add_argument("--optional-port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args()
    listeners = {}
    for port, require in ((args.require_port, True), (args.optional_port, False)):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
        sock.setblocking(False)
        listeners[sock] = server_context(args.pki, require=require)
    trio.run(Loop(listeners, ("127.0.0.1", args.backend_port)).run)


if __name__ == "__main__":
    main()
