"""Upgrade through the real proxy to a real backend: Hypercorn, which speaks h2c and WebSocket.

An h2c upgrade used to turn the connection into a raw pump, after which the client's HTTP/2 streams reached the
application with whatever identity headers the client wrote. Here the application records every request it gets
(its HTTP version and headers) and the tests assert what it saw: the proxy's identity headers only, never an
HTTP/2 request. The clients are the stdlib's ssl (a TLS stack independent of the proxy's) with h2 and wsproto,
the protocol libraries Hypercorn itself uses.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hypercorn.config
import hypercorn.trio
import trio
import yaml
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

from tests.conftest import client_context, start_backend, start_proxy, wait_for

FORGED_HEADERS = [
    ("x-forwarded-client-cert", 'Hash=FORGED;Subject="CN=admin"'),
    ("x-client-verify", "SUCCESS"),
    ("x-forwarded-for", "10.6.6.6"),
]
IDENTITY_HEADERS = {"X-Client-Verify": "verify"}
READ_TIMEOUT = 5.0  # seconds a client waits for the proxy; every loop below also ends at EOF


# ---- the application behind Hypercorn: records what it was given -------------------------------------------------


@dataclass
class Seen:
    """One request (or WebSocket) as the application got it."""

    kind: str  # "http" or "websocket"
    http_version: str
    headers: dict[str, list[str]] = field(default_factory=dict)


def recording_app(seen: list[Seen]):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            return
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        seen.append(Seen(scope["type"], scope["http_version"], headers))
        if scope["type"] == "websocket":
            await echo_websocket(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        body = json.dumps(headers).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    return app


async def run_lifespan(receive, send) -> None:
    while True:
        event = await receive()
        await send({"type": event["type"] + ".complete"})  # lifespan.startup / lifespan.shutdown
        if event["type"] == "lifespan.shutdown":
            return


async def echo_websocket(receive, send) -> None:
    while True:
        event = await receive()
        if event["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif event["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": "echo: " + event["text"]})
        else:
            return


async def start_hypercorn(nursery, seen: list[Seen]) -> str:
    """Hypercorn on a free loopback port, cleartext (so h2c is on offer); returns host:port."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    binds = await nursery.start(hypercorn.trio.serve, recording_app(seen), config)
    return binds[0].removeprefix("http://")


async def optional_mode_proxy(nursery, test_pki, backend_address: str, **backend):
    return await start_proxy(
        nursery, test_pki, backend_address,
        client_auth={"mode": "optional"},
        backend={"protocol": "http", "identity_headers": IDENTITY_HEADERS, **backend},
    )


# ---- the attacking client ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    first_status: int  # the status line the upgrade request got
    later: bytes = b""  # what came back after the HTTP/2 frames


def h2c_upgrade_with_forged_headers(port: int, ctx: ssl.SSLContext) -> Outcome:
    """The h2c upgrade request with forged identity headers, then HTTP/2 frames with forged headers.

    If the proxy switched (101), the frames ride the tunnel as stream 3 of the upgraded connection. If not, they
    are sent anyway, as HTTP/2 with prior knowledge on the same connection: nothing of them may reach the backend
    as a request either.
    """
    h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
    settings = h2conn.initiate_upgrade_connection()
    request = (
        "GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: {settings.decode('ascii')}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in FORGED_HEADERS)
        + "\r\n"
    ).encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            head, rest = read_head(tls)
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                rest = read_body(tls, head, rest)
                h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                h2conn.initiate_connection()
            stream_id = h2conn.get_next_available_stream_id()
            h2conn.send_headers(stream_id, [(":method", "GET"), (":path", "/h2"), (":scheme", "https"),
                                            (":authority", "localhost"), *FORGED_HEADERS], end_stream=True)
            tls.sendall(h2conn.data_to_send())
            return Outcome(status, read_until_stream_ends(tls, h2conn, stream_id, b"" if status != 101 else rest))


def read_head(tls: ssl.SSLSocket) -> tuple[bytes, bytes]:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = tls.recv(65536)
        assert chunk, f"closed before a response head: {got!r}"
        got += chunk
    head, rest = got.split(b"\r\n\r\n", 1)
    return head, rest


def read_body(tls: ssl.SSLSocket, head: bytes, rest: bytes) -> bytes:
    """The Content-Length body of a response (the test app and the proxy's errors always send one)."""
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest[:length]


def read_until_stream_ends(tls: ssl.SSLSocket, h2conn, stream_id: int, already: bytes) -> bytes:
    """Everything the server sends until it closes or ends `stream_id` (bounded by the socket timeout)."""
    got = already
    if already:
        h2conn.receive_data(already)
    while True:
        try:
            chunk = tls.recv(65536)
        except (OSError, ssl.SSLError):
            return got
        if not chunk:
            return got
        got += chunk
        try:
            events = h2conn.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            continue  # not HTTP/2: the proxy's own HTTP/1.1 answer; read on to its close
        if any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in events):
            return got


