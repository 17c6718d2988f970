"""proxy.relay.connection: each phase a connection can end in, and the outcome it records.

A Connection runs here on one end of a socketpair, with a real TLS client on the other end and real backends on
Unix sockets (or a loopback TCP listener whose backlog is full, for a connect that never completes). Connecting to a
Unix socket and moving bytes through a socketpair complete without waiting, so under the autojump clock time moves
only when every task waits for a deadline: the handshake timeout, the backend connect timeout, the idle timeout.
The access-log line is checked as the JSON formatter writes it, so the outcome strings operators see are the ones
asserted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from OpenSSL import SSL
from prometheus_client import CollectorRegistry

from proxy.config.materials import load_all
from proxy.config.schema import parse
from proxy.net.sockstream import SocketStream
from proxy.ops.logs import JsonFormatter
from proxy.ops.metrics import Metrics
from proxy.relay.connection import Connection, ListenerRuntime, Phase, PhaseError
from proxy.relay.forwarders import HTTP1Forwarder, HTTP2Forwarder, HTTPForwarder, TCPForwarder
from proxy.tls.context import build_server_tls
from proxy.tls.stream import TLSStream
from tests.conftest import LISTENER, Backend, echo_handler, listener_config, serve_listeners_as_backend
from tests.tlskit import client_connection, handshake_both, openssl_client_context, receive_all, server_tls, tls_pair

if TYPE_CHECKING:
    from tests.conftest import TestPKI  # not imported at run time: pytest would try to collect it as a test class

REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


# ---- helpers -------------------------------------------------------------------------------------------------------


class Runtime:
    """A listener's runtime, built as the daemon builds it, with its own metrics registry."""

    def __init__(self, test_pki: TestPKI, address: str, **overrides: Any) -> None:
        config = parse({"listeners": [listener_config(test_pki, address, **overrides)]}, source="test")
        listener = config.listeners[0]
        self.registry = CollectorRegistry()
        self.rt = ListenerRuntime(config=listener, tls=build_server_tls(listener, load_all(config)[0]),
                                  metrics=Metrics(self.registry).for_listener(listener.name))

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(f"mtls_proxy_{name}", {"listener": LISTENER, **labels})
        return 0.0 if value is None else value


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="conn-") as d:
        yield Path(d)


async def unix_backend(nursery: trio.Nursery, path: Path, handler: Any) -> Backend:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    return await serve_listeners_as_backend(nursery, [trio.SocketListener(sock)], handler)


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on loopback: the HTTP relay names the client by its IP address."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client_end = socket.create_connection(listener.getsockname())
        proxy_end, _ = listener.accept()
    return proxy_end, client_end


@asynccontextmanager
async def running(rt: ListenerRuntime, *, tcp: bool = False) -> AsyncIterator[tuple[Connection, SocketStream]]:
    """A Connection on one end of a socketpair (or of a loopback TCP connection), running; the other end is the
    client's.

    Leaving the block waits until the connection has closed and logged (or a minute has passed: a test that fails
    must not hang).
    """
    proxy_end, client_end = loopback_pair() if tcp else socket.socketpair()
    conn = Connection(SocketStream(proxy_end), rt)
    client = SocketStream(client_end)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            yield conn, client
            nursery.cancel_scope.deadline = trio.current_time() + 60
    finally:
        await trio.aclose_forcefully(client)


def tls_client(end: SocketStream, test_pki: TestPKI, cred: Any = "alice") -> TLSStream:
    cred = getattr(test_pki, cred) if isinstance(cred, str) else cred
    return TLSStream(end, client_connection(openssl_client_context(test_pki, cred)), server_side=False)


async def refused_client(end: SocketStream, test_pki: TestPKI, cred: Any) -> None:
    """Try the handshake and a read: with TLS 1.3 a refused certificate shows on the read."""
    client = tls_client(end, test_pki, cred)
    with contextlib.suppress(SSL.Error, trio.BrokenResourceError):
        await client.do_handshake()
        await client.receive_some()


