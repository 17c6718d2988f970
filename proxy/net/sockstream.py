"""A lean trio stream over a connected socket: the transport under every client and backend connection.

trio's ``SocketStream`` passes each send and receive through several layers: a conflict detector, an
error-translating context manager, memoryview handling, and the trio socket's ``_nonblocking_helper`` with a
context manager of its own. That is about 4 µs of Python per call; measured with a 100-byte send and receive on a
socketpair, 22-24 µs against 14 µs done directly. A kept-alive request makes four such calls on the proxy's core
(two reads, two writes), and a handshake a few more.

This class does the same I/O on the stdlib socket and waits with trio's ``wait_readable``/``wait_writable``,
keeping trio's rules for a stream:

- every call is a checkpoint: it raises ``Cancelled`` if cancelled, and yields to the scheduler at least once;
- a socket error is ``BrokenResourceError`` (the error is its ``__cause__``), use after ``aclose()`` is
  ``ClosedResourceError``, and a second task sending or receiving at the same time is ``BusyResourceError``;
- ``aclose()`` wakes a task blocked on the socket (``notify_closing``) before the descriptor is closed.

Client connections come from ``SocketListener.accept()``, which accepts on the stdlib listening socket directly
and sets the options trio's ``SocketStream`` would (``TCP_NODELAY``, ``TCP_NOTSENT_LOWAT``); trio's accept path
builds a trio socket and a ``trio.SocketStream`` per connection only for them to be taken over. Backend
connections from ``open_tcp_stream`` are taken over with the public ``detach()``.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable

import trio

DEFAULT_RECEIVE_SIZE = 64 * 1024
# What trio's SocketStream sets: small writes leave at once, and the kernel
# holds at most 16 KiB not yet sent, so backpressure reaches the sender early.
NOTSENT_LOWAT = 16 * 1024


def detach(trio_socket: trio.socket.SocketType) -> socket.socket:
    """A stdlib socket for ``trio_socket``'s descriptor; ``trio_socket`` is left detached (closing it does nothing)."""
    return socket.socket(trio_socket.family, trio_socket.type, trio_socket.proto, fileno=trio_socket.detach())