def assert_only_the_proxys_identity(seen: list[Seen]) -> None:
    for request in seen:
        assert request.http_version == "1.1", request
        assert "x-forwarded-client-cert" not in request.headers, request
        assert request.headers["x-client-verify"] == ["NONE"], request
        assert request.headers["x-forwarded-for"] == ["127.0.0.1"], request
        assert "http2-settings" not in request.headers and "upgrade" not in request.headers, request


# ---- tests -------------------------------------------------------------------------------------------------------


async def test_h2c_upgrade_cannot_carry_forged_identity_to_the_application(nursery, test_pki):
    seen: list[Seen] = []
    p = await optional_mode_proxy(nursery, test_pki, await start_hypercorn(nursery, seen))
    outcome = await trio.to_thread.run_sync(h2c_upgrade_with_forged_headers, p.port, client_context(test_pki))
    # The upgrade request went on as a plain HTTP/1.1 request; the HTTP/2 frames after it were refused.
    assert outcome.first_status == 200
    assert outcome.later.startswith(b"HTTP/1.1 400 ")
    assert [request.kind for request in seen] == ["http"]
    assert_only_the_proxys_identity(seen)
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="400") == 1)
    assert p.metric("mtls_proxy_http_responses_total", code="101") == 0


async def test_a_101_the_proxy_did_not_allow_is_502_and_opens_no_tunnel(nursery, test_pki, caplog):
    """A backend that switches to h2c although no Upgrade reached it (a rogue or buggy one)."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    received = []

    async def switching_backend(stream, backend):
        received.append(await stream.receive_some(65536))
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                              b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame after it
        while await stream.receive_some(65536):
            received.append(b"after the 101")

    backend = await start_backend(nursery, switching_backend)
    p = await optional_mode_proxy(nursery, test_pki, backend.address)
    outcome = await trio.to_thread.run_sync(h2c_upgrade_with_forged_headers, p.port, client_context(test_pki))
    assert outcome.first_status == 502
    assert outcome.later == b""  # closed: the frames sent after the 502 went nowhere
    assert b"h2c" not in received[0].lower() and b"http2-settings" not in received[0].lower()
    assert received[1:] == []
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="502") == 1)
    assert p.metric("mtls_proxy_http_responses_total", code="101") == 0
    await wait_for(lambda: any(r.name == "proxy.access" for r in caplog.records))
    [line] = [r.fields for r in caplog.records if r.name == "proxy.access"]
    assert line["ended_by"] == "upgrade_refused", line


def websocket_echo(port: int, ctx: ssl.SSLContext, text: str) -> str:
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host="localhost", target="/ws",
                      extra_headers=[(name.encode(), value.encode()) for name, value in FORGED_HEADERS])
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(ws.send(request))
            while True:
                chunk = tls.recv(65536)
                assert chunk, "closed during the WebSocket exchange"
                ws.receive_data(chunk)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        tls.sendall(ws.send(Message(data=text)))
                    elif isinstance(event, TextMessage):
                        tls.sendall(ws.send(CloseConnection(code=1000)))
                        return event.data
                    elif isinstance(event, CloseConnection):
                        raise AssertionError(f"closed by the server: {event}")


async def test_websocket_upgrade_to_hypercorn_still_works_with_the_proxys_identity(nursery, test_pki):
    seen: list[Seen] = []
    p = await optional_mode_proxy(nursery, test_pki, await start_hypercorn(nursery, seen))
    ctx = client_context(test_pki, test_pki.alice)
    assert await trio.to_thread.run_sync(websocket_echo, p.port, ctx, "hello") == "echo: hello"
    [ws] = seen
    assert ws.kind == "websocket"
    assert ws.headers["x-client-verify"] == ["SUCCESS"] and ws.headers["x-forwarded-for"] == ["127.0.0.1"]
    [xfcc] = ws.headers["x-forwarded-client-cert"]
    assert "FORGED" not in xfcc and "CN=admin" not in xfcc and 'Subject="CN=alice' in xfcc
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="101") == 1)


def test_a_config_that_allows_h2c_is_refused_before_anything_starts(tmp_path, test_pki):
    listener = {
        "name": "api", "listen": "127.0.0.1:18443",
        "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
        "client_auth": {"mode": "optional", "trusted_ca": str(test_pki.client_ca)},
        "backend": {"address": "127.0.0.1:8080", "protocol": "http", "upgrades": ["websocket", "H2C"]},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"listeners": [listener]}))
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "backend.upgrades" in result.stderr and "h2c" in result.stderr, result.stderr
