"""The one place that reaches into pyOpenSSL's private cffi bindings.

pyOpenSSL is pinned (pyproject.toml) because of this module. These needs have
no public API:

- ``SSL_session_reused``: whether a handshake resumed a session.
- How many bytes wait in a Connection's memory BIOs. pyOpenSSL only says so
  by raising ``WantReadError`` from ``bio_read``/``recv``, and raising and
  catching that costs about 2 µs each time: several times per request on a
  kept-alive connection, for nothing. ``BIO_get_mem_data`` answers in 0.4 µs.
- Fewer copies of bulk data. ``Connection.recv`` and ``bio_read`` each
  allocate a C buffer, fill it, and copy it into a new ``bytes``; batching four
  records then joins them, a third copy. ``ReadBuffer`` takes several
  ``SSL_read`` results into one C buffer and copies once; ``drain`` hands out
  the ciphertext without the second copy.
- Giving the memory BIOs' buffers back. A memory BIO's buffer grows to the
  most it ever held and never shrinks: about 5 KiB after a handshake, over
  80 KiB after one 64 KiB read or write, kept for as long as the connection
  lives, idle or not.
- A verify callback that sees the ``X509_STORE_CTX``. pyOpenSSL's own
  ``Context.set_verify`` hands the callback only the current certificate and
  error, and when the callback refuses a certificate it leaves the error at
  ``X509_V_OK``, which OpenSSL reports to the client as "internal error". With
  the store context we can name the leaf even when a CA above it failed
  (for the log), and set the error that picks the alert the client receives.
- A certificate's SHA-256 from the X509 that OpenSSL holds (``X509_digest``),
  with no certificate object made: the key of what a verified chain says
  (proxy.tls.context) and a resumed client's fingerprint. pyOpenSSL's
  ``X509.digest`` needs its wrapper object and answers in colon-separated hex.
- A look at the client certificate behind a session that is being resumed,
  with the power to refuse it (``set_resumption_check``, below).
- The X509_V_ERR_* numbers and OpenSSL's words for them (``x509_error``, ``verify_error_text``): they change
  between OpenSSL versions, so they come from the linked library (proxy.tls.classify names the reasons).
- A session that OpenSSL drives on its socket after the handshake (``SocketSession``, for the data plane):
  nothing public moves a Connection from memory BIOs to a socket, and pyOpenSSL's ``recv``/``send`` raise an
  exception for every would-block, about 2 µs each, which a readiness-driven loop meets on every read.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _no_zero_allocator

log = logging.getLogger("proxy.tls")

# Typing. The binding's ``lib`` and ``ffi`` are ``Any`` (cffi generates them at run time), and so is every C
# pointer they hand out. ``CData`` marks those pointers (SSL *, X509 *, X509_STORE_CTX *, char[]): they are only
# passed back to ``lib``. Every ``lib`` result that is a plain number is given its type where it is read, so
# nothing outside this module sees an ``Any``.
CData = Any
_T = TypeVar("_T")

X509_V_OK: int = _lib.X509_V_OK
X509_V_ERR_UNABLE_TO_GET_CRL = 3
X509_V_ERR_APPLICATION_VERIFICATION: int = _lib.X509_V_ERR_APPLICATION_VERIFICATION
X509_V_ERR_CERT_HAS_EXPIRED: int = _lib.X509_V_ERR_CERT_HAS_EXPIRED
_TLSEXT_ERR_OK: int = _lib.SSL_TLSEXT_ERR_OK
_TLSEXT_ERR_ALERT_FATAL: int = _lib.SSL_TLSEXT_ERR_ALERT_FATAL
# TLS alert descriptions (RFC 8446 section 6.2); OpenSSL's SSL_AD_CERTIFICATE_EXPIRED
# and SSL_AD_INTERNAL_ERROR, which the binding does not carry.
SSL_AD_CERTIFICATE_EXPIRED = 45
SSL_AD_INTERNAL_ERROR = 80


def session_reused(conn: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(conn._ssl))


def outgoing_bytes(conn: SSL.Connection) -> int:
    """Ciphertext OpenSSL has produced and we have not taken out with ``bio_read`` yet."""
    pending: int = _lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL)
    return pending


def incoming_bytes(conn: SSL.Connection) -> int:
    """Ciphertext we put in with ``bio_write`` that OpenSSL has not read yet."""
    pending: int = _lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL)
    return pending


def drain(conn: SSL.Connection, size: int) -> memoryview:
    """Take ``size`` (> 0, at most ``outgoing_bytes``) bytes of ciphertext out of the outgoing BIO.

    ``bio_read`` without its copy into ``bytes``: the view keeps its C buffer alive.
    """
    buf: CData = _no_zero_allocator("char[]", size)
    got: int = _lib.BIO_read(conn._from_ssl, buf, size)
    if got != size:  # a memory BIO gives all it holds; anything else is a bug
        raise SSL.Error(f"BIO_read returned {got} of {size} pending bytes")
    return memoryview(_ffi.buffer(buf, size))


class ReadBuffer:
    """Plaintext from several ``SSL_read`` calls, gathered in one C buffer and copied out once."""

    __slots__ = ("_buf", "_size", "filled")

    def __init__(self, size: int) -> None:
        self._buf: CData | None = None  # a char[], allocated by the read that finds something
        self._size = size
        self.filled = 0

    @property
    def room(self) -> int:
        return self._size - self.filled

    def read_from(self, conn: SSL.Connection) -> int:
        """One ``SSL_read`` into the free space; raises exactly as ``Connection.recv`` does."""
        if self._buf is None:
            self._buf = _no_zero_allocator("char[]", self._size)
        ssl = conn._ssl
        got: int = _lib.SSL_read(ssl, self._buf + self.filled, self._size - self.filled)
        if got <= 0 and not self.filled:
            self._buf = None  # nothing yet: hold no memory while the stream waits for the peer
        conn._raise_ssl_error(ssl, got)
        self.filled += got
        return got

    def take(self) -> bytes:
        if not self.filled:
            return b""
        data: bytes = _ffi.buffer(self._buf, self.filled)[:]
        return data


def release_bio_buffers(conn: SSL.Connection) -> bool:
    """Swap empty memory BIOs in for the Connection's two, freeing their buffers.

    Only when both are empty, so no ciphertext is lost: then a memory BIO holds
    nothing but its buffer, and ``SSL_set_bio`` frees the old pair. Not after
    ``bio_shutdown``: the new BIO would forget the end of input. Returns whether
    the swap was made.
    """
    if incoming_bytes(conn) or outgoing_bytes(conn):
        return False
    return to_memory(conn)


def to_socket(conn: SSL.Connection, fd: int) -> bool:
    """Make OpenSSL read and write socket ``fd`` itself, in place of the memory BIOs; False (and the Connection
    untouched) unless both memory BIOs are empty."""
    if incoming_bytes(conn) or outgoing_bytes(conn):
        return False
    if _lib.SSL_set_fd(conn._ssl, fd) != 1:  # frees the two memory BIOs
        _lib.ERR_clear_error()
        return False
    # pyOpenSSL's bio_* methods now refuse (TypeError) rather than reach the freed BIOs.
    conn._into_ssl = conn._from_ssl = None
    return True


def to_memory(conn: SSL.Connection) -> bool:
    """Give the Connection a fresh pair of memory BIOs; ``SSL_set_bio`` frees the pair it had.

    From memory BIOs, the caller makes sure they are empty (`release_bio_buffers`). From a socket (`to_socket`),
    only between records: OpenSSL must hold no part of one (without read-ahead it reads a record's header and then
    exactly its length, so after a completed handshake it holds none); the socket BIO is freed without closing
    the descriptor (``SSL_set_fd`` made it so). False, and nothing changed, if OpenSSL is out of memory.
    """
    into_ssl = _lib.BIO_new(_lib.BIO_s_mem())
    from_ssl = _lib.BIO_new(_lib.BIO_s_mem())
    if into_ssl == _ffi.NULL or from_ssl == _ffi.NULL:
        for bio in (into_ssl, from_ssl):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(conn._ssl, into_ssl, from_ssl)
    conn._into_ssl, conn._from_ssl = into_ssl, from_ssl
    return True


def _to_cryptography(ptr: CData) -> x509.Certificate:
    _lib.X509_up_ref(ptr)  # the X509 wrapper frees its reference when collected
    return crypto.X509._from_raw_x509_ptr(ptr).to_cryptography()


_SHA256: CData = _lib.EVP_get_digestbyname(b"sha256")


def _sha256(ptr: CData) -> bytes:
    """The SHA-256 of an X509's DER, computed by OpenSSL: no certificate object, no DER copy in Python."""
    digest = _ffi.new("unsigned char[]", _lib.EVP_MAX_MD_SIZE)
    size = _ffi.new("unsigned int *")
    if not _lib.X509_digest(ptr, _SHA256, digest, size):
        raise ValueError("OpenSSL could not hash the certificate")
    sha256: bytes = _ffi.buffer(digest, size[0])[:]
    return sha256