def access_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The connection's one access-log line, as the JSON log carries it."""
    records = [r for r in caplog.records if r.name == "proxy.access"]
    assert len(records) == 1, records
    line: dict[str, Any] = json.loads(JsonFormatter().format(records[0]))
    return line


@pytest.fixture(autouse=True)
def _access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")


# ---- the handshake -------------------------------------------------------------------------------------------------


async def test_a_client_that_sends_nothing_is_cut_at_the_handshake_deadline(autojump_clock, test_pki, caplog):
    r = Runtime(test_pki, "unix:/nonexistent/backend.sock", timeouts={"handshake": 5})
    started = trio.current_time()
    async with running(r.rt) as (conn, _client):
        pass  # connected, and silent
    elapsed = trio.current_time() - started
    # Never early; at most the jitter later (10%), so a burst's deadlines are spread.
    assert 5.0 <= elapsed <= 5.5 + 0.01, elapsed
    assert conn.phase is Phase.HANDSHAKE
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("handshake_failed", "timeout"), line
    assert line["detail"] == "handshake deadline passed; the client sent nothing"
    assert 5000 <= line["handshake_ms"] <= 5510
    assert r.metric("handshake_failures_total", reason="timeout") == 1
    assert r.metric("handshakes_total", result="failure") == 1


async def test_a_client_without_a_certificate_fails_the_handshake(test_pki, caplog):
    r = Runtime(test_pki, "unix:/nonexistent/backend.sock")
    async with running(r.rt) as (conn, client):
        await refused_client(client, test_pki, None)
    assert conn.phase is Phase.HANDSHAKE
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("handshake_failed", "no_client_cert"), line
    assert "client_subject" not in line
    assert r.metric("handshake_failures_total", reason="no_client_cert") == 1
    assert r.metric("backend_connect_failures_total") == 0  # never got as far as the backend


async def test_a_client_no_allow_rule_admits_fails_the_handshake_and_is_named(test_pki, caplog):
    r = Runtime(test_pki, "unix:/nonexistent/backend.sock",
                client_auth={"allow": {"common_names": ["alice"]}})
    async with running(r.rt) as (conn, client):
        await refused_client(client, test_pki, "bob")
    assert conn.phase is Phase.HANDSHAKE
    assert conn.line.identity is not None and conn.line.identity.common_names == ("bob",)
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("handshake_failed", "forbidden"), line
    assert line["client_subject"].startswith("CN=bob"), line
    assert r.metric("handshake_failures_total", reason="forbidden") == 1
    assert r.metric("backend_connect_failures_total") == 0


async def test_phases_run_only_in_their_order(test_pki):
    r = Runtime(test_pki, "unix:/nonexistent/backend.sock")
    proxy_end, client_end = socket.socketpair()
    conn = Connection(SocketStream(proxy_end), r.rt)
    with pytest.raises(PhaseError):
        await conn.connect(r.rt.forwarder.choose(conn))
    with pytest.raises(PhaseError):
        conn.identify()
    assert conn.phase is Phase.ACCEPTED
    await conn.close()
    client_end.close()


# ---- the backend ---------------------------------------------------------------------------------------------------


async def test_a_backend_that_is_down_ends_a_tcp_connection_after_its_handshake(test_pki, caplog, sock_dir):
    r = Runtime(test_pki, f"unix:{sock_dir}/nobody.sock")
    async with running(r.rt) as (conn, end):
        client = tls_client(end, test_pki)
        await client.do_handshake()
        assert await client.receive_some() == b""  # close_notify: nothing to say in TCP
    assert conn.phase is Phase.CONNECT
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("backend_failed", "backend_connect"), line
    assert "No such file or directory" in line["detail"], line
    assert line["client_subject"].startswith("CN=alice"), line  # identified before the backend failed
    assert r.metric("handshakes_total", result="success") == 1
    assert r.metric("backend_connect_failures_total") == 1


