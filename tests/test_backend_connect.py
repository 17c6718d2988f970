"""proxy.net.backend.connect_backend against real loopback peers: a listener, a Unix socket, a refused port, a
listener whose backlog is full (the connect hangs, as it does for a black-holed address), and host names that
resolve to several addresses (through trio's hook for a custom resolver, so no DNS is involved)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import trio

from proxy.config.schema import TCPAddress, UnixAddress
from proxy.net.backend import BackendError, connect_backend
from proxy.net.sockstream import NOTSENT_LOWAT, SocketListener, SocketStream


async def tcp_listener(host: str = "127.0.0.1") -> SocketListener:
    (listener,) = await trio.open_tcp_listeners(0, host=host)
    return SocketListener.take_over(listener)


async def assert_connected(stream: SocketStream, listener: SocketListener) -> None:
    """``stream`` reaches ``listener``'s peer both ways."""
    with trio.fail_after(5):
        accepted = await listener.accept()
        async with accepted:
            await stream.send_all(b"ping")
            assert await accepted.receive_some() == b"ping"
            await accepted.send_all(b"pong")
            assert await stream.receive_some() == b"pong"


def unused_port() -> tuple[socket.socket, int]:
    """A port held (bound, not listening) so that nothing else takes it: connecting to it is refused."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full: Linux drops further SYNs, so a connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued: list[socket.socket] = []
    try:
        while True:
            client = socket.socket()
            client.settimeout(0.2)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                client.close()
                break
            queued.append(client)
            assert len(queued) < 100, "the backlog never filled"
        yield port
    finally:
        for client in queued:
            client.close()
        listener.close()


# ---- addresses given as such --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_ip_literal_connects_with_the_options_trio_sets(host):
    listener = await tcp_listener(host)
    port = listener.socket.getsockname()[1]
    async with listener:
        stream = await connect_backend(TCPAddress(host, port), timeout=5)
        async with stream:
            assert isinstance(stream, SocketStream)
            assert stream.socket.getpeername()[:2] == (host, port)
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
            await assert_connected(stream, listener)


async def test_a_unix_socket_connects(tmp_path):
    path = tmp_path / "backend.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    async with SocketListener(server) as listener:
        stream = await connect_backend(UnixAddress(path), timeout=5)
        async with stream:
            assert isinstance(stream, SocketStream)
            await assert_connected(stream, listener)


async def test_a_refused_port_is_a_backend_error_saying_so():
    holder, port = unused_port()
    with holder, pytest.raises(BackendError) as raised:
        await connect_backend(TCPAddress("127.0.0.1", port), timeout=5)
    # trio's connect() names the address in its error too.
    assert str(raised.value) == (f"connect to 127.0.0.1:{port} failed: "
                                 f"Error connecting to ('127.0.0.1', {port}): Connection refused")
    assert not raised.value.timed_out


async def test_a_missing_unix_socket_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError) as raised:
        await connect_backend(UnixAddress(tmp_path / "absent.sock"), timeout=5)
    assert str(raised.value) == f"connect to unix:{tmp_path / 'absent.sock'} failed: No such file or directory"
    assert not raised.value.timed_out


async def test_a_backend_that_does_not_answer_times_out_in_real_time():
    with full_backlog() as port:
        start = trio.current_time()
        with pytest.raises(BackendError) as raised:
            await connect_backend(TCPAddress("127.0.0.1", port), timeout=0.3)
        elapsed = trio.current_time() - start
    assert raised.value.timed_out
    assert str(raised.value) == f"connect to 127.0.0.1:{port} timed out after 0.3s"
    assert 0.3 <= elapsed < 3, elapsed


async def test_the_connect_timeout_is_the_one_given(autojump_clock):
    # Virtual time: the clock jumps to the deadline as soon as everything waits, so 5 s take no time.
    with full_backlog() as port:
        start = trio.current_time()
        with pytest.raises(BackendError) as raised:
            await connect_backend(TCPAddress("127.0.0.1", port), timeout=5)
        assert trio.current_time() - start == pytest.approx(5)
    assert raised.value.timed_out
    assert str(raised.value) == f"connect to 127.0.0.1:{port} timed out after 5s"


# ---- names --------------------------------------------------------------------------------------------------


class Resolver(trio.abc.HostnameResolver):
    """Answers for made-up names with the loopback addresses given; anything else is not found."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[bytes | None] = []

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        self.asked.append(host)
        await trio.lowlevel.checkpoint()
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))
                for address in self.names[name]]

    async def getnameinfo(self, sockaddr, flags):
        raise NotImplementedError


@pytest.fixture
async def resolver():
    resolver = Resolver({})
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    yield resolver
    trio.socket.set_custom_hostname_resolver(previous)


@pytest.mark.parametrize("addresses", [["127.0.0.2", "127.0.0.1"], ["127.0.0.1", "127.0.0.2"]],
                         ids=["refused-first", "listening-first"])
async def test_a_name_with_several_addresses_reaches_the_one_that_answers(resolver, addresses):
    # The listener is on 127.0.0.1 only: 127.0.0.2 (loopback too) refuses the port.
    listener = await tcp_listener("127.0.0.1")
    port = listener.socket.getsockname()[1]
    resolver.names["backend.test"] = addresses
    async with listener:
        stream = await connect_backend(TCPAddress("backend.test", port), timeout=5)
        async with stream:
            assert isinstance(stream, SocketStream)
            assert stream.socket.getpeername() == ("127.0.0.1", port)
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await assert_connected(stream, listener)
    assert resolver.asked == [b"backend.test"]


async def test_a_name_whose_addresses_all_refuse_is_a_backend_error(resolver):
    holder, port = unused_port()
    resolver.names["down.test"] = ["127.0.0.1", "127.0.0.2"]
    with holder, pytest.raises(BackendError) as raised:
        await connect_backend(TCPAddress("down.test", port), timeout=5)
    address = f"down.test:{port}"
    assert str(raised.value) == f"connect to {address} failed: all attempts to connect to {address} failed"
    assert not raised.value.timed_out


async def test_a_name_that_does_not_resolve_is_a_backend_error(resolver):
    with pytest.raises(BackendError) as raised:
        await connect_backend(TCPAddress("nowhere.test", 8080), timeout=5)
    assert str(raised.value) == "connect to nowhere.test:8080 failed: Name or service not known"
    assert not raised.value.timed_out
