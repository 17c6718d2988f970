"""What a relayed connection keeps once its peers go quiet.

proxy.relay.tcp_forwarder and the HTTP driver, proxy.relay.http1_forwarder.
"""

from __future__ import annotations

import functools
import socket

import trio
import trio.testing
from OpenSSL import SSL

from proxy.net.sockstream import SocketStream
from proxy.protocol.http1 import HeaderPolicy, HttpRelay
from proxy.relay.http1_forwarder import HttpCounters, relay_http
from proxy.relay.tcp_forwarder import pump
from proxy.tls.context import ServerTLS
from proxy.tls.stream import TLSStream
from tests.tlskit import (
    MODE_RELEASE_BUFFERS,
    malloc_in_use,
    openssl_client_context,
    receive_exactly,
    server_tls,
    tls_pair,
)


def contexts(test_pki) -> tuple[ServerTLS, SSL.Context]:
    """The proxy's server context, and a client context that frees OpenSSL's own record buffers as the proxy's
    does: only the buffers the stream manages are measured."""
    client_ctx = openssl_client_context(test_pki, test_pki.alice, version="1.3")
    client_ctx.set_mode(MODE_RELEASE_BUFFERS)
    return server_tls(test_pki, "1.3"), client_ctx


async def open_link(tls: ServerTLS, client_ctx: SSL.Context) -> tuple[TLSStream, TLSStream, SocketStream, SocketStream]:
    """(client, proxy side, backend, far end): a handshaken TLS pair over a socketpair, and the socketpair from the
    proxy to the backend's far end."""
    client_sock, proxy_sock = socket.socketpair()
    proxy_side, client = await tls_pair(lambda: (SocketStream(proxy_sock), SocketStream(client_sock)), tls, client_ctx)
    backend_sock, far_sock = socket.socketpair()
    return client, proxy_side, SocketStream(backend_sock), SocketStream(far_sock)


async def wait_for_eof(stream: trio.abc.ReceiveStream) -> None:
    assert await stream.receive_some() == b""
    await stream.aclose()


async def test_a_quiet_backend_lets_the_client_stream_give_its_buffers_back(test_pki):
    # The client downloads 256 KiB through the pump and then nobody sends.
    # The proxy's TLS stream to the client grew its outgoing buffer to hold
    # each 256 KiB piece; its own read from the client has been waiting since
    # before the download, so only the pump's read of the quiet backend can
    # tell it to give the buffer back. Without that, 20 such connections keep
    # about 570 KiB each (both ends of the test together).
    tls, client_ctx = contexts(test_pki)
    body = bytes(range(251)) * 1045  # 262,295 bytes
    links = []
    proxy_ends = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                client, proxy_side, backend, far_end = await open_link(tls, client_ctx)
                nursery.start_soon(functools.partial(pump, proxy_side, backend, idle_timeout=60))
                links.append((client, far_end))
                proxy_ends.extend((proxy_side, backend))
            for client, far_end in links:
                # A small exchange first, so that what the client keeps of
                # the handshake (its session tickets) is not measured.
                await far_end.send_all(b"hello")
                assert await receive_exactly(client, 5) == b"hello"
            await trio.testing.wait_all_tasks_blocked()
            before = malloc_in_use()
            for client, far_end in links:
                await far_end.send_all(body)
                assert await receive_exactly(client, len(body)) == body
                nursery.start_soon(wait_for_eof, client)  # and the client end waits, as a quiet client does
            await trio.testing.wait_all_tasks_blocked()
            grown = (malloc_in_use() - before) / len(links)
            for _, far_end in links:
                await far_end.send_eof()  # the pump passes it on, the client's read ends
    for stream in (*proxy_ends, *(far_end for _, far_end in links)):
        await trio.aclose_forcefully(stream)
    assert grown < 8 * 1024, f"{grown / 1024:.1f} KiB more per quiet connection after a download"


async def exchange(client: TLSStream, far_end: SocketStream, response: bytes) -> None:
    """One GET from the client through the relay, answered by the far end with ``response``."""
    await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await far_end.receive_some(65536)
    assert head.startswith(b"GET / HTTP/1.1\r\n")
    await far_end.send_all(response)
    assert await receive_exactly(client, len(response)) == response


async def test_after_an_http_download_the_quiet_connection_gives_its_buffers_back(test_pki):
    # The same through HTTP mode's driver: a 256 KiB response, then a client
    # that keeps the connection open and asks nothing more.
    tls, client_ctx = contexts(test_pki)
    body = bytes(range(251)) * 1045
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    nothing = HttpCounters(requests=lambda n: None, status=lambda s: None, up=lambda n: None, down=lambda n: None)

    async def relay_then_close(proxy_side: TLSStream, backend: SocketStream, relay: HttpRelay) -> None:
        await relay_http(proxy_side, backend, relay, idle_timeout=60, counters=nothing)
        await proxy_side.aclose()  # as the proxy does: the client sees close_notify
    links = []
    proxy_ends = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                client, proxy_side, backend, far_end = await open_link(tls, client_ctx)
                relay = HttpRelay(HeaderPolicy({}), client_ip="127.0.0.1", identity=None)
                nursery.start_soon(relay_then_close, proxy_side, backend, relay)
                links.append((client, far_end))
                proxy_ends.extend((proxy_side, backend))
            small = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            for client, far_end in links:
                # A small exchange first, so that what the client keeps of
                # the handshake (its session tickets) is not measured.
                await exchange(client, far_end, small)
            await trio.testing.wait_all_tasks_blocked()
            before = malloc_in_use()
            for client, far_end in links:
                await exchange(client, far_end, response)
                nursery.start_soon(wait_for_eof, client)
            await trio.testing.wait_all_tasks_blocked()
            grown = (malloc_in_use() - before) / len(links)
            for _, far_end in links:
                await far_end.send_eof()
    for stream in (*proxy_ends, *(far_end for _, far_end in links)):
        await trio.aclose_forcefully(stream)
    assert grown < 8 * 1024, f"{grown / 1024:.1f} KiB more per quiet connection after an HTTP download"