async def test_a_backend_that_is_down_gets_an_http_client_a_502(test_pki, caplog, sock_dir):
    r = Runtime(test_pki, f"unix:{sock_dir}/nobody.sock", backend={"protocol": "http"})
    async with running(r.rt, tcp=True) as (conn, end):
        client = tls_client(end, test_pki)
        await client.do_handshake()
        await client.send_all(REQUEST)
        reply = await receive_all(client)
    assert reply.startswith(b"HTTP/1.1 502 "), reply
    assert conn.phase is Phase.CONNECT
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("backend_failed", "backend_connect"), line
    assert r.metric("http_responses_total", code="502") == 1


async def test_the_client_address_is_the_one_read_at_accept_even_after_the_client_is_gone(test_pki, echo_backend):
    # The HTTP relay and the PROXY header name the client; asking its socket once the client has reset raised
    # "Transport endpoint is not connected", and the connection was logged as failed unexpectedly.
    r = Runtime(test_pki, echo_backend.address, backend={"protocol": "http"})
    proxy_end, client_end = loopback_pair()
    conn = Connection(SocketStream(proxy_end), r.rt)
    client_port = client_end.getsockname()[1]
    client_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client_end.close()  # a reset
    await trio.sleep(0.05)
    with pytest.raises(OSError):
        proxy_end.getpeername()
    assert conn.client_host() == "127.0.0.1"
    assert conn.client == f"127.0.0.1:{client_port}"
    proxy_end.close()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: the kernel drops further SYNs, so a connect waits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # the one connection the queue holds
            yield port


async def test_a_backend_connect_ends_at_its_timeout(autojump_clock, test_pki, caplog, unanswered_port):
    r = Runtime(test_pki, f"127.0.0.1:{unanswered_port}", backend={"connect_timeout": 3})
    async with running(r.rt) as (conn, end):
        client = tls_client(end, test_pki)
        await client.do_handshake()
        handshaken = trio.current_time()
        assert await client.receive_some() == b""
        waited = trio.current_time() - handshaken
    assert 3.0 <= waited < 3.01, waited
    assert conn.phase is Phase.CONNECT
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("backend_failed", "backend_connect"), line
    assert line["detail"] == f"connect to 127.0.0.1:{unanswered_port} timed out after 3s", line
    assert r.metric("backend_connect_failures_total") == 1


async def test_a_backend_connect_that_times_out_gets_an_http_client_a_504(test_pki, caplog, unanswered_port):
    # Real time (a quarter of a second): the client is on TCP here, whose loopback delivery the autojump clock
    # could overtake.
    r = Runtime(test_pki, f"127.0.0.1:{unanswered_port}", backend={"protocol": "http", "connect_timeout": 0.25})
    async with running(r.rt, tcp=True) as (_conn, end):
        client = tls_client(end, test_pki)
        await client.do_handshake()
        await client.send_all(REQUEST)
        reply = await receive_all(client)
    assert reply.startswith(b"HTTP/1.1 504 "), reply
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("backend_failed", "backend_connect"), line
    assert r.metric("http_responses_total", code="504") == 1


async def test_a_proxy_header_that_cannot_be_built_fails_closed_before_the_backend(test_pki, caplog, sock_dir):
    # The client here is on a Unix socket, which a PROXY header cannot describe: the backend must not be reached
    # without the header it expects.
    async with trio.open_nursery() as nursery:
        backend = await unix_backend(nursery, sock_dir / "b.sock", echo_handler)
        r = Runtime(test_pki, f"unix:{sock_dir}/b.sock", backend={"proxy_protocol": "v1"})
        async with running(r.rt) as (conn, end):
            client = tls_client(end, test_pki)
            await client.do_handshake()
            assert await client.receive_some() == b""
        nursery.cancel_scope.cancel()
    assert backend.accepted == 0
    assert conn.phase is Phase.CONNECT
    line = access_line(caplog)
    assert (line["outcome"], line["reason"]) == ("error", "proxy_protocol"), line


# ---- forwarding ----------------------------------------------------------------------------------------------------


