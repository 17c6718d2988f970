"""A resumed session does not outlive the client certificate it was made with.

Real Python ssl clients resume real sessions of each kind the proxy hands out:
TLS 1.3 tickets, TLS 1.2 tickets and TLS 1.2 session ids (a client that asks
for no ticket). A client certificate that expires a few seconds after it was
issued gets in, resumes, and once it has expired its resumption is refused
with `certificate_expired` and counted as `expired`. A certificate revoked by
a reload cannot resume either: the reload's new Context does not know the
session, so the client goes through a full handshake, which fails `revoked`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from OpenSSL import crypto

from proxy.dev import pki
from proxy.tls.classify import REASONS
from proxy.tls.resumption import has_expired, not_after
from tests.conftest import Cred, RunningProxy, client_context, start_proxy, wait_for

if TYPE_CHECKING:  # imported for annotations only: pytest would try to collect a Test* class
    from tests.conftest import TestPKI

# Long enough for a full handshake and a resumption on a busy machine, short
# enough to wait for.
SHORT_LIFETIME = timedelta(seconds=3)

# Session kind -> (TLS version, whether the client refuses tickets, so that
# the server falls back to its session id cache).
KINDS = {
    "TLS 1.3 ticket": ("1.3", False),
    "TLS 1.2 ticket": ("1.2", False),
    "TLS 1.2 session id": ("1.2", True),
}


@dataclass
class Attempt:
    ok: bool
    reused: bool = False
    session: ssl.SSLSession | None = None
    error: str = ""


def attempt(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Attempt:
    """Connect (offering ``session``), send a ping, read the echo. Blocking: run it in a thread.

    The exchange is part of the attempt: with TLS 1.3 a refused client learns
    it on its first read, and the server's tickets arrive only after the
    handshake.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"ping")
                got = b""
                while len(got) < 4 and (chunk := tls.recv(4 - len(got))):
                    got += chunk
                if got != b"ping":
                    return Attempt(False, tls.session_reused, error="connection closed early")
                return Attempt(True, tls.session_reused, tls.session)
    except (OSError, ssl.SSLError) as exc:
        return Attempt(False, error=f"{type(exc).__name__}: {exc}")


