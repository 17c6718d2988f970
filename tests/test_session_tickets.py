"""TLS 1.3 session tickets leave the proxy as soon as the handshake completes.

Holding them back until the first write (what trio's SSLStream does, for
transports without a buffer) leaves the client's last handshake flight
unacknowledged: a client with Nagle's algorithm on then holds its first
request until the 40 ms delayed ACK. Sending them at once, as nginx does,
avoids that. The test checks the behaviour, not a time: bytes are waiting on
the client's socket right after the handshake, before anyone wrote."""

from __future__ import annotations

import select
import socket

import trio

from tests.conftest import client_context, start_proxy


def bytes_waiting_after_handshake(port: int, ctx) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            readable, _, _ = select.select([tls.fileno()], [], [], 2.0)
            return bool(readable)


async def test_tickets_are_sent_right_after_the_handshake(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    ctx = client_context(test_pki, test_pki.alice, version="1.3")
    assert await trio.to_thread.run_sync(bytes_waiting_after_handshake, p.port, ctx)
