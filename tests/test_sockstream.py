"""proxy.net.sockstream: trio's own conformance checks for the SocketStream over real sockets, and the
SocketListener."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.net.sockstream import NOTSENT_LOWAT, SocketListener, SocketStream


def socket_pair() -> tuple[SocketStream, SocketStream]:
    left, right = socket.socketpair()
    return SocketStream(left), SocketStream(right)


async def tcp_pair() -> tuple[SocketStream, SocketStream]:
    async with listening() as listener:
        client = await trio.open_tcp_stream(*listener.socket.getsockname())
        return SocketStream.take_over(client), await listener.accept()


def listening() -> SocketListener:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return SocketListener(sock)


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


# ---- the listener ----------------------------------------------------------------


async def test_accepted_streams_have_trios_tcp_options() -> None:
    async with listening() as listener:
        client = socket.create_connection(listener.socket.getsockname())
        server = await listener.accept()
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
        client.sendall(b"hello")
        assert await server.receive_some(10) == b"hello"
        await server.aclose()
        client.close()


async def test_accept_is_a_checkpoint_even_with_a_connection_waiting() -> None:
    async with listening() as listener:
        client = socket.create_connection(listener.socket.getsockname())
        with trio.CancelScope() as scope:
            scope.cancel()
            await listener.accept()  # cancelled before it takes the connection
        assert scope.cancelled_caught
        with trio.testing.assert_checkpoints():
            server = await listener.accept()  # the connection is still there
        await server.aclose()
        client.close()


async def test_accepted_streams_know_their_peer_from_the_accept() -> None:
    async with listening() as listener:
        client = socket.create_connection(listener.socket.getsockname())
        address = client.getsockname()
        server = await listener.accept()
        assert server.peer_address == address  # what accept() said: no getpeername needed
        other = SocketStream(socket.socket())
        assert other.peer_address is None  # a stream made otherwise does not know it
        other.close()
        await server.aclose()
        client.close()


async def test_accept_after_an_empty_backlog_waits_for_the_next_connection() -> None:
    async with listening() as listener:
        assert listener.accept_waiting() is None  # nothing waits: the next accept() waits before it tries
        async with trio.open_nursery() as nursery:
            accepted: list[SocketStream] = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(accept)
            await trio.testing.wait_all_tasks_blocked()
            assert not accepted
            client = socket.create_connection(listener.socket.getsockname())
        (server,) = accepted
        client.sendall(b"hello")
        assert await server.receive_some(10) == b"hello"
        await server.aclose()
        client.close()


async def test_aclose_wakes_a_blocked_accept() -> None:
    listener = listening()
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()

        nursery.start_soon(accept)
        await trio.testing.wait_all_tasks_blocked()
        await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
    with pytest.raises(ConnectionRefusedError):  # the port is really closed
        socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_take_over_of_a_trio_listener() -> None:
    (trio_listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = SocketListener.take_over(trio_listener)
    assert trio_listener.socket.fileno() == -1  # detached: closing it does nothing
    async with listener:
        client = await trio.open_tcp_stream(*listener.socket.getsockname())
        server = await listener.accept()
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"
        await server.aclose()
        await client.aclose()
