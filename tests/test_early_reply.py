"""A backend that answers and closes while the client is still sending: the answer reaches the client whole.

A server that refuses an upload (too large, not allowed) often reads the start of it, writes its answer and closes.
Closing with the client's bytes unread makes its kernel reset the connection, so the proxy's next write toward the
backend fails (EPIPE, ECONNRESET) while the answer is already on its way back, or in the proxy's socket buffer. That
failure must not throw the answer away, and nor must the proxy's own close toward the client, which still has
upload bytes unread: closed with them, it would reset the connection too, and lose whatever of the answer the client
had not acknowledged yet.

Closing with the upload unread is a reset, and the proxy cannot know whether the backend meant to send more: the
client gets the answer and then the end of the connection without close_notify, which says "maybe cut short", where
close_notify would say "complete".

Through the real proxy in TCP mode on loopback, with the client (stdlib TLS over memory BIOs, tests/memclient.py)
in two ways: uploading in one task and reading in another, as a client that streams a body does; and writing all of
its upload before it reads anything, as many blocking HTTP clients do.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import ssl
import struct
import termios

import pytest
import trio

from tests.conftest import client_context, start_backend, start_proxy, wait_for
from tests.memclient import MemoryBIOClient

REPLY = bytes(range(256)) * 256  # 64 KiB
UPLOAD_CHUNK = b"u" * (64 * 1024)
UPLOAD_LIMIT = 64 * 1024 * 1024  # far more than any buffer on the way holds: still sending when the reply comes
RUNS = 20
# How the stdlib reports the end of a TLS connection without close_notify.
RAGGED_EOF = "SSLEOFError"


def answering_backend(linger_zero: bool):
    """Reads the start of the upload, answers REPLY, closes (with SO_LINGER 0: a reset at once)."""

    async def handle(stream: trio.SocketStream, backend) -> None:
        backend.received += await stream.receive_some(1024)
        await stream.send_all(REPLY)
        if linger_zero:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return handle


async def upload_and_read(port: int, ctx) -> tuple[bytes, str]:
    """Upload until the proxy ends the connection, reading meanwhile; what was read and how reading ended."""
    client = await MemoryBIOClient.connect(port, ctx)
    got = bytearray()
    ending = "?"

    async def upload() -> None:
        sent = 0
        try:
            while sent < UPLOAD_LIMIT:
                await client.send(UPLOAD_CHUNK)
                sent += len(UPLOAD_CHUNK)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass  # the proxy stopped taking the upload (or the reader saw the end); the reader carries on

    async def read() -> None:
        nonlocal ending
        try:
            while data := await client.receive():
                got.extend(data)
            ending = "close_notify"
        except Exception as exc:  # an SSL error or a reset: how the connection ended, for the message
            ending = f"{type(exc).__name__}: {exc}"
        nursery.cancel_scope.cancel()

    try:
        await client.handshake()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                await read()
    finally:
        await client.aclose()
    return bytes(got), ending


@pytest.mark.parametrize("linger_zero", [False, True], ids=["close", "reset"])
async def test_the_backend_reply_reaches_a_client_still_uploading(nursery, test_pki, caplog, linger_zero):
    caplog.set_level(logging.INFO, logger="proxy.access")
    backend = await start_backend(nursery, answering_backend(linger_zero))
    p = await start_proxy(nursery, test_pki, backend.address)
    ctx = client_context(test_pki, test_pki.alice, version="1.3")
    outcomes = [await upload_and_read(p.port, ctx) for _ in range(RUNS)]
    short = [(len(got), ending) for got, ending in outcomes if got != REPLY]
    assert not short, f"{len(short)} of {RUNS} runs lost part of the reply (bytes read, ending): {short}"
    assert all(ending.startswith(RAGGED_EOF) for _, ending in outcomes), outcomes
    await wait_for(lambda: len(access_lines(caplog)) == RUNS)
    ended_by = {line["ended_by"] for line in access_lines(caplog)}
    assert ended_by == {"backend_closed_early"}, ended_by
    assert all(line["bytes_down"] == len(REPLY) for line in access_lines(caplog))


def access_lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "proxy.access"]


# More than the client's receive buffer holds while it does not read (112 KiB measured), so the rest can reach the
# client only once its upload is done; less than the proxy's buffers take from the backend. Before the proxy dropped
# the upload it could no longer forward, the client waited in its write and the proxy in its write of the answer
# until the idle timeout; then the client had 112 KiB of it.
LARGE_REPLY = bytes(range(256)) * 1024  # 256 KiB
SEQUENTIAL_UPLOAD = 16 * 1024 * 1024
SEQUENTIAL_RUNS = 5


def unacknowledged(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


async def answer_then_close_when_acknowledged(stream: trio.SocketStream, backend) -> None:
    """Reads the start of the upload, answers LARGE_REPLY, closes once the proxy's kernel has all of it: the reset
    that closing with the upload unread sends loses none of the answer, so all of it must reach the client."""
    await stream.receive_some(1024)
    await stream.send_all(LARGE_REPLY)
    with trio.fail_after(5):
        while unacknowledged(stream.socket):
            await trio.sleep(0.001)


async def upload_then_read(port: int, ctx) -> tuple[int, str]:
    """Write the whole upload (or until the proxy ends the connection), then read; bytes read, and how it ended."""
    client = await MemoryBIOClient.connect(port, ctx)
    try:
        await client.handshake()
        sent = 0
        try:
            while sent < SEQUENTIAL_UPLOAD:
                await client.send(UPLOAD_CHUNK)
                sent += len(UPLOAD_CHUNK)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        got = bytearray()
        try:
            while data := await client.receive():
                got.extend(data)
            ending = "close_notify"
        except Exception as exc:
            ending = type(exc).__name__
        return len(got), ending if bytes(got) == LARGE_REPLY[: len(got)] else "wrong bytes"
    finally:
        await client.aclose()


async def test_a_client_that_uploads_everything_before_reading_gets_the_whole_early_reply(nursery, test_pki, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    backend = await start_backend(nursery, answer_then_close_when_acknowledged)
    p = await start_proxy(nursery, test_pki, backend.address, timeouts={"idle": 30})
    ctx = client_context(test_pki, test_pki.alice, version="1.3")
    with trio.fail_after(20):  # far less than the idle timeout
        outcomes = [await upload_then_read(p.port, ctx) for _ in range(SEQUENTIAL_RUNS)]
    assert outcomes == [(len(LARGE_REPLY), RAGGED_EOF)] * SEQUENTIAL_RUNS
    await wait_for(lambda: len(access_lines(caplog)) == SEQUENTIAL_RUNS)
    assert {line["ended_by"] for line in access_lines(caplog)} == {"backend_closed_early"}
