"""A trio stream over a pyOpenSSL ``Connection`` in memory-BIO mode.

Theory of operation
-------------------
Over memory BIOs (everything but a handshake on the socket, see the end), OpenSSL
never touches the socket. Ciphertext that arrives from the transport is
pushed into the Connection's incoming memory BIO (``bio_write``); ciphertext that
OpenSSL produces is pulled out of its outgoing BIO (``bio_read``) and sent by us.
Every public operation is therefore "call OpenSSL, then move bytes", which is
what ``_retry`` does. It is a port of trio's ``SSLStream._retry`` and keeps its
two rules, because a proxy's two pump tasks call ``send_all`` and
``receive_some`` on the same stream at the same time:

1. Never yield between calling OpenSSL and starting the I/O that the call asked
   for: interact with the Connection, then await exactly one thing, then loop.
2. Sending goes first and through a strict FIFO lock, so ciphertext reaches the
   wire in the order OpenSSL produced it; receiving goes through a second lock
   plus a counter, so two tasks never both block on the transport.

What this stream adds over trio's ``SSLStream`` (why the proxy drives its own:
docs/architecture.md, "TLS engine"; the numbers here were measured on this
stream):

- ``send_eof()``: a TLS half-close. It sends close_notify and keeps reading, so
  a client's end-of-request can be passed to the backend while the backend's
  answer still flows back.
- Record batching on receive: ``SSL_read`` returns at most one 16 KiB record;
  we keep decrypting records already in the BIO up to ``max_bytes``, which
  quarters the number of Python-level round trips for bulk data.
- ``send_all`` writes 256 KiB plaintext pieces and drains the outgoing BIO
  with one read of what is there: one transport write per piece. (Draining
  in several reads and joining them cost page faults and halved throughput.)
- Bulk data is copied as little as pyOpenSSL's cffi layer allows: records
  are decrypted into one buffer and copied out once, and ciphertext goes from
  the BIO to the socket without becoming ``bytes`` (``_openssl.ReadBuffer``,
  ``_openssl.drain``).
- The fatal alert OpenSSL writes whenever it fails the session, in the
  handshake (``unknown ca``, ``certificate required``) or after it (``bad record
  mac``, ``unexpected message``), reaches the peer: every OpenSSL error goes
  through ``_retry``, which sends the alert before raising (``_send_alert``). Then
  ``aclose()`` closes the way OpenSSL's s_server does, half-close first and the
  peer's last records read and dropped, so that the kernel does not answer them
  with a reset that could destroy the alert (``SocketStream.aclose_lingering``).
  The same lingering close protects the end of a reply when the peer was still
  sending.
- The first bytes the peer sent are kept, so that a failed handshake can be
  classified as ``not_tls`` (plain HTTP or junk on the TLS port).
- Bounded memory while idle. ``SSL_MODE_RELEASE_BUFFERS`` (the context sets
  it) frees OpenSSL's own record buffers between records, but a memory BIO's
  buffer never shrinks: a connection that moved a large body each way and
  went idle would keep about 570 KiB (measured in tests/test_stream.py). So
  the BIOs are swapped for empty ones after the handshake (about 5 KiB per
  connection), and after they held more than ``BIO_KEEP_LIMIT``, when a peer
  goes quiet: the client (our own read from a ``SocketStream`` transport would
  wait) or, through ``release_buffers()``, the backend (the pump's read would
  wait). Not while bytes keep coming: a fresh buffer is zeroed as it grows
  and cleansed when freed, and swapping after every 64 KiB cost 10% of bulk
  throughput.

After the handshake a TCP-mode session leaves this stream: ``hand_over()`` gives it to OpenSSL's socket BIO for
the data plane (proxy.tls.established, proxy.relay.dataplane), where it no longer pays for the memory BIOs.

With ``handshake_on_socket`` (the proxy's listeners), the handshake itself already runs there: OpenSSL reads and
writes the socket and the task only waits for it (``_handshake_on_socket``); the first bytes are peeked, and the
alert of a failure is OpenSSL's own write. ``hand_over()`` then leaves the session where it is, and anything else
gives it fresh memory BIOs first (``_leave_socket``), so everything above holds from there on.
"""

from __future__ import annotations

import contextlib
import enum
import operator
import os
import socket
from collections.abc import Callable

import trio
from cryptography import x509
from OpenSSL import SSL