def peer_certificate_sha256(conn: SSL.Connection) -> bytes | None:
    """The SHA-256 of the peer's certificate (its DER), or None if it presented none; also after a resumption."""
    ptr = _lib.SSL_get_peer_certificate(conn._ssl)  # a reference of our own (SSL_get1_peer_certificate)
    if ptr == _ffi.NULL:
        return None
    try:
        return _sha256(ptr)
    finally:
        _lib.X509_free(ptr)


class VerifyStep:
    """One call of OpenSSL's verify callback: a certificate, its depth, OpenSSL's verdict."""

    __slots__ = ("_store_ctx",)

    def __init__(self, store_ctx: CData) -> None:
        self._store_ctx = store_ctx  # X509_STORE_CTX *, valid only during the callback

    @property
    def error(self) -> int:
        code: int = _lib.X509_STORE_CTX_get_error(self._store_ctx)
        return code

    @property
    def depth(self) -> int:
        depth: int = _lib.X509_STORE_CTX_get_error_depth(self._store_ctx)
        return depth

    def leaf(self) -> x509.Certificate | None:
        """The certificate being verified (the client's leaf), at any depth."""
        ptr = _lib.X509_STORE_CTX_get0_cert(self._store_ctx)
        return None if ptr == _ffi.NULL else _to_cryptography(ptr)

    def chain(self) -> list[x509.Certificate]:
        """The chain OpenSSL built, leaf first, up to the trust anchor: whole by the time depth 0 is verified."""
        return self._each_of_chain(_to_cryptography)

    def chain_sha256(self) -> tuple[bytes, ...]:
        """The SHA-256 of each certificate's DER in the chain OpenSSL built, leaf first (see ``_sha256``): the
        same chain as ``chain()``, with no certificate object made."""
        return tuple(self._each_of_chain(_sha256))

    def _each_of_chain(self, each: Callable[[CData], _T]) -> list[_T]:
        """``each`` of the X509 pointers of the chain OpenSSL built, leaf first, while a copy of the chain holds a
        reference to them; the copy and its references are given back after."""
        stack = _lib.X509_STORE_CTX_get1_chain(self._store_ctx)
        if stack == _ffi.NULL:
            return []
        certs = [_lib.sk_X509_value(stack, i) for i in range(_lib.sk_X509_num(stack))]
        try:
            return [each(cert) for cert in certs]
        finally:
            for cert in certs:
                _lib.X509_free(cert)
            _lib.sk_X509_free(stack)

    def set_error(self, code: int) -> None:
        _lib.X509_STORE_CTX_set_error(self._store_ctx, code)