def tune_tcp(sock: socket.socket) -> None:
    """Set the options trio's SocketStream sets on a TCP socket (a Unix socket has neither)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


class SocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP or Unix socket. ``socket`` is the stdlib socket (for getpeername and the like).

    ``peer_address`` is the peer's address as ``accept()`` returned it, for an accepted connection (None
    otherwise): the one system call that already said it, so the connection need not ask ``getpeername``.
    """

    def __init__(self, sock: socket.socket, peer_address: object = None) -> None:
        if sock.gettimeout() != 0.0:  # a socket made non-blocking already needs no second ioctl
            sock.setblocking(False)
        self.socket = sock
        self.peer_address = peer_address
        self._closed = False
        self._sent_eof = False
        self._send_busy = False
        self._recv_busy = False

    @classmethod
    def take_over(cls, stream: trio.SocketStream) -> SocketStream:
        """The same connection as ``stream``, which is left detached (closing it does nothing)."""
        return cls(detach(stream.socket))

    def _broken(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof() was already called")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self.socket
            waited = False
            with memoryview(data) as view:
                total = len(view)
                sent = 0
                while True:
                    try:
                        sent += sock.send(view[sent:] if sent else view)
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        raise self._broken(exc) from exc
                    if sent >= total:
                        break
                    waited = True
                    await trio.lowlevel.wait_writable(sock)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def receive_some(self, max_bytes: int | None = None, *, before_waiting: Callable[[], object] | None = None
                           ) -> bytes:
        """trio's ``receive_some``; ``before_waiting`` is called (once) if the socket has nothing to read yet.

        That is the moment a caller learns the peer has gone quiet, and a read may wait for a long time: the TLS
        stream gives back the buffers a burst made it grow (``TLSStream.release_buffers``).
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._recv_busy:
            raise trio.BusyResourceError("another task is already receiving on this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        self._recv_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self.socket
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._broken(exc) from exc
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if before_waiting is not None:
                before_waiting()
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(max_bytes)
                except BlockingIOError:
                    pass  # a spurious wake-up
                except OSError as exc:
                    raise self._broken(exc) from exc
        finally:
            self._recv_busy = False

    async def peek(self, max_bytes: int) -> bytes:
        """The first bytes waiting to be read (waiting for some if there are none), left in place; b"" at EOF."""
        while True:
            try:
                return self.socket.recv(max_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                await self.wait_readable()
            except OSError as exc:
                raise self._broken(exc) from exc

    async def wait_readable(self) -> None:
        """Wait until the socket has something to read: for code that reads the socket itself (OpenSSL)."""
        await self._wait(trio.lowlevel.wait_readable, receiving=True)

    async def wait_writable(self) -> None:
        """Wait until the socket takes more: for code that writes to the socket itself (OpenSSL)."""
        await self._wait(trio.lowlevel.wait_writable, receiving=False)

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]], *, receiving: bool) -> None:
        if self._recv_busy if receiving else self._send_busy:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        # Marked busy, so that aclose() wakes this wait (see there).
        if receiving:
            self._recv_busy = True
        else:
            self._send_busy = True
        try:
            await wait(self.socket)
        finally:
            if receiving:
                self._recv_busy = False
            else:
                self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        self._send_busy = True
        try:
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this socket")
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        await trio.lowlevel.checkpoint()
        if self._sent_eof:
            return
        self._sent_eof = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken(exc) from exc

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """``aclose()`` without its checkpoint: for a connection's task as it ends, which need not yield for it."""
        if not self._closed:
            self._closed = True
            if self._send_busy or self._recv_busy:
                # Only our own send and receive wait on this socket in trio's epoll, so only then is there a task
                # to wake. Otherwise the notice is an epoll_ctl that fails and an exception swallowed: 2% of a
                # resumed handshake's CPU, for each of its two sockets. (A wait that ended left no registration
                # trio could trip over: the kernel drops the fd from epoll as it closes.)
                trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    def unread_bytes(self) -> int:
        """Bytes the peer sent that wait in the kernel for us to read."""
        return self._queue_size(termios.FIONREAD)

    def unsent_bytes(self) -> int:
        """Bytes we sent that the peer's kernel has not acknowledged yet (sent or still queued)."""
        return self._queue_size(termios.TIOCOUTQ)

    def _queue_size(self, request: int) -> int:
        if self._closed:
            return 0
        try:
            (size,) = struct.unpack("i", fcntl.ioctl(self.socket, request, b"\0\0\0\0"))
        except OSError:
            return 0  # not a socket that keeps such a queue
        return int(size)

    async def aclose_lingering(self, *, seconds: float, max_bytes: int) -> None:
        """Close without making the kernel reset the connection: half-close, read what still comes, then close.

        Closing a socket that has unread input makes the kernel answer with a reset (RFC 1122 4.2.2.13), and
        the reset throws away whatever we sent that the peer has not acknowledged; a peer whose next write meets
        it gets an error instead of reading what we sent last (a TLS alert, the end of a reply). So: a FIN
        first, then read and discard until the peer's EOF, for at most ``seconds``, and no more than
        ``max_bytes`` once everything we sent has been acknowledged (then a reset loses none of it: Linux lets the
        peer read what arrived before the reset). Cancelling this still closes the socket.
        """
        try:
            with trio.move_on_after(seconds):
                await self.send_eof()
                discarded = 0
                while data := await self.receive_some(DEFAULT_RECEIVE_SIZE):
                    discarded += len(data)
                    if discarded >= max_bytes and not self.unsent_bytes():
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass  # the peer is gone already, or someone else still reads: nothing to wait for
        finally:
            await self.aclose()


class SocketListener(trio.abc.Listener[SocketStream]):
    """A listening socket whose ``accept()`` gives a ``SocketStream``. ``socket`` is the stdlib socket.

    Like trio's ``SocketListener``, every ``accept()`` is a checkpoint and ``aclose()`` wakes a task blocked in
    ``accept()`` with ``ClosedResourceError``. Unlike it, ``accept()`` raises every error of the socket's
    ``accept()``: the accept loop (``proxy.net.accepting``) is the one place that tells a connection that died in
    the accept queue (skip it) from a process out of descriptors (back off) and from a real failure.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        # The last accept found the backlog empty: the next one waits for readiness before it tries (a connection
        # that came meanwhile makes the wait end at once), instead of an accept() bound to fail again.
        self._drained = False

    @classmethod
    def take_over(cls, listener: trio.SocketListener) -> SocketListener:
        """The same listening socket as ``listener``, which is left detached (closing it does nothing)."""
        return cls(detach(listener.socket))

    async def accept(self) -> SocketStream:
        if self._closed:
            raise trio.ClosedResourceError("the listener was closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._drained:
                self._drained = False
                waited = True
                await trio.lowlevel.wait_readable(self.socket)
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                self._drained = True
                continue
            except OSError:
                if self._closed:
                    raise trio.ClosedResourceError("the listener was closed") from None
                raise
            break
        stream = _wrap_accepted(sock, address)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    def accept_waiting(self) -> SocketStream | None:
        """A connection already waiting in the backlog, without a checkpoint; None when there is none or the
        accept fails (the next ``accept()`` meets the error again and handles it)."""
        if self._closed:
            return None
        try:
            sock, address = self.socket.accept()
        except BlockingIOError:
            self._drained = True
            return None
        except OSError:
            return None
        return _wrap_accepted(sock, address)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


def _wrap_accepted(sock: socket.socket, address: object) -> SocketStream:
    try:
        tune_tcp(sock)
        return SocketStream(sock, address)
    except BaseException:
        sock.close()
        raise