async def attempt_async(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Attempt:
    return await trio.to_thread.run_sync(attempt, port, ctx, session)


def kind_context(test_pki: TestPKI, cred: Cred | None, kind: str) -> ssl.SSLContext:
    version, session_id_only = KINDS[kind]
    ctx = client_context(test_pki, cred, version=version)
    if session_id_only:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


async def resumable_session(p: RunningProxy, ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A full handshake, then a resumption that proves the session resumes."""
    first = await attempt_async(p.port, ctx)
    assert first.ok and not first.reused, first
    second = await attempt_async(p.port, ctx, first.session)
    assert second.ok and second.reused, second
    return second.session


def short_lived_client(test_pki: TestPKI, dir: Path) -> Cred:
    """A client certificate from the trusted client CA that expires SHORT_LIFETIME from now."""
    now = datetime.now(UTC)
    issued = pki.make_client_cert(test_pki.client_ca_issued, common_name="short-lived", organization="Acme",
                                  not_before=now - timedelta(hours=1), not_after=now + SHORT_LIFETIME)
    cert, key = dir / "short-lived.crt", dir / "short-lived.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem())
    return Cred(cert, key, issued)


async def sleep_until_expired(cred: Cred) -> None:
    """Until the wall clock is past notAfter (whole seconds in the certificate), as OpenSSL sees it."""
    expiry = cred.issued.cert.not_valid_after_utc.timestamp()
    await trio.sleep(max(0.0, expiry - time.time()) + 1.05)


def resumption_failures(p: RunningProxy, reason: str) -> float:
    return p.metric("mtls_proxy_resumption_failures_total", reason=reason)


def resumed_sessions(p: RunningProxy) -> float:
    return sum(
        sample.value
        for family in p.registry.collect()
        if family.name == "mtls_proxy_tls_sessions"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("resumed") == "true"
    )


async def test_the_refusal_counter_exists_before_the_first_refusal(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    assert p.registry.get_sample_value(
        "mtls_proxy_resumption_failures_total", {"listener": "test", "reason": "expired"}
    ) == 0.0


async def test_a_session_does_not_resume_once_its_client_certificate_has_expired(
    nursery, test_pki, echo_backend, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    cred = short_lived_client(test_pki, tmp_path)
    contexts = {kind: kind_context(test_pki, cred, kind) for kind in KINDS}
    # While the certificate is valid, every kind of session resumes.
    sessions = {kind: await resumable_session(p, ctx) for kind, ctx in contexts.items()}
    resumed_before = resumed_sessions(p)

    await sleep_until_expired(cred)

    for count, (kind, ctx) in enumerate(contexts.items(), start=1):
        refused = await attempt_async(p.port, ctx, sessions[kind])
        assert not refused.ok, (kind, refused)
        assert "CERTIFICATE_EXPIRED" in refused.error, (kind, refused.error)
        await wait_for(lambda count=count: resumption_failures(p, "expired") == count)
        assert p.failures("expired") == count, kind
    assert resumed_sessions(p) == resumed_before  # none of them got through

    def refusals() -> list[dict]:
        return [r.fields for r in caplog.records if r.name == "proxy.access" and r.fields.get("reason") == "expired"]

    await wait_for(lambda: len(refusals()) == len(KINDS))  # the line is written once the connection is closed
    assert all(line["client_subject"] == "CN=short-lived,O=Acme" for line in refusals()), refusals()


async def test_an_expired_session_id_is_dropped_so_the_next_try_is_a_full_handshake(
    nursery, test_pki, echo_backend, tmp_path
):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    cred = short_lived_client(test_pki, tmp_path)
    ctx = kind_context(test_pki, cred, "TLS 1.2 session id")
    session = await resumable_session(p, ctx)
    await sleep_until_expired(cred)

    refused = await attempt_async(p.port, ctx, session)
    assert "CERTIFICATE_EXPIRED" in refused.error, refused
    await wait_for(lambda: p.failures("expired") == 1)
    # OpenSSL removed the session from its cache with the refusal: the same
    # offer now gets a full handshake, which fails verification as `expired`.
    again = await attempt_async(p.port, ctx, session)
    assert "CERTIFICATE_EXPIRED" in again.error, again
    await wait_for(lambda: p.failures("expired") == 2)
    assert resumption_failures(p, "expired") == 1


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_valid_certificate_still_resumes(nursery, test_pki, echo_backend, kind):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    ctx = kind_context(test_pki, test_pki.alice, kind)
    session = await resumable_session(p, ctx)
    again = await attempt_async(p.port, ctx, session)
    assert again.ok and again.reused, again
    assert resumption_failures(p, "expired") == 0


async def test_an_anonymous_session_still_resumes_in_optional_mode(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"mode": "optional"})
    ctx = kind_context(test_pki, None, "TLS 1.3 ticket")
    session = await resumable_session(p, ctx)
    again = await attempt_async(p.port, ctx, session)
    assert again.ok and again.reused, again


async def test_a_session_does_not_resume_across_a_reload_that_revokes_the_client(
    nursery, test_pki, echo_backend, tmp_path
):
    crl = tmp_path / "client-ca.crl"
    crl.write_bytes(pki.crl_pem(pki.make_crl(test_pki.client_ca_issued, [])))
    p = await start_proxy(nursery, test_pki, echo_backend.address, client_auth={"crl": str(crl)})
    contexts = {kind: kind_context(test_pki, test_pki.alice, kind) for kind in KINDS}
    sessions = {kind: await resumable_session(p, ctx) for kind, ctx in contexts.items()}

    serial = test_pki.alice.issued.cert.serial_number
    crl.write_bytes(pki.crl_pem(pki.make_crl(test_pki.client_ca_issued, [serial])))
    assert p.proxy.reload_certificates()

    for count, (kind, ctx) in enumerate(contexts.items(), start=1):
        result = await attempt_async(p.port, ctx, sessions[kind])
        assert not result.ok and not result.reused, (kind, result)
        assert "CERTIFICATE_REVOKED" in result.error, (kind, result.error)
        await wait_for(lambda count=count: p.failures("revoked") == count)
    # Full handshakes, not resumptions: the new Context never accepted the session.
    assert sum(resumption_failures(p, reason) for reason in REASONS) == 0


# ---- the expiry rule, without sockets -----------------------------------------------


def test_a_certificate_has_expired_from_its_not_after_second_on():
    end = int(datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp())
    assert not has_expired(end, end - 0.001)
    assert has_expired(end, end)  # as OpenSSL's verification sees it (X509_cmp_time: notAfter <= now)
    assert has_expired(end, end + 1)


def test_not_after_reads_the_certificate_openssl_holds(test_pki):
    cert = test_pki.alice.issued.cert
    assert not_after(crypto.X509.from_cryptography(cert)) == cert.not_valid_after_utc.timestamp()
