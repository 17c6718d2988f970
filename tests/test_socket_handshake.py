"""The server handshake with OpenSSL on the socket (TLSStream(handshake_on_socket=True)), over real socket pairs.

What the memory BIOs gave for free must still hold: the first bytes for `not_tls`, the alert of a refusal reaching
the client, a reset read as a broken connection; and afterwards the session goes on either way, back over memory
BIOs for the trio stream, or handed over to the data plane where it already is.
"""

from __future__ import annotations

import socket

import pytest
import trio
from OpenSSL import SSL

from proxy.net.sockstream import SocketStream
from proxy.tls.classify import Reason, classify
from proxy.tls.stream import TLSStream
from tests.tlskit import client_connection, openssl_client_context, receive_exactly, server_tls


@pytest.fixture(params=["1.2", "1.3"])
def version(request) -> str:
    return request.param


def socket_pair() -> tuple[SocketStream, SocketStream]:
    a, b = socket.socketpair()
    return SocketStream(a), SocketStream(b)


async def start(test_pki, version, cred):
    """(server, client, record) over a socket pair; the server handshakes on its socket."""
    server_side, client_side = socket_pair()
    conn, record = server_tls(test_pki, version).new_connection()
    server = TLSStream(server_side, conn, delay_session_tickets=False, handshake_on_socket=True)
    ctx = openssl_client_context(test_pki, cred, version=version)
    client = TLSStream(client_side, client_connection(ctx), server_side=False)
    return server, client, record


async def test_after_the_handshake_the_stream_carries_data_both_ways(test_pki, version):
    server, client, _ = await start(test_pki, version, test_pki.alice)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)

        async def client_goes_first() -> None:
            await client.do_handshake()
            await client.send_all(b"right behind the Finished")

        nursery.start_soon(client_goes_first)
    assert server.first_bytes[:1] == b"\x16"  # peeked, and still read by OpenSSL: the handshake completed
    assert await receive_exactly(server, 25) == b"right behind the Finished"
    await server.send_all(b"x" * 100_000)
    assert await receive_exactly(client, 100_000) == b"x" * 100_000
    await server.aclose()
    assert await client.receive_some() == b""  # close_notify, written over the memory BIOs again
    await client.aclose()


async def test_hand_over_keeps_the_session_on_its_socket_with_nothing_decrypted_early(test_pki, version):
    server, client, _ = await start(test_pki, version, test_pki.alice)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    await client.send_all(b"early")
    handed = await server.hand_over()
    assert handed is not None
    session, early, eof = handed
    assert (early, eof) == (b"", False)  # what came behind the handshake is still in the kernel, for the data plane
    await trio.lowlevel.wait_readable(server.transport_stream.socket)
    assert session.write(b"from the plane") == len(b"from the plane")
    assert await receive_exactly(client, 14) == b"from the plane"
    await client.aclose()
    await server.transport_stream.aclose()


async def test_a_plain_http_client_is_classified_not_tls_from_the_peeked_bytes(test_pki, version):
    server_side, client_side = socket_pair()
    conn, record = server_tls(test_pki, version).new_connection()
    server = TLSStream(server_side, conn, handshake_on_socket=True)
    await client_side.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(SSL.Error) as failure:
        await server.do_handshake()
    assert server.first_bytes == b"GET / HT"
    assert classify(failure.value, record, server.first_bytes).reason is Reason.NOT_TLS
    await server.aclose()
    await client_side.aclose()


async def test_a_refused_client_receives_the_alert_openssl_wrote_on_the_socket(test_pki, version):
    server, client, record = await start(test_pki, version, test_pki.untrusted)
    async with trio.open_nursery() as nursery:

        async def server_side() -> None:
            with pytest.raises(SSL.Error) as failure:
                await server.do_handshake()
            assert classify(failure.value, record, server.first_bytes).reason is Reason.UNKNOWN_CA
            await server.aclose()  # lingering: the client's last flight is read and dropped, not reset

        async def client_side() -> None:
            # TLS 1.2 fails the client's handshake; TLS 1.3 its first read after it.
            with pytest.raises((SSL.Error, trio.BrokenResourceError)) as failure:
                await client.do_handshake()
                await client.receive_some()
            assert "unknown ca" in str(failure.value).lower() or "unknown ca" in str(failure.value.__cause__).lower()

        nursery.start_soon(server_side)
        nursery.start_soon(client_side)
    await client.aclose()


async def test_a_reset_during_the_handshake_is_a_broken_connection(test_pki, version):
    server_side, client_side = socket_pair()
    conn, record = server_tls(test_pki, version).new_connection()
    server = TLSStream(server_side, conn, handshake_on_socket=True)
    client_side.socket.send(b"\x16\x03\x01\x00\x05")  # the start of a record, then a reset
    client_side.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await client_side.aclose()
    with pytest.raises((trio.BrokenResourceError, SSL.Error)) as failure:
        await server.do_handshake()
    assert classify(failure.value, record, server.first_bytes).reason is Reason.CLIENT_CLOSED
    await server.aclose()


async def test_a_client_that_closes_at_once_is_client_closed(test_pki, version):
    server_side, client_side = socket_pair()
    conn, record = server_tls(test_pki, version).new_connection()
    server = TLSStream(server_side, conn, handshake_on_socket=True)
    await client_side.aclose()
    with pytest.raises(SSL.Error) as failure:
        await server.do_handshake()
    assert server.first_bytes == b""
    assert classify(failure.value, record, server.first_bytes).reason is Reason.CLIENT_CLOSED
    await server.aclose()
