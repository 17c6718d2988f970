"""HTTP mode through the real proxy: identity headers in, forged ones out, errors as an HTTP proxy gives them."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import subprocess

import h11
import pytest
import trio

from proxy.dev.demo_backend import demo_handler
from proxy.ops.admin_http import serve_http
from tests.conftest import client_context, start_backend, start_proxy, wait_for

FORGED = [
    ("X-Forwarded-Client-Cert", "Hash=forged;Subject=\"CN=admin\""),
    ("x-forwarded-client-cert", "By=forged"),
    ("X_Forwarded_Client_Cert", "forged-underscore"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("x-forwarded-proto", "http"),
    ("X-Client-Subject", "CN=admin"),
    ("x-client-verify", "SUCCESS"),
]


async def http_proxy(nursery, test_pki, **backend_overrides):
    _host, port = await nursery.start(serve_http, demo_handler(), "127.0.0.1", 0)
    backend = {"address": f"127.0.0.1:{port}", "protocol": "http",
               "identity_headers": {"X-Client-Subject": "subject", "X-Client-Verify": "verify"}}
    backend.update(backend_overrides)
    return await start_proxy(nursery, test_pki, "unused:1", backend=backend)


def get_many(port: int, ctx: ssl.SSLContext, count: int, headers: list[tuple[str, str]]) -> list[tuple[int, str]]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
    out = []
    try:
        for i in range(count):
            conn.putrequest("GET", f"/r{i}", skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            out.append((response.status, response.read().decode()))
    finally:
        conn.close()
    return out


def header_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if ": " in line]


async def test_identity_headers_reach_the_backend_and_forged_ones_never_do(nursery, test_pki):
    p = await http_proxy(nursery, test_pki)
    ctx = client_context(test_pki, test_pki.alice)
    results = await trio.to_thread.run_sync(get_many, p.port, ctx, 3, FORGED)
    alice = test_pki.alice.issued
    expected_xfcc = (
        f'x-forwarded-client-cert: Hash={alice.sha256};Subject="CN=alice,OU=payments,O=Acme";'
        "URI=spiffe://acme/ns/prod/alice;DNS=alice.prod.svc"
    )
    for status, body in results:  # every request of the keep-alive connection
        assert status == 200
        lines = header_lines(body)
        assert expected_xfcc in lines
        assert "x-forwarded-for: 127.0.0.1" in lines
        assert "x-forwarded-proto: https" in lines
        assert "x-client-subject: CN=alice,OU=payments,O=Acme" in lines
        assert "x-client-verify: SUCCESS" in lines
        assert "forged" not in body and "6.6.6.6" not in body and "CN=admin" not in body
        assert sum(line.startswith("x-forwarded-client-cert:") for line in lines) == 1
    await wait_for(lambda: p.metric("mtls_proxy_http_requests_total", protocol="http/1.1") == 3)
    assert p.metric("mtls_proxy_http_responses_total", code="200") == 3


async def test_anonymous_client_gets_no_certificate_headers(nursery, test_pki):
    _host, port = await nursery.start(serve_http, demo_handler(), "127.0.0.1", 0)
    p = await start_proxy(
        nursery, test_pki, "unused:1",
        client_auth={"mode": "optional", "trusted_ca": str(test_pki.client_ca)},
        backend={"address": f"127.0.0.1:{port}", "protocol": "http",
                 "identity_headers": {"X-Client-Verify": "verify", "X-Client-Subject": "subject"}},
    )
    [(status, body)] = await trio.to_thread.run_sync(get_many, p.port, client_context(test_pki, None), 1, FORGED)
    assert status == 200
    lines = header_lines(body)
    assert "x-client-verify: NONE" in lines
    assert not any(line.startswith(("x-forwarded-client-cert", "x-client-subject")) for line in lines)
    assert "forged" not in body


async def test_curl_through_http_mode(nursery, test_pki):
    p = await http_proxy(nursery, test_pki)
    cmd = ["curl", "-sS", "--cacert", str(test_pki.server_ca), "--cert", str(test_pki.alice.cert),
           "--key", str(test_pki.alice.key), "-H", "X-Forwarded-Client-Cert: forged",
           f"https://localhost:{p.port}/via-curl"]
    done = await trio.to_thread.run_sync(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=10))
    assert done.returncode == 0, done.stderr
    assert "GET /via-curl" in done.stdout
    assert f"x-forwarded-client-cert: Hash={test_pki.alice.issued.sha256}" in done.stdout
    assert "forged" not in done.stdout


# ---- errors ----------------------------------------------------------------------------------


def raw_exchange(port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            got = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                got += chunk
            return got


async def test_backend_down_is_502(nursery, test_pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p = await start_proxy(nursery, test_pki, f"127.0.0.1:{dead}", backend={"protocol": "http"})
    got = await trio.to_thread.run_sync(raw_exchange, p.port, client_context(test_pki, test_pki.alice),
                                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 502 ")
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="502") == 1)
    assert p.metric("mtls_proxy_backend_connect_failures_total") == 1


async def test_backend_connect_timeout_is_504(nursery, test_pki):
    # A listener whose accept queue is full drops further SYNs: connect hangs.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(blocker.getsockname())
            fillers.append(f)
        p = await start_proxy(nursery, test_pki, f"127.0.0.1:{blocker.getsockname()[1]}",
                              backend={"protocol": "http", "connect_timeout": 0.3})
        got = await trio.to_thread.run_sync(raw_exchange, p.port, client_context(test_pki, test_pki.alice),
                                            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 504 ")
    finally:
        for f in fillers:
            f.close()
        blocker.close()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    ],
    ids=["malformed", "oversized-headers", "smuggling"],
)
async def test_bad_requests_get_an_http_error_and_never_reach_the_backend(nursery, test_pki, request_bytes, status):
    seen = []

    async def backend_handler(stream, backend):
        seen.append(await stream.receive_some(65536))

    backend = await start_backend(nursery, backend_handler)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http"})
    got = await trio.to_thread.run_sync(raw_exchange, p.port, client_context(test_pki, test_pki.alice), request_bytes)
    assert got.startswith(b"HTTP/1.1 " + status)
    assert seen == [b""] or seen == []  # the backend got a connection at most, never a byte


# ---- bodies and upgrades ------------------------------------------------------------------------


async def h11_backend(stream, backend):
    """Answers each request with the SHA-256 of its body; after an Upgrade, echoes raw bytes."""
    conn = h11.Connection(h11.SERVER)
    while True:
        digest = hashlib.sha256()
        upgrade = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                upgrade = any(name == b"upgrade" for name, _ in event.headers)
            elif isinstance(event, h11.Data):
                digest.update(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if upgrade:
            await stream.send_all(conn.send(h11.InformationalResponse(
                status_code=101, headers=[("Upgrade", "echo"), ("Connection", "Upgrade")])))
            leftover, _ = conn.trailing_data
            if leftover:
                await stream.send_all(leftover)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            return
        body = digest.hexdigest().encode()
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))])))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        conn.start_next_cycle()


def upload(port: int, ctx: ssl.SSLContext, body: bytes, chunked: bool) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        if chunked:
            pieces = (body[i:i + 100_000] for i in range(0, len(body), 100_000))
            conn.request("POST", "/upload", body=pieces, encode_chunked=True)
        else:
            conn.request("POST", "/upload", body=body)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_request_bodies_stream_through_intact(nursery, test_pki, chunked):
    backend = await start_backend(nursery, h11_backend)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http"})
    body = bytes(range(256)) * 20_000  # 5 MB
    status, answer = await trio.to_thread.run_sync(upload, p.port, client_context(test_pki, test_pki.alice), body,
                                                   chunked)
    assert status == 200
    assert answer == hashlib.sha256(body).hexdigest()


def upgrade_then_echo(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got:
                got += tls.recv(65536)
            head, rest = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101 ")
            tls.sendall(b"raw bytes after the upgrade")
            while len(rest) < len(b"raw bytes after the upgrade"):
                rest += tls.recv(65536)
            return rest


async def test_upgrade_switches_to_a_raw_pump(nursery, test_pki):
    backend = await start_backend(nursery, h11_backend)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http", "upgrades": ["echo"]})
    echoed = await trio.to_thread.run_sync(upgrade_then_echo, p.port, client_context(test_pki, test_pki.alice))
    assert echoed == b"raw bytes after the upgrade"
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="101") == 1)


def stream_upload(port: int, ctx: ssl.SSLContext, total: int) -> tuple[int, str]:
    """POST ``total`` bytes with chunked encoding from one reused buffer (the client itself allocates nothing)."""
    block = bytes(range(256)) * 256  # 64 KiB
    def pieces():
        for _ in range(total // len(block)):
            yield block
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
    try:
        conn.request("POST", "/big", body=pieces(), encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


async def test_a_large_upload_streams_in_bounded_memory(nursery, test_pki):
    import tracemalloc

    backend = await start_backend(nursery, h11_backend)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http"})
    total = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        status, answer = await trio.to_thread.run_sync(stream_upload, p.port,
                                                        client_context(test_pki, test_pki.alice), total)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200
    block = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for _ in range(total // len(block)):
        expected.update(block)
    assert answer == expected.hexdigest()
    # 64 MiB went through; what the process held at any moment stayed a few chunks.
    assert peak < 8 * 1024 * 1024, peak


# ---- HTTP/1 framing a backend could read differently ---------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nGET /smuggled HTTP/1.1",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551621\r\n\r\nabcde",
    ],
    ids=["chunked-http10", "http10-without-host", "chunk-size-over-64-bits", "content-length-over-64-bits"],
)
async def test_ambiguous_http1_framing_is_400_and_closed(nursery, test_pki, request_bytes):
    seen = []

    async def backend_handler(stream, backend):
        seen.append(await stream.receive_some(65536))

    backend = await start_backend(nursery, backend_handler)
    p = await start_proxy(nursery, test_pki, backend.address, backend={"protocol": "http"})
    # raw_exchange reads until the proxy closes: a 400 that left the connection open would hang it (and fail).
    got = await trio.to_thread.run_sync(raw_exchange, p.port, client_context(test_pki, test_pki.alice), request_bytes)
    assert got.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close\r\n" in got
    assert seen == [b""] or seen == []  # the backend got a connection at most, never a byte
    await wait_for(lambda: p.metric("mtls_proxy_http_responses_total", code="400") == 1)
    assert p.metric("mtls_proxy_http_requests_total", protocol="http/1.1") == 0
