"""HTTP/2 and gRPC through the real proxy: mTLS with ALPN h2, the identity on every stream.

Real peers on loopback: grpcio's client with the client certificate and grpcio's server as an h2c backend
(``backend.http_version: "2"``); ``curl --http2`` and httpx's HTTP/2 client against an HTTP/1.1 backend (Hypercorn,
``backend.http_version: "1.1"``), which the proxy speaks each stream to in HTTP/1.1; and an HTTP/1.1 client on a
listener whose backend speaks only HTTP/2.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio

from tests.conftest import AccessLog, client_context, start_proxy

H2 = {"tls": {"alpn": ["h2", "http/1.1"]}}


def _metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
    return json.dumps([[key, value] for key, value in context.invocation_metadata()]).encode()


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i


def _shout(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")


@pytest.fixture
def grpc_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Metadata": grpc.unary_unary_rpc_method_handler(_metadata),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Shout": grpc.stream_stream_rpc_method_handler(_shout),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def grpc_channel(test_pki: Any, port: int) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=test_pki.server_ca.read_bytes(),
        private_key=test_pki.alice.key.read_bytes(),
        certificate_chain=test_pki.alice.cert.read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


async def in_thread(fn: Any) -> Any:
    return await trio.to_thread.run_sync(fn)


async def test_grpc_through_mtls_carries_the_proxys_identity_on_every_call(nursery, test_pki, grpc_port,
                                                                           access_log: AccessLog):
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{grpc_port}", **H2,
                          backend={"protocol": "http", "http_version": "2"})
    forged = (("x-forwarded-client-cert", "Hash=forged;Subject=\"CN=admin\""), ("x-app", "kept"))

    def calls() -> tuple[dict[str, str], list[bytes], list[bytes], grpc.StatusCode]:
        with grpc_channel(test_pki, p.port) as channel:
            seen = dict(map(tuple, json.loads(channel.unary_unary("/test.Svc/Metadata")(b"", metadata=forged,
                                                                                       timeout=10))))
            counted = list(channel.unary_stream("/test.Svc/Count")(b"3", timeout=10))
            shouted = list(channel.stream_stream("/test.Svc/Shout")(iter([b"a", b"b"]), timeout=10))
            try:
                channel.unary_unary("/test.Svc/Fail")(b"", timeout=10)
            except grpc.RpcError as exc:
                code = exc.code()
            return seen, counted, shouted, code

    seen, counted, shouted, code = await in_thread(calls)
    xfcc = seen["x-forwarded-client-cert"]
    assert xfcc.startswith("Hash=") and 'Subject="CN=alice' in xfcc
    assert "forged" not in seen["x-forwarded-client-cert"]
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-app"] == "kept"
    assert counted == [b"0", b"1", b"2"]
    assert shouted == [b"A", b"B"]
    assert code is grpc.StatusCode.PERMISSION_DENIED  # the backend's status and trailers arrive
    (fields,) = await access_log.wait(1)
    assert fields["alpn"] == "h2" and fields["streams"] == 4 and fields["outcome"] == "ok", fields
    assert p.metric("mtls_proxy_http_requests_total", protocol="h2") == 4
    assert p.metric("mtls_proxy_http2_active_streams") == 0


async def test_grpc_to_a_backend_that_is_down_gets_unavailable_and_the_connection_lives_on(nursery, test_pki):
    p = await start_proxy(nursery, test_pki, "127.0.0.1:1", **H2, backend={"protocol": "http", "http_version": "2"})

    def calls() -> list[grpc.StatusCode]:
        codes = []
        with grpc_channel(test_pki, p.port) as channel:
            for _ in range(2):
                try:
                    channel.unary_unary("/test.Svc/Metadata")(b"", timeout=10)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        return codes

    assert await in_thread(calls) == [grpc.StatusCode.UNAVAILABLE] * 2
    assert p.metric("mtls_proxy_backend_connect_failures_total") >= 1


# ---- HTTP/2 clients, HTTP/1.1 backend ----------------------------------------------------------------------------


async def echo_headers_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers with the request's headers and HTTP version, as JSON."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})  # lifespan.startup / lifespan.shutdown
            if message["type"] == "lifespan.shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    answer = json.dumps({"http_version": scope["http_version"], "headers": headers, "body": body.decode()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def http11_backend(nursery) -> AsyncIterator[int]:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(hypercorn.trio.serve, echo_headers_app, config)
    yield int(binds[0].rsplit(":", 1)[1])


async def test_curl_http2_reaches_an_http11_backend_with_the_identity(nursery, test_pki, http11_backend):
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{http11_backend}", **H2, backend={"protocol": "http"})

    def curl() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--http2", "--cacert", str(test_pki.server_ca), "--cert", str(test_pki.alice.cert),
             "--key", str(test_pki.alice.key), "-H", "X-Forwarded-Client-Cert: forged", "-w", "\n%{http_version}",
             "-d", "hello", f"https://localhost:{p.port}/x"],
            capture_output=True, text=True, timeout=20)

    out = await in_thread(curl)
    assert out.returncode == 0, out.stderr
    body, version = out.stdout.rsplit("\n", 1)
    assert version == "2"  # curl spoke HTTP/2 to the proxy
    seen = json.loads(body)
    assert seen["http_version"] == "1.1"  # and the proxy HTTP/1.1 to the backend
    assert seen["body"] == "hello"
    assert 'Subject="CN=alice' in seen["headers"]["x-forwarded-client-cert"]
    assert "forged" not in seen["headers"]["x-forwarded-client-cert"]


async def test_httpx_http2_streams_side_by_side(nursery, test_pki, http11_backend, access_log: AccessLog):
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{http11_backend}", **H2, backend={"protocol": "http"})
    ctx = client_context(test_pki, test_pki.alice)

    async def fetch_all() -> list[tuple[str, int, dict[str, Any]]]:
        async with httpx.AsyncClient(http2=True, verify=ctx) as client:
            results: list[tuple[str, int, dict[str, Any]]] = []

            async def one(i: int) -> None:
                r = await client.get(f"https://localhost:{p.port}/{i}")
                results.append((r.http_version, r.status_code, r.json()))

            async with trio.open_nursery() as n:
                for i in range(5):
                    n.start_soon(one, i)
            return results

    results = await fetch_all()
    assert [(v, s) for v, s, _ in results] == [("HTTP/2", 200)] * 5
    assert all("CN=alice" in body["headers"]["x-forwarded-client-cert"] for _, _, body in results)
    (fields,) = await access_log.wait(1)
    assert fields["alpn"] == "h2" and fields["streams"] == 5, fields


async def test_an_http11_client_on_an_h2_only_backend_listener_is_told_so(nursery, test_pki, grpc_port):
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{grpc_port}", **H2,
                          backend={"protocol": "http", "http_version": "2"})

    def http11() -> bytes:
        import socket

        ctx: ssl.SSLContext = client_context(test_pki, test_pki.alice)
        ctx.set_alpn_protocols(["http/1.1"])
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                got = b""
                while chunk := tls.recv(65536):
                    got += chunk
                return got

    answer = await in_thread(http11)
    assert answer.startswith(b"HTTP/1.1 505 "), answer


async def test_drain_sends_goaway_to_an_http2_client_and_the_connection_ends_drained(nursery, test_pki,
                                                                                    http11_backend,
                                                                                    access_log: AccessLog):
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{http11_backend}", **H2, backend={"protocol": "http"},
                          top={"drain_timeout": 10})
    async with httpx.AsyncClient(http2=True, verify=client_context(test_pki, test_pki.alice)) as client:
        first = await client.get(f"https://localhost:{p.port}/before")
        assert (first.http_version, first.status_code) == ("HTTP/2", 200)
        p.proxy.stop()  # as SIGTERM does
        (fields,) = await access_log.wait(1)  # the idle HTTP/2 connection is told GOAWAY and closed at once
    assert fields["ended_by"] == "drained" and fields["streams"] == 1, fields


async def test_a_rapid_reset_attack_is_contained_counted_and_others_are_still_served(nursery, test_pki,
                                                                                   http11_backend):
    import socket

    import h2.config
    import h2.connection
    import h2.events

    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{http11_backend}", **H2, backend={"protocol": "http"})

    def attack() -> bool:
        """Open streams and reset each at once (CVE-2023-44487); True once the proxy answers with GOAWAY."""
        ctx = client_context(test_pki, test_pki.alice)
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "localhost")]
                for _ in range(1000):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, headers)
                    conn.reset_stream(stream_id)
                tls.sendall(conn.data_to_send())
                while data := tls.recv(65536):
                    if any(isinstance(e, h2.events.ConnectionTerminated) for e in conn.receive_data(data)):
                        return True
                return False

    assert await in_thread(attack)
    assert p.metric("mtls_proxy_http2_contained_total", attack="rapid_reset") == 1
    async with httpx.AsyncClient(http2=True, verify=client_context(test_pki, test_pki.alice)) as client:
        r = await client.get(f"https://localhost:{p.port}/after")
    assert (r.http_version, r.status_code) == ("HTTP/2", 200)