async def forwarded(test_pki: TestPKI, sock_dir: Path, handler: Any, client_side: Any, **overrides: Any
                    ) -> tuple[Connection, Runtime, Any]:
    """Run one connection through a backend on a Unix socket; ``client_side(client)`` is the client's part."""
    async with trio.open_nursery() as nursery:
        await unix_backend(nursery, sock_dir / "b.sock", handler)
        r = Runtime(test_pki, f"unix:{sock_dir}/b.sock", **overrides)
        async with running(r.rt) as (conn, end):
            client = tls_client(end, test_pki)
            await client.do_handshake()
            got = await client_side(client)
        nursery.cancel_scope.cancel()
    assert conn.phase is Phase.FORWARD
    return conn, r, got


async def test_a_client_that_ends_first_gets_the_whole_answer_and_the_end_is_eof(test_pki, caplog, sock_dir):
    async def client_side(client: TLSStream) -> bytes:
        await client.send_all(b"ping")
        await client.send_eof()
        return await receive_all(client)

    _conn, r, got = await forwarded(test_pki, sock_dir, echo_handler, client_side)
    assert got == b"ping"
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "eof"), line
    assert (line["bytes_up"], line["bytes_down"]) == (4, 4)
    assert "reason" not in line
    assert r.metric("bytes_total", direction="client_to_backend") == 4


async def test_a_backend_that_ends_first_is_passed_on_with_close_notify(test_pki, caplog, sock_dir):
    async def answer_and_close(stream: trio.SocketStream, backend: Backend) -> None:
        await stream.send_all(b"bye")

    async def client_side(client: TLSStream) -> bytes:
        got = await receive_all(client)  # ends at close_notify: a clean end
        await client.aclose()
        return got

    _conn, _r, got = await forwarded(test_pki, sock_dir, answer_and_close, client_side)
    assert got == b"bye"
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "eof"), line
    assert (line["bytes_up"], line["bytes_down"]) == (0, 3)


async def test_a_client_that_drops_the_connection_ends_it_as_client_error(test_pki, caplog, sock_dir):
    async def client_side(client: TLSStream) -> None:
        await client.send_all(b"ping")
        await trio.aclose_forcefully(client.transport_stream)  # no close_notify, and the echo unread

    _conn, _r, _ = await forwarded(test_pki, sock_dir, echo_handler, client_side)
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "client_error"), line


async def test_a_backend_that_resets_ends_it_as_backend_error_without_close_notify(test_pki, caplog, sock_dir):
    async def reset(stream: trio.SocketStream, backend: Backend) -> None:
        await trio.lowlevel.wait_readable(stream.socket)  # then close with the request unread: a reset

    async def client_side(client: TLSStream) -> str:
        await client.send_all(b"request")
        try:
            await client.receive_some()
        except trio.BrokenResourceError as exc:
            return str(exc)
        return "a clean end"

    _conn, _r, ending = await forwarded(test_pki, sock_dir, reset, client_side)
    # The client must not take what it got for a complete answer.
    assert ending == "the peer closed without close_notify", ending
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "backend_error"), line


async def test_a_connection_where_nobody_sends_ends_at_the_idle_timeout(autojump_clock, test_pki, caplog, sock_dir):
    async def silent(stream: trio.SocketStream, backend: Backend) -> None:
        await trio.sleep_forever()

    async def client_side(client: TLSStream) -> float:
        started = trio.current_time()
        assert await client.receive_some() == b""
        return trio.current_time() - started

    _conn, _r, waited = await forwarded(test_pki, sock_dir, silent, client_side, timeouts={"idle": 30})
    assert 30.0 <= waited <= 31.0 + 0.01, waited  # the idle deadline's granularity: never early, at most 1 s late
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "idle_timeout"), line


# ---- the forwarder, and what the TLS stream tells the connection ------------------------------------------------


def test_the_forwarder_is_chosen_once_per_listener_from_its_backend_protocol(test_pki):
    tcp = Runtime(test_pki, "127.0.0.1:1").rt
    http = Runtime(test_pki, "127.0.0.1:1", backend={"protocol": "http"}).rt
    assert isinstance(tcp.forwarder, TCPForwarder)
    assert isinstance(http.forwarder, HTTPForwarder)
    # In HTTP mode each connection gets HTTP/2 or HTTP/1.1, as ALPN decided.
    assert isinstance(http.forwarder.http1, HTTP1Forwarder) and isinstance(http.forwarder.http2, HTTP2Forwarder)


