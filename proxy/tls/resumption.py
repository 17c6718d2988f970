"""A resumed session must not outlive the client certificate it was made with.

A resumed handshake skips certificate verification: the client proves it holds
the session's secret, and the certificate it showed in the full handshake is
taken as still good. OpenSSL keeps a session for 7,200 s by default (the
ticket lifetime and the cache timeout), as nginx and ``openssl s_server`` do,
so a client whose certificate expired ten seconds ago could still get in for
up to two hours by resuming.

What can change between the full handshake and a resumption:

- The CRL, the trusted CAs and the allow rules. They change only by a reload,
  and a reload builds a new ``SSL.Context``, which has its own session-ticket
  keys and an empty session cache: no session made before a reload resumes
  after it (measured with TLS 1.3 tickets, TLS 1.2 tickets and TLS 1.2 session
  ids; ``tests/test_resumption_guard.py`` resumes across a reload that revokes
  the client). Those are covered with nothing more to do.
- Time. The client certificate can expire during one Context's lifetime. That
  is what is checked here, on every resumption: once the certificate is past
  its notAfter, the resumption is refused with the ``certificate_expired``
  alert, the alert a full handshake would end with. The refusal goes into the
  handshake record as the X509 error a full handshake would record
  (certificate has expired, at depth 0), so it is counted and logged as
  ``expired``, naming the client.

It is a refusal, not a full handshake in place of the resumption: this build
of OpenSSL's binding has no hook that could do that (see
``set_resumption_check``). For the client the outcome is the one a full
handshake would give: an expired certificate is refused either way. A TLS 1.2
client's cached session id is dropped by the refusal, so its next try is a
full handshake; a ticket is refused each time it is offered.

Cost, measured on a shared 2-core machine with both ends in one process: the
check itself takes 5 to 10 µs (median, timed inside the callback), and a
resumed handshake's CPU grew by 9 to 14 µs with TLS 1.2 (about 115 to 135 µs
without it) and by 4 to 42 µs with TLS 1.3 (about 450 to 520 µs, noisier).

Not checked: the expiry of the CAs above the leaf and the CRL's nextUpdate,
which can also pass within a Context's lifetime. A session carries only the
client's leaf, and refusing on a guess would lock out a client whose full
handshake succeeds for as long as it keeps offering its ticket.
"""

from __future__ import annotations

import calendar
import time
from typing import Protocol

from cryptography import x509
from OpenSSL import SSL, crypto

from proxy.tls._openssl import SSL_AD_CERTIFICATE_EXPIRED, X509_V_ERR_CERT_HAS_EXPIRED, set_resumption_check


class _Record(Protocol):
    """What the refusal writes into the handshake's record (``context.HandshakeRecord``)."""

    leaf: x509.Certificate | None
    errors: list[tuple[int, int]]


def refuse_expired_resumptions(ctx: SSL.Context) -> None:
    """On ``ctx``, refuse every resumption whose client certificate has expired since."""
    set_resumption_check(ctx, _check)


def has_expired(not_after: int, now: float) -> bool:
    """OpenSSL's rule (X509_cmp_time(3)): expired from the notAfter second on, that second included."""
    return now >= not_after


def not_after(cert: crypto.X509) -> int:
    """The certificate's notAfter as Unix seconds, read from the X509 OpenSSL already holds.

    ``get_notAfter`` gives ASN.1 GeneralizedTime, ``YYYYMMDDHHMMSSZ`` (OpenSSL
    turns a UTCTime's two-digit year into four). Only the first 14 digits are
    read, so fractional seconds, which RFC 5280 forbids, cannot break the
    check. About 3 µs, once per resumption.
    """
    stamp = cert.get_notAfter()
    if stamp is None:
        raise ValueError("the certificate has no notAfter")
    year, month, day = int(stamp[0:4]), int(stamp[4:6]), int(stamp[6:8])
    hour, minute, second = int(stamp[8:10]), int(stamp[10:12]), int(stamp[12:14])
    return calendar.timegm((year, month, day, hour, minute, second))


def _check(conn: SSL.Connection, cert: crypto.X509) -> int | None:
    if not has_expired(not_after(cert), time.time()):
        return None
    record: _Record | None = conn.get_app_data()
    if record is not None:
        record.leaf = cert.to_cryptography()  # names the client in the access log
        record.errors.append((X509_V_ERR_CERT_HAS_EXPIRED, 0))
    return SSL_AD_CERTIFICATE_EXPIRED