VerifyCallback = Callable[[SSL.Connection, VerifyStep, bool], bool]

# What ``Context.set_alpn_select_callback`` calls: the protocol chosen, or ``SSL.NO_OVERLAPPING_PROTOCOLS`` to go
# on without ALPN. pyOpenSSL names the type of that sentinel only privately.
ALPNChoice = bytes | SSL._NoOverlappingProtocols
ALPNSelect = Callable[[SSL.Connection, list[bytes]], ALPNChoice]

# The cffi callbacks installed on a Context must live as long as it does: OpenSSL holds only their C address.
# A Context has no slot for them, so they are kept here, keyed weakly by the Context they serve.
_CALLBACKS: weakref.WeakKeyDictionary[SSL.Context, dict[str, CData]] = weakref.WeakKeyDictionary()


def _keep_alive(ctx: SSL.Context, name: str, c_callback: CData) -> None:
    _CALLBACKS.setdefault(ctx, {})[name] = c_callback


def set_verify(ctx: SSL.Context, mode: int, callback: VerifyCallback) -> None:
    """Install ``callback(connection, step, ok) -> accept`` as the verify callback."""

    def trampoline(ok: int, store_ctx: CData) -> int:
        try:
            index = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
            ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
            conn = SSL.Connection._reverse_mapping[ssl]
            return 1 if callback(conn, VerifyStep(store_ctx), bool(ok)) else 0
        except Exception:  # never let an exception cross into OpenSSL
            log.exception("verify callback failed; refusing the certificate")
            return 0

    c_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", trampoline)
    _keep_alive(ctx, "verify", c_callback)
    _lib.SSL_CTX_set_verify(ctx._context, mode, c_callback)