async def test_the_stream_tells_what_was_negotiated_and_with_whom(test_pki):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = SocketStream.take_over(await listeners[0].accept())
    conn, _record = server_tls(test_pki, "1.3", tls={"alpn": ["http/1.1"]}).new_connection()
    server = TLSStream(server_tcp, conn)
    client_conn = client_connection(openssl_client_context(test_pki, test_pki.carol))
    client_conn.set_alpn_protos([b"h2", b"http/1.1"])
    client = TLSStream(client_tcp, client_conn, server_side=False)
    await handshake_both(server, client)

    assert server.peer_address() == client_tcp.socket.getsockname()
    assert server.local_address() == ("127.0.0.1", port)
    assert server.server_name == "localhost"
    assert (server.version, server.alpn_protocol, server.resumed) == ("TLSv1.3", "http/1.1", False)
    assert server.cipher is not None and server.cipher.startswith("TLS_")
    carol = test_pki.carol.issued.cert
    assert server.peer_certificate() == carol
    # Leaf first, through the intermediate carol presented, to the trusted root.
    assert [c.subject for c in server.peer_certificate_chain()] == [
        carol.subject, test_pki.intermediate.cert.subject, test_pki.client_ca_issued.cert.subject]
    for stream in (server, client):
        await stream.aclose()
    await listeners[0].aclose()


async def test_a_stream_over_memory_has_no_address_and_an_anonymous_peer_has_no_certificate(test_pki):
    tls = server_tls(test_pki, client_auth={"mode": "optional"})
    server, client = await tls_pair(trio.testing.memory_stream_pair, tls,
                                    openssl_client_context(test_pki, None))
    assert (server.peer_address(), server.local_address()) == (None, None)
    assert server.peer_certificate() is None
    assert server.peer_certificate_chain() == []
    assert server.peer_certificate_sha256() is None
    assert client.peer_certificate() is not None  # the server's, seen from the client


async def test_a_resumed_session_keeps_the_peer_certificate_but_not_the_chain(test_pki):
    # Why a resumed connection's identity comes from the cache (or the leaf alone), never from a chain.
    tls = server_tls(test_pki, "1.2")
    ctx = openssl_client_context(test_pki, test_pki.alice, version="1.2")
    first, first_client = await tls_pair(trio.testing.memory_stream_pair, tls, ctx)
    assert len(first.peer_certificate_chain()) == 2 and not first.resumed
    resuming = client_connection(ctx)
    resuming.set_session(first_client.connection.get_session())
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = TLSStream(server_transport, tls.new_connection()[0])
    await handshake_both(server, TLSStream(client_transport, resuming, server_side=False))
    assert server.resumed
    assert server.peer_certificate() == test_pki.alice.issued.cert
    assert server.peer_certificate_sha256() == test_pki.alice.issued.sha256
    assert server.peer_certificate_chain() == []


async def test_a_connection_cut_while_forwarding_is_logged_as_cancelled(test_pki, caplog, sock_dir):
    # The drain deadline (or a second signal) cancels connections that are still relaying: the line says so.
    cut = trio.CancelScope()

    async def connection(conn: Connection) -> None:
        with cut:
            await conn.run()

    async with trio.open_nursery() as nursery:
        await unix_backend(nursery, sock_dir / "b.sock", echo_handler)
        r = Runtime(test_pki, f"unix:{sock_dir}/b.sock")
        proxy_end, client_end = socket.socketpair()
        nursery.start_soon(connection, Connection(SocketStream(proxy_end), r.rt))
        client = tls_client(SocketStream(client_end), test_pki)
        await client.do_handshake()
        await client.send_all(b"ping")
        assert await client.receive_some() == b"ping"
        cut.cancel()
        with trio.fail_after(5):
            while not [rec for rec in caplog.records if rec.name == "proxy.access"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    line = access_line(caplog)
    assert (line["outcome"], line["ended_by"]) == ("ok", "cancelled"), line
