"""A client that ends with a TCP FIN and no close_notify still gets its reply.

Many clients do this. The proxy must read it as the end of the client's data,
half-close the backend, and keep relaying the backend's answer.
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio

from tests.conftest import client_context, start_proxy, wait_for


def send_then_fin(port: int, ctx: ssl.SSLContext, payload: bytes) -> tuple[bytes, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(payload)
            # SSLSocket.shutdown() would drop the TLS layer; shut down TCP on a
            # duplicate of the descriptor instead, so no close_notify is sent.
            with socket.socket(fileno=os.dup(tls.fileno())) as dup:
                dup.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLError as exc:
                    return bytes(got), f"error: {exc}"
                if not chunk:
                    return bytes(got), "eof"
                got += chunk


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_tcp_fin_without_close_notify_half_closes_the_backend(nursery, test_pki, echo_backend, version):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    payload = os.urandom(200_000)
    ctx = client_context(test_pki, test_pki.alice, version=version)
    got, ending = await trio.to_thread.run_sync(send_then_fin, p.port, ctx, payload)
    # The echo backend answers everything and half-closes only after it saw
    # our EOF: getting the full echo and then a clean EOF proves both hops.
    assert got == payload
    assert ending == "eof"
    await wait_for(lambda: p.metric("mtls_proxy_active_connections") == 0)
    assert p.metric("mtls_proxy_bytes_total", direction="backend_to_client") == len(payload)