# ``check(connection, client_certificate)``: None lets the resumption go on, a
# TLS alert number (SSL_AD_*) refuses it with that alert.
ResumptionCheck = Callable[[SSL.Connection, crypto.X509], int | None]


def set_resumption_check(ctx: SSL.Context, check: ResumptionCheck) -> None:
    """Run ``check`` on every handshake that resumes a session with a client certificate.

    OpenSSL resumes a session without verifying the client again, so without
    this a session outlives the certificate it was made with. The hooks made
    for this are not in this build's binding (cryptography 50, OpenSSL 4.0):
    neither ``SSL_CTX_set_session_ticket_cb`` (whose decrypt callback could
    turn a ticket into a full handshake) nor ``SSL_CTX_sess_set_new_cb``,
    ``SSL_SESSION_set_timeout`` or ``SSL_CTX_remove_session`` (to cap or drop
    a session), and the cryptography module exports no OpenSSL symbol to reach
    them otherwise.

    What is bound is the servername callback
    (``SSL_CTX_set_tlsext_servername_callback(3)``), and it runs at the right
    moment. OpenSSL calls it on every ClientHello, with or without SNI, after
    it has picked the session to resume and before the server sends anything:
    ``SSL_session_reused`` is already 1 and ``SSL_get_peer_certificate``
    returns the session's client certificate (checked with TLS 1.3 tickets,
    TLS 1.2 tickets and TLS 1.2 session ids). Returning
    ``SSL_TLSEXT_ERR_ALERT_FATAL`` ends the handshake with the alert, so the
    client never gets a working connection. It cannot turn the resumption
    into a full handshake: the session is already chosen. On that fatal
    alert OpenSSL removes a cached session id from the Context's cache, so a
    TLS 1.2 client's next try is a full handshake; a ticket cannot be
    withdrawn, and a client that offers it again is refused again.

    A Context has one servername callback: pyOpenSSL's
    ``Context.set_tlsext_servername_callback`` would replace this one. A full
    handshake pays only the callback's entry and ``SSL_session_reused``.
    """

    def trampoline(ssl: CData, alert: CData, _arg: CData) -> int:
        try:
            if not _lib.SSL_session_reused(ssl):
                return _TLSEXT_ERR_OK  # a full handshake: the verify callback sees the client
            cert = _lib.SSL_get_peer_certificate(ssl)  # a new reference (SSL_get1_peer_certificate)
            if cert == _ffi.NULL:
                return _TLSEXT_ERR_OK  # an anonymous session (client_auth optional or none)
            peer = crypto.X509._from_raw_x509_ptr(cert)
            refusal = check(SSL.Connection._reverse_mapping[ssl], peer)
        except Exception:  # never let an exception cross into OpenSSL; fail closed
            log.exception("resumption check failed; refusing the resumption")
            refusal = SSL_AD_INTERNAL_ERROR
        if refusal is None:
            return _TLSEXT_ERR_OK
        alert[0] = refusal
        return _TLSEXT_ERR_ALERT_FATAL

    c_callback = _ffi.callback("int (*)(SSL *, int *, void *)", trampoline)
    _keep_alive(ctx, "servername", c_callback)
    _lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, c_callback)


# ---- X509 verification errors ---------------------------------------------------------------------------------------


def x509_error(name: str) -> int:
    """The linked OpenSSL's number for an X509_V_ERR_* name (e.g. "X509_V_ERR_CERT_HAS_EXPIRED")."""
    code: int = getattr(_lib, name)
    return code


def verify_error_text(code: int) -> str:
    """OpenSSL's own words for an X509_V_ERR_* code ("certificate has expired")."""
    text: bytes = _ffi.string(_lib.X509_verify_cert_error_string(code))
    return text.decode("ascii", "replace")


# ---- a session on its socket (the data plane) -----------------------------------------------------------------------

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
        self.ptr: CData = _no_zero_allocator("char[]", size)
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
        self._ssl: CData = conn._ssl

    @classmethod
    def attach(cls, conn: SSL.Connection, fd: int) -> SocketSession | None:
        """Point the session's BIOs at ``fd``; None (and the session untouched) unless both memory BIOs are empty."""
        if not to_socket(conn, fd):
            return None
        return cls.adopt(conn)

    @classmethod
    def adopt(cls, conn: SSL.Connection) -> SocketSession:
        """A session whose BIOs are on its socket already (``to_socket``: the handshake ran there)."""
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
