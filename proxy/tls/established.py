"""A TLS session after its handshake, with OpenSSL reading and writing the client's socket itself.

The handshake runs in ``TLSStream`` over memory BIOs, where every failure is classified, its alert sent and the
close lingered (see that module). Once it has succeeded, moving ciphertext through the memory BIOs costs a copy and
several Python calls per record in each direction; for the data plane (``proxy.relay.dataplane``) the session is
handed to OpenSSL's socket BIO instead: ``SSL_read`` and ``SSL_write`` then do the socket I/O in C
(docs/architecture.md, "Data plane").

The hand-over is exact, so no byte is lost or reordered:

- what OpenSSL wrote and we have not sent yet (the TLS 1.3 session tickets the stream holds back) is sent first,
  before the socket is OpenSSL's;
- records the client already sent behind its Finished may wait in the incoming memory BIO. They are decrypted first
  (``SSL_read`` until it wants more) and their plaintext handed over with the session, to be forwarded first; what
  remains is at most the start of one record, which ``SSL_read`` has by then taken into OpenSSL's own record buffer,
  where it stays across the change of BIO.

Only a session whose transport is a ``SocketStream`` and that is idle (no task reading or writing, no half-close
yet) is handed over; otherwise ``take_over`` returns None and the stream goes on as it was.
"""

from __future__ import annotations

import contextlib

from proxy.net.sockstream import SocketStream
from proxy.tls._openssl import SharedBuffer, SocketSession, TLSBroken
from proxy.tls.stream import LINGER_MAX_BYTES, LINGER_TIMEOUT, TLSStream


class EstablishedTLS:
    """One client's TLS session on its socket, non-blocking, for the data plane."""

    __slots__ = ("close_notify_sent", "early_eof", "early_plaintext", "session", "transport")

    def __init__(self, session: SocketSession, transport: SocketStream, early_plaintext: bytes, early_eof: bool):
        self.session = session
        self.transport = transport
        self.early_plaintext = early_plaintext  # decrypted during the hand-over: forwarded before anything else
        self.early_eof = early_eof  # the client's close_notify came with it
        self.close_notify_sent = False

    @property
    def fileno(self) -> int:
        return self.transport.socket.fileno()

    @classmethod
    async def take_over(cls, stream: TLSStream) -> EstablishedTLS | None:
        """The session of ``stream``, now driven on its socket; None (``stream`` unchanged) if that cannot be exact."""
        transport = stream.transport_stream
        if not isinstance(transport, SocketStream):
            return None
        handed = await stream.hand_over()
        if handed is None:
            return None
        session, early, early_eof = handed
        return cls(session, transport, early, early_eof)

    def read_into(self, buffer: SharedBuffer, offset: int) -> int:
        """Decrypt into ``buffer`` at ``offset``: the byte count, ``EOF`` (close_notify or FIN), ``WANT_READ`` or
        ``WANT_WRITE``. Raises ``TLSBroken``."""
        return self.session.read_into(buffer, offset)

    async def aclose(self, *, close_notify: bool) -> None:
        """Send close_notify if wanted and the socket takes it now, then close, lingering if the client still sends.

        Only the lingering waits (and so checkpoints): the connection's task is ending, with no need to yield.
        """
        if close_notify and not self.close_notify_sent:
            with contextlib.suppress(TLSBroken):
                self.session.shutdown()
            self.close_notify_sent = True
        transport = self.transport
        if transport.unread_bytes() > 0:
            await transport.aclose_lingering(seconds=LINGER_TIMEOUT, max_bytes=LINGER_MAX_BYTES)
        else:
            transport.close()
