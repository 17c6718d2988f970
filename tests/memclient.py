"""A stdlib TLS client over memory BIOs (``ssl.SSLObject``) on a real trio TCP socket.

The client is an independent TLS stack (the stdlib's OpenSSL, not the proxy's
pyOpenSSL), and because it never touches the socket itself a test sees every
record it produces and can alter one before it goes out: flip a byte of the
ciphertext, change a record header. It can also write and read from two trio
tasks at once, which a blocking ``ssl.SSLSocket`` cannot do safely.
"""

from __future__ import annotations

import ssl

import trio

READ_SIZE = 64 * 1024


class MemoryBIOClient:
    def __init__(self, sock: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.raw_received = 0  # ciphertext bytes the proxy sent us

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> MemoryBIOClient:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        return cls(sock, ctx)

    async def flush(self) -> None:
        """Send what the TLS object has written."""
        data = self.outgoing.read()
        if data:
            await self.sock.send_all(data)

    async def fill(self) -> bool:
        """Move one socket read into the TLS object; False at the socket's EOF."""
        data = await self.sock.receive_some(READ_SIZE)
        if not data:
            self.incoming.write_eof()
            return False
        self.raw_received += len(data)
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        """The client's side of the handshake. With TLS 1.3 it ends before the
        server has read the client's certificate and Finished."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self.fill()
        await self.flush()

    def seal(self, plaintext: bytes) -> bytes:
        """The records that carry ``plaintext``, not sent: the test decides what goes out."""
        self.tls.write(plaintext)
        return self.outgoing.read()

    async def send(self, plaintext: bytes) -> None:
        await self.sock.send_all(self.seal(plaintext))

    async def receive(self) -> bytes:
        """Some plaintext; b"" after close_notify. An alert from the proxy raises ``ssl.SSLError`` naming it."""
        while True:
            try:
                return self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                await self.fill()
            except ssl.SSLZeroReturnError:
                return b""

    async def aclose(self) -> None:
        await self.sock.aclose()