from proxy.net.sockstream import SocketStream
from proxy.tls._openssl import (
    ReadBuffer,
    SocketSession,
    discard_incoming,
    drain,
    incoming_bytes,
    outgoing_bytes,
    peer_certificate_sha256,
    release_bio_buffers,
    session_reused,
    to_memory,
    to_socket,
)

# Plaintext is handed to SSL_write in pieces of this size, the pump's chunk.
# Each piece becomes sixteen full records, about 256.4 KiB of ciphertext,
# taken out with one read and sent with one write: against 64 KiB pieces,
# 10% less CPU per GB from backend to client.
SEND_PIECE_SIZE = 256 * 1024
# One transport read takes up to this much ciphertext (sixteen full records),
# decrypted by one receive_some when the caller asks for as much: 256 KiB
# instead of 64 KiB took a quarter less CPU per GB from client to backend.
# The incoming BIO grows to hold it while data flows and gives it back when
# the client goes quiet.
TRANSPORT_RECEIVE_SIZE = 256 * 1024
DEFAULT_RECEIVE_SIZE = 64 * 1024
# Memory BIOs that have held more than this are swapped for empty ones when
# a peer goes quiet. Small requests and responses stay under it and never pay
# for the swap.
BIO_KEEP_LIMIT = 16 * 1024
# How long a failed session may spend sending the alert that says why.
ALERT_FLUSH_TIMEOUT = 0.5
# The lingering close after an alert, or with the peer's data still unread: at
# most this long (the proxy's own close timeout may cut it shorter), and once
# all we sent is acknowledged, no more than this much read and dropped. 256 KiB
# is one of our transport reads: discarding it costs a small fraction of the
# handshake before it (tens of microseconds against about a millisecond), so a
# client that fails on purpose gains nothing, while a request of that size
# written before the client reads (a POST right after the handshake) is
# absorbed, and its writer gets to read the alert.
LINGER_TIMEOUT = 1.0
LINGER_MAX_BYTES = 256 * 1024
# How many leading bytes of the peer's first transmission are kept for
# failure classification (a TLS record header is 5 bytes).
FIRST_BYTES_KEPT = 8


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.HalfCloseableStream):
    """One TLS session over ``transport``, driven by ``connection``.

    ``connection`` must be a fresh ``SSL.Connection(context, None)`` with its
    accept or connect state already set. Call :meth:`do_handshake` before
    sending or receiving.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        connection: SSL.Connection,
        *,
        server_side: bool = True,
        delay_session_tickets: bool = True,
        handshake_on_socket: bool = False,
    ) -> None:
        self.transport_stream = transport
        self.connection = connection
        self.server_side = server_side
        # Over a SocketStream: let OpenSSL read and write the socket itself during the handshake (see
        # _handshake_on_socket). Until the session moves on, _on_socket says that it is still there.
        self.handshake_on_socket = handshake_on_socket
        self._on_socket = False
        self._handed_over = False
        # See _retry. Over a real socket there is a buffer and no deadlock, and
        # sending the tickets at once also acknowledges the client's last
        # handshake flight: a client that runs Nagle's algorithm would
        # otherwise hold its first request until the 40 ms delayed ACK.
        self.delay_session_tickets = delay_session_tickets
        self.first_bytes = b""
        self._state = _State.OK
        self._handshake_done = False
        self._sent_eof = False
        self._ciphertext_cut = False  # a transport write failed part-way: nothing more may follow it
        self._alert_sent = False
        self._close_notify_wanted = True
        self._delayed_outgoing = b""
        self._bio_peak = 0  # the most either memory BIO held since they were last swapped
        self._transport_eof = False
        self._send_lock = trio.StrictFIFOLock()
        self._recv_lock = trio.Lock()
        self._recv_count = 0
        self._send_busy = False
        self._recv_busy = False

    # ---- the core ---------------------------------------------------------

    def _drain_outgoing(self) -> bytes | memoryview:
        pending = outgoing_bytes(self.connection)
        if not pending:
            return b""
        if pending > self._bio_peak:
            self._bio_peak = pending
        return drain(self.connection, pending)  # all of it, in one call

    def _release_bio_buffers(self) -> None:
        # After the transport's EOF the incoming BIO carries the end of input
        # (bio_shutdown), which a fresh BIO would not.
        if not self._transport_eof and release_bio_buffers(self.connection):
            self._bio_peak = 0

    def release_buffers(self) -> None:
        """Give back the memory BIOs' buffers if they grew large and hold nothing now.

        For a moment when no data is expected soon; never needed for
        correctness. The pump calls it when the backend goes quiet.
        """
        if self._bio_peak > BIO_KEEP_LIMIT and not self._on_socket:
            self._release_bio_buffers()

    async def _retry(
        self, fn: Callable[..., object], *args: object, ignore_want_read: bool = False, is_handshake: bool = False
    ) -> None:
        """Call ``fn(*args)`` until it completes, moving ciphertext as it asks.

        This is the one tricky function in the module; see the module
        docstring for the two rules it keeps.
        """
        self._leave_socket()
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        while not finished:
            want_read = False
            try:
                fn(*args)
            except SSL.WantReadError:
                want_read = True
            except SSL.ZeroReturnError:
                if is_handshake:
                    # The peer closed (close_notify, or EOF, which the
                    # context's OP_IGNORE_UNEXPECTED_EOF reports the same way)
                    # before the handshake completed: that is a failure.
                    self._state = _State.BROKEN
                    await self._send_alert()
                    raise
                # close_notify received: a clean end of the peer's data
                # (the read that raised it reports no bytes).
                finished = True
            except SSL.Error:
                # A bad record, a failed verification, EOF without
                # close_notify (SysCallError)...: the session is broken for
                # good, and OpenSSL may have written the alert that says why.
                self._state = _State.BROKEN
                await self._send_alert()
                raise
            except BaseException:
                # An exception raised inside one of our callbacks, which
                # pyOpenSSL re-raises as itself: broken too.
                self._state = _State.BROKEN
                raise
            else:
                finished = True
            if ignore_want_read:
                want_read = False
                finished = True
            to_send = self._drain_outgoing()

            # TLS 1.3 servers emit their session tickets as the handshake
            # completes. The client may not read until it has written, so
            # over a transport without a buffer sending them now can
            # deadlock; like trio, hold them back and put them in front of
            # our first write (unless told they can go at once).
            if (
                is_handshake
                and self.delay_session_tickets
                and finished
                and to_send
                and self.connection.get_protocol_version_name() == "TLSv1.3"
                and self.server_side
            ):
                self._delayed_outgoing = bytes(to_send)
                to_send = b""

            if to_send:
                async with self._send_lock:  # strict FIFO: keeps wire order
                    yielded = True
                    try:
                        if self._delayed_outgoing:
                            to_send = self._delayed_outgoing + to_send
                            self._delayed_outgoing = b""
                        await self.transport_stream.send_all(to_send)
                    except BaseException:
                        # An unknown part of the data went out: the stream is doomed.
                        self._state = _State.BROKEN
                        self._ciphertext_cut = True
                        raise
            elif want_read:
                recv_count = self._recv_count
                async with self._recv_lock:
                    yielded = True
                    # Someone else may have read while we waited for the
                    # lock; if so, loop and look at what they brought.
                    if recv_count == self._recv_count:
                        await self._receive_from_transport()
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _receive_from_transport(self) -> None:
        transport = self.transport_stream
        data: bytes | bytearray
        try:
            if self._bio_peak > BIO_KEEP_LIMIT and isinstance(transport, SocketStream):
                data = await transport.receive_some(TRANSPORT_RECEIVE_SIZE, before_waiting=self.release_buffers)
            else:
                data = await transport.receive_some(TRANSPORT_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._state = _State.BROKEN
            raise
        # (A cancelled receive took nothing from the transport: the session
        # stays usable, and aclose() can still send close_notify.)
        if data:
            if len(self.first_bytes) < FIRST_BYTES_KEPT:
                self.first_bytes += bytes(data[: FIRST_BYTES_KEPT - len(self.first_bytes)])
            self.connection.bio_write(data)
            if len(data) > self._bio_peak:
                self._bio_peak = len(data)
        else:
            # Without this an empty BIO answers WantRead forever.
            self._transport_eof = True
            self.connection.bio_shutdown()
        self._recv_count += 1

    # ---- handshake --------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake to completion.

        On failure the exception from OpenSSL (or from the transport) is
        raised unchanged, after the alert that explains the failure has been
        given a short chance to reach the peer; callers classify it.
        """
        self._check_usable()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        transport = self.transport_stream
        try:
            if self.handshake_on_socket and isinstance(transport, SocketStream):
                await self._handshake_on_socket(transport)
            else:
                await self._retry(self.connection.do_handshake, is_handshake=True)
        except BaseException:
            self._state = _State.BROKEN
            raise
        self._handshake_done = True
        if self._on_socket:
            return  # nothing was buffered: hand_over() keeps the session where it is, anything else leaves it
        # The handshake's flights are in the BIOs' buffers now. If the client's
        # first data is already waiting, the next quiet moment frees them.
        self._bio_peak = BIO_KEEP_LIMIT + 1
        self._release_bio_buffers()

    async def _handshake_on_socket(self, transport: SocketStream) -> None:
        """The handshake with OpenSSL on the socket: no memory BIOs, no bytes moved by us.

        About a tenth of a resumed handshake's CPU went to moving its flights through the memory BIOs. Here the
        task only waits for the socket whenever OpenSSL wants to read or write it. What the memory BIOs gave for
        free is done otherwise: the first bytes are peeked before OpenSSL reads them (for ``not_tls``), and a
        fatal alert is written by OpenSSL itself as it fails, so a failure always counts as alerted (the close
        then lingers, as after our own alert). A connection reset reads as it does from the transport.
        """
        conn = self.connection
        self.first_bytes = await transport.peek(FIRST_BYTES_KEPT)
        if not to_socket(conn, transport.socket.fileno()):
            raise RuntimeError("a fresh TLS session held bytes already")
        self._on_socket = True
        while True:
            try:
                conn.do_handshake()
                return
            except SSL.WantReadError:
                await transport.wait_readable()
            except SSL.WantWriteError:
                await transport.wait_writable()
            except SSL.SysCallError as exc:
                code = exc.args[0] if exc.args else 0
                if isinstance(code, int) and code > 0:  # a reset: nothing can be said on that connection
                    reason = OSError(code, os.strerror(code))
                    raise trio.BrokenResourceError(f"socket error: {reason.strerror}") from reason
                raise  # the end of the connection
            except SSL.ZeroReturnError:
                raise  # the peer closed: nothing to say either
            except SSL.Error:
                self._alert_sent = True  # OpenSSL wrote it to the socket as it failed
                raise

    def _leave_socket(self) -> None:
        """Back to memory BIOs after a handshake on the socket: first thing in ``_retry``, which every operation on
        the session but ``hand_over()`` goes through."""
        if self._on_socket:
            if not to_memory(self.connection):
                raise MemoryError("OpenSSL could not allocate the session's memory BIOs")
            self._on_socket = False

    async def _send_alert(self) -> None:
        """Send what OpenSSL wrote as it failed the session: the fatal alert that tells the peer why.

        Through the send lock like any other ciphertext, behind what another
        task is sending (and behind session tickets held back: the peer
        counts records, and would fail to decrypt an alert that skipped
        some). Not after a write that was cut part-way: the alert would be
        read as the rest of that record.
        """
        alert = self._drain_outgoing()
        if not alert:
            return
        with trio.move_on_after(ALERT_FLUSH_TIMEOUT) as scope:
            scope.shield = True  # the caller's deadline may already be spent
            async with self._send_lock:
                if self._ciphertext_cut:
                    return
                alert, self._delayed_outgoing = self._delayed_outgoing + alert, b""
                try:
                    await self.transport_stream.send_all(alert)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._ciphertext_cut = True
                    return  # the peer is gone; nothing left to explain
                self._alert_sent = True
        if scope.cancelled_caught:
            self._ciphertext_cut = True  # out of time, perhaps in the middle of the alert

    # ---- data -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS session is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream was closed")

    def _check_handshaken(self) -> None:
        self._check_usable()
        if not self._handshake_done:
            raise RuntimeError("do_handshake() must complete before data flows")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)  # before OpenSSL sees it: a TypeError must not break the session
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        self._check_handshaken()
        if self._recv_busy:
            raise trio.BusyResourceError("another task is already receiving")
        self._recv_busy = True
        try:
            buffer = ReadBuffer(max_bytes)
            try:
                await self._retry(buffer.read_from, self.connection)
            except SSL.SysCallError as exc:
                # EOF without close_notify (or a stale errno in memory-BIO
                # mode): either way the transport is gone.
                raise trio.BrokenResourceError("the peer closed without close_notify") from exc
            except SSL.Error as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if buffer.filled and buffer.room:
                await self._batch_records(buffer)
            return buffer.take()
        finally:
            self._recv_busy = False

    async def _batch_records(self, buffer: ReadBuffer) -> None:
        """Add further records that are already in the incoming BIO to ``buffer``."""
        conn = self.connection
        # Only while there is something left to decrypt: a read that finds
        # nothing raises WantReadError, which costs more than asking first.
        while buffer.room and (incoming_bytes(conn) or conn.pending()):
            try:
                buffer.read_from(conn)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break  # nothing decryptable left now; EOF is reported next call
            except SSL.Error:
                # Deliver what we have; the next call raises. The alert
                # goes now, as from _retry.
                self._state = _State.BROKEN
                await self._send_alert()
                return
        if conn.want_write():
            # A post-handshake message (e.g. a TLS 1.3 KeyUpdate) asked for
            # an answer; let _retry send it in order with other writers.
            await self._retry(lambda: None)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_handshaken()
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof() was already called")
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending")
        self._send_busy = True
        try:
            view = memoryview(data)
            if not view:
                await self._retry(lambda: None)  # still a checkpoint, still flushes
                return
            for start in range(0, len(view), SEND_PIECE_SIZE):
                try:
                    await self._retry(self.connection.send, view[start : start + SEND_PIECE_SIZE])
                except SSL.Error as exc:
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending")
        self._send_busy = True
        try:
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving: the TLS half-close."""
        self._check_handshaken()
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending")
        if self._sent_eof:
            await trio.lowlevel.checkpoint()
            return
        self._sent_eof = True
        try:
            await self._retry(self.connection.shutdown, ignore_want_read=True)
        except SSL.Error as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def aclose(self) -> None:
        """Send close_notify if we can, then close the transport.

        Like trio, we do not wait for the peer's close_notify. But after a
        fatal alert, or with the peer's data still unread, the transport is
        closed lingering (see the module docstring). Cancelling this still
        closes the transport.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._state is _State.OK and self._handshake_done and not self._sent_eof and self._close_notify_wanted:
                self._sent_eof = True
                # If the peer is gone, closing is all that is left.
                with contextlib.suppress(SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._retry(self.connection.shutdown, ignore_want_read=True)
        finally:
            self._state = _State.CLOSED
            await self._close_transport()

    @property
    def handed_over(self) -> bool:
        """Whether ``hand_over()`` gave the session and its socket away (their new owner closes them)."""
        return self._handed_over

    async def hand_over(self) -> tuple[SocketSession, bytes, bool] | None:
        """Give the session to OpenSSL's socket BIO (see proxy.tls.established); None if that cannot be exact.

        Only an idle, handshaken session over a ``SocketStream`` moves. Held-back session tickets are sent first;
        records already in the incoming BIO are decrypted and handed back as plaintext (with whether close_notify
        came behind them), to be forwarded before anything else. From then on this stream is closed and its
        ``aclose()`` does nothing: the caller owns the socket.
        """
        transport = self.transport_stream
        if (
            not isinstance(transport, SocketStream)
            or self._state is not _State.OK
            or not self._handshake_done
            or self._sent_eof
            or self._send_busy
            or self._recv_busy
            or self._transport_eof
        ):
            return None
        if self._on_socket:  # the handshake ran there: nothing is buffered, and what came behind it is in the kernel
            self._state = _State.CLOSED
            self._handed_over = True
            return SocketSession.adopt(self.connection), b"", False
        pending = self._delayed_outgoing + bytes(self._drain_outgoing())
        self._delayed_outgoing = b""
        if pending:
            await transport.send_all(pending)
        early, eof = self._decrypt_waiting()
        if early is None:
            self._state = _State.BROKEN  # a bad record behind the Finished: reported by the next call, as ever
            await self._send_alert()
            return None
        session = SocketSession.attach(self.connection, transport.socket.fileno())
        if session is None:  # cannot happen once SSL_read wanted more: the incoming BIO is empty then
            raise RuntimeError("the TLS session could not be moved onto its socket")
        self._state = _State.CLOSED
        self._handed_over = True
        return session, early, eof

    def _decrypt_waiting(self) -> tuple[bytes | None, bool]:
        """Plaintext of the records in the incoming BIO, and whether close_notify followed; (None, _) if broken.

        The BIO holds at most one transport read of ciphertext (``TRANSPORT_RECEIVE_SIZE``), so this is bounded.
        """
        conn = self.connection
        pieces: list[bytes] = []
        while incoming_bytes(conn) or conn.pending():
            buffer = ReadBuffer(DEFAULT_RECEIVE_SIZE)
            try:
                while buffer.room:
                    buffer.read_from(conn)
            except SSL.WantReadError:
                pieces.append(buffer.take())
                break
            except SSL.ZeroReturnError:
                pieces.append(buffer.take())
                discard_incoming(conn)  # bytes after close_notify mean nothing
                return b"".join(pieces), True
            except SSL.Error:
                return None, False
            pieces.append(buffer.take())
        return b"".join(pieces), False

    def forgo_close_notify(self) -> None:
        """Make ``aclose()`` end the connection without close_notify.

        For when what we sent may be cut short (the backend reset in the
        middle of its answer): close_notify would tell the peer its data
        ended cleanly, a bare end of the connection says it may not have.
        """
        self._close_notify_wanted = False

    async def _close_transport(self) -> None:
        transport = self.transport_stream
        if isinstance(transport, SocketStream) and self._peer_may_be_sending(transport):
            await transport.aclose_lingering(seconds=LINGER_TIMEOUT, max_bytes=LINGER_MAX_BYTES)
        else:
            await transport.aclose()

    def _peer_may_be_sending(self, transport: SocketStream) -> bool:
        # After an alert, the peer's next records may be on their way,
        # whatever it has sent so far: a TLS 1.3 client sends its request
        # right behind its Finished, before it can know its certificate was
        # refused.
        return not self._transport_eof and (self._alert_sent or transport.unread_bytes() > 0)

    # ---- what was negotiated, and with whom --------------------------------
    #
    # Valid once do_handshake() has completed. Everything a caller needs to know
    # about the session is read here, so that nothing outside proxy.tls touches
    # the pyOpenSSL Connection.

    @property
    def version(self) -> str:
        return self.connection.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        return self.connection.get_cipher_name()

    @property
    def resumed(self) -> bool:
        return session_reused(self.connection)

    @property
    def alpn_protocol(self) -> str | None:
        proto = self.connection.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None

    @property
    def server_name(self) -> str | None:
        """The host name the client asked for (SNI), or None if it sent none."""
        name = self.connection.get_servername()
        return name.decode("idna") if name else None

    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's certificate, or None if it presented none.

        Also after a resumption, which carries the certificate over from the
        session it resumes (though not the chain: see peer_certificate_chain).
        """
        return self.connection.get_peer_certificate(as_cryptography=True)

    def peer_certificate_sha256(self) -> str | None:
        """The SHA-256 fingerprint (lower-case hex) of the peer's certificate, or None if it presented none.

        OpenSSL hashes the DER it holds (``X509_digest``), with no certificate object made: a ``cryptography``
        certificate, 9 µs, is needed only when a resumed client's identity has left the Context's cache.
        """
        sha256 = peer_certificate_sha256(self.connection)
        return None if sha256 is None else sha256.hex()

    def peer_certificate_chain(self) -> list[x509.Certificate]:
        """The chain OpenSSL verified, leaf first and ending at the trusted CA.

        Empty when the peer presented no certificate, when it was not verified
        (client_auth: none), and after a resumption, which verifies nothing.
        """
        return self.connection.get_verified_chain(as_cryptography=True) or []

    def peer_address(self) -> tuple[str, int] | str | None:
        """The peer's address: (host, port) over TCP, the path over a Unix socket.

        None over a transport that is not a socket (a memory stream). Raises
        OSError once the socket is no longer connected.
        """
        sock = self._socket()
        return None if sock is None else _address(sock.getpeername())

    def local_address(self) -> tuple[str, int] | str | None:
        """Our own end's address, in the form of :meth:`peer_address`."""
        sock = self._socket()
        return None if sock is None else _address(sock.getsockname())

    def _socket(self) -> socket.socket | None:
        transport = self.transport_stream
        return transport.socket if isinstance(transport, SocketStream) else None


def _address(addr: object) -> tuple[str, int] | str:
    """(host, port) of an IPv4 or IPv6 address (without IPv6's flow info and scope); a Unix socket's path."""
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    return addr.decode("utf-8", "replace") if isinstance(addr, bytes) else str(addr)
