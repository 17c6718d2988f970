"""Helpers for tests that drive ``proxy.tls.stream.TLSStream`` directly.

- ``server_tls``: the proxy's own server Context (built from a listener config
  with the test PKI, exactly as the daemon builds it).
- ``openssl_client_context``: a pyOpenSSL client Context with a client
  certificate, partial writes off, for ``TLSStream(server_side=False)``.
- ``tls_pair``: two TLSStreams (server, client) over an in-memory transport
  pair, both handshakes run concurrently before returning.
- ``open_tls_client``: an in-process trio TLS client over real TCP, so that a
  test can call ``send_eof()`` (a stdlib ``ssl`` client cannot half-close and
  then keep reading).
- ``malloc_in_use``: glibc's count of the C heap in use, for the tests that
  check what an idle connection keeps.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import trio
from OpenSSL import SSL

from proxy.config.materials import load_all
from proxy.config.schema import parse
from proxy.tls.context import ServerTLS, build_server_tls
from proxy.tls.stream import TLSStream
from tests.conftest import Cred, TestPKI, listener_config

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
# SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL turns it on; TLSStream needs it off).
MODE_ENABLE_PARTIAL_WRITE = 0x1
# SSL_MODE_RELEASE_BUFFERS, which the proxy's server Context sets.
MODE_RELEASE_BUFFERS = 0x10


def server_tls(test_pki: TestPKI, version: str | None = None, **overrides) -> ServerTLS:
    """The proxy's server TLS setup for a one-listener config (client auth required)."""
    if version is not None:
        overrides.setdefault("tls", {}).update({"min_version": version, "max_version": version})
    config = parse({"listeners": [listener_config(test_pki, "127.0.0.1:1", **overrides)]}, source="test")
    return build_server_tls(config.listeners[0], load_all(config)[0])


def openssl_client_context(test_pki: TestPKI, cred: Cred | None, *, version: str | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(test_pki.server_ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if cred is not None:
        ctx.use_certificate_chain_file(str(cred.cert))
        ctx.use_privatekey_file(str(cred.key))
        ctx.check_privatekey()
    if version is not None:
        ctx.set_min_proto_version(_VERSIONS[version])
        ctx.set_max_proto_version(_VERSIONS[version])
    ctx.clear_mode(MODE_ENABLE_PARTIAL_WRITE)
    # Harmless on a client; what a Context that may verify peers needs for resumption.
    ctx.set_session_id(b"mtls-proxy-tests")
    return ctx


def client_connection(ctx: SSL.Context) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    return conn


async def handshake_both(a: TLSStream, b: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.do_handshake)
        nursery.start_soon(b.do_handshake)


async def tls_pair(
    make_transports: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    tls: ServerTLS,
    client_ctx: SSL.Context,
) -> tuple[TLSStream, TLSStream]:
    """(server, client), handshaken, over ``make_transports()``."""
    server_transport, client_transport = make_transports()
    conn, _record = tls.new_connection()
    server = TLSStream(server_transport, conn)
    client = TLSStream(client_transport, client_connection(client_ctx), server_side=False)
    await handshake_both(server, client)
    return server, client


async def open_tls_client(port: int, ctx: SSL.Context, *, host: str = "127.0.0.1") -> TLSStream:
    """Connect to the proxy and complete the handshake."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = TLSStream(tcp, client_connection(ctx), server_side=False)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def receive_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 30) -> bytes:
    """Read until EOF (b"")."""
    got = bytearray()
    while data := await stream.receive_some(65536):
        got += data
        if len(got) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")
    return bytes(got)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await stream.receive_some(n - len(got))
        if not data:
            raise AssertionError(f"EOF after {len(got)} of {n} bytes")
        got += data
    return bytes(got)


class RecordingStream(trio.abc.HalfCloseableStream):
    """Wraps a transport and records the size of every ``send_all`` and the bytes sent."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sends: list[int] = []
        self.sent = bytearray()

    async def send_all(self, data) -> None:
        self.sends.append(len(data))
        if len(self.sent) < 64:
            self.sent += bytes(data[:64])
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back: OpenSSL's buffers live here."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    gc.collect()
    info = mallinfo2()
    return info.uordblks + info.hblkhd
