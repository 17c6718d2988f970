"""proxy.sockstream.SocketStream: trio's own conformance checks for a half-closeable stream, over real sockets."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.sockstream import SocketStream


def socket_pair() -> tuple[SocketStream, SocketStream]:
    left, right = socket.socketpair()
    return SocketStream(left), SocketStream(right)


async def tcp_pair() -> tuple[SocketStream, SocketStream]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream(*listener.getsockname())
    server_sock, _ = await listener.accept()
    listener.close()
    return SocketStream.take_over(client), SocketStream.take_over(trio.SocketStream(server_sock))


async def unix_pair() -> tuple[SocketStream, SocketStream]:
    return socket_pair()


@pytest.mark.parametrize("make_pair", [tcp_pair, unix_pair], ids=["tcp", "unix"])
async def test_passes_trios_half_closeable_stream_checks(make_pair) -> None:
    # Sending, receiving, half-close, busy detection, closing while another
    # task waits, cancellation: the same checks trio runs on its SocketStream.
    await trio.testing.check_half_closeable_stream(make_pair, None)


async def test_take_over_keeps_the_connection_and_its_options() -> None:
    a, b = await tcp_pair()
    assert a.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # set by trio before the take-over
    await a.send_all(b"ping")
    assert await b.receive_some(10) == b"ping"
    await a.aclose()
    await b.aclose()


async def test_a_reset_connection_is_broken_not_an_oserror() -> None:
    a, b = await tcp_pair()
    b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await b.aclose()  # linger 0: the close sends a reset
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still be accepted by the kernel
            await a.send_all(b"x" * 65536)
    await a.aclose()
