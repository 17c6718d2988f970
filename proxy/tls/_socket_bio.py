"""pyOpenSSL internals for a session that OpenSSL drives on its socket (see proxy.tls.established).

pyOpenSSL creates a Connection with either a socket or memory BIOs, for good; nothing public moves a session from one
to the other, and its ``recv``/``send`` raise an exception for every ``WANT_READ``, about 2 µs each, which a
readiness-driven loop meets on every read. So this module calls ``SSL_set_fd``, ``SSL_read``, ``SSL_write`` and
``SSL_shutdown`` through the cffi binding pyOpenSSL already carries, and turns OpenSSL's would-block results into
return codes.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _no_zero_allocator

from proxy.tls._openssl import incoming_bytes, outgoing_bytes

WANT_READ = -1
WANT_WRITE = -2
EOF = 0
# SSL_MODE_ENABLE_PARTIAL_WRITE: SSL_write returns once some records are on the socket, so a full socket buffer
# leaves the rest with us (a copy of it) instead of inside OpenSSL's write buffer half-sent.
_MODE_ENABLE_PARTIAL_WRITE = 0x1


class TLSBroken(Exception):
    """The session failed (a bad record, a reset, a protocol error): nothing more can be read or written."""


class SharedBuffer:
    """One C buffer that all connections of a data plane read into in turn (used up before the next read)."""

    __slots__ = ("ptr", "size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ptr: Any = _no_zero_allocator("char[]", size)  # a cffi char[]: untyped
        self.view = memoryview(_ffi.buffer(self.ptr, size))


def discard_incoming(conn: SSL.Connection) -> None:
    """Empty the incoming memory BIO (what a client sent after its close_notify)."""
    waiting = incoming_bytes(conn)
    if waiting:
        scratch = _no_zero_allocator("char[]", waiting)
        _lib.BIO_read(conn._into_ssl, scratch, waiting)


class SocketSession:
    """A handshaken ``SSL.Connection`` whose reads and writes go to a socket file descriptor."""

    __slots__ = ("_conn", "_ssl")

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self._ssl: Any = conn._ssl  # an SSL* handle: untyped cffi

    @classmethod
    def attach(cls, conn: SSL.Connection, fd: int) -> SocketSession | None:
        """Point the session's BIOs at ``fd``; None (and the session untouched) unless both memory BIOs are empty."""
        if incoming_bytes(conn) or outgoing_bytes(conn):
            return None
        if _lib.SSL_set_fd(conn._ssl, fd) != 1:  # frees the two memory BIOs
            _lib.ERR_clear_error()
            return None
        # pyOpenSSL's bio_* methods now refuse (TypeError) rather than reach the freed BIOs.
        conn._into_ssl = conn._from_ssl = None
        _lib.SSL_set_mode(conn._ssl, _MODE_ENABLE_PARTIAL_WRITE)
        return cls(conn)

    def read_into(self, buffer: SharedBuffer, offset: int) -> int:
        """Decrypt one record (or what is left of it) into ``buffer`` at ``offset``."""
        got: int = _lib.SSL_read(self._ssl, buffer.ptr + offset, buffer.size - offset)
        return got if got > 0 else self._outcome(got)

    def write(self, data: bytes | memoryview) -> int:
        with _ffi.from_buffer(data) as ptr:
            got: int = _lib.SSL_write(self._ssl, ptr, len(data))
        return got if got > 0 else self._outcome(got)

    def write_from(self, buffer: SharedBuffer, start: int, end: int) -> int:
        got: int = _lib.SSL_write(self._ssl, buffer.ptr + start, end - start)
        return got if got > 0 else self._outcome(got)

    def shutdown(self) -> int:
        got: int = _lib.SSL_shutdown(self._ssl)
        return 1 if got >= 0 else self._outcome(got)

    def _outcome(self, result: int) -> int:
        error = _lib.SSL_get_error(self._ssl, result)
        if error == _lib.SSL_ERROR_WANT_READ:
            return WANT_READ
        if error == _lib.SSL_ERROR_WANT_WRITE:
            return WANT_WRITE
        if error == _lib.SSL_ERROR_ZERO_RETURN:
            return EOF  # close_notify, or a FIN (the context sets OP_IGNORE_UNEXPECTED_EOF)
        try:
            self._conn._raise_ssl_error(self._ssl, result)  # builds the error text and empties OpenSSL's queue
        except SSL.ZeroReturnError:
            return EOF
        except SSL.Error as exc:
            raise TLSBroken(str(exc) or exc.__class__.__name__) from exc
        raise TLSBroken(f"OpenSSL error {error}")
