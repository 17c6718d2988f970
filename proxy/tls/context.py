"""Build a listener's pyOpenSSL server Context from its config and loaded files.

A pyOpenSSL Context is frozen once a Connection has been made from it, so a
Context is built whole, once per generation of material, and a reload swaps
in a new ``ServerTLS`` (new connections take the current one).

Client verification happens inside OpenSSL; our verify callback only watches
it. For each certificate of the client's chain OpenSSL calls the callback
(root first, leaf last) with its own verdict. We keep every error code (so a
failure has a precise reason) and the client's leaf when something fails (to
log it), and on the leaf, once the whole chain is verified, we apply the
strict leaf rules (``client_auth.strict``) and the allow rules. Refusing
there makes the handshake itself fail: the client gets an alert instead of a
session that is then cut, and a refused client never sends a byte of
application data.

What a chain says (the identity, and whether the leaf breaks a strict rule)
depends on its bytes alone, so it is worked out once per distinct chain
(``ServerTLS.examine_chain``); OpenSSL still verifies every chain, every time.

``build_server_tls`` is the one failure boundary of a listener's TLS setup:
anything OpenSSL, cryptography or the allow-pattern compiler refuses while
building it becomes a ConfigError naming the field and the file, so that
``check`` and ``run`` exit 2 with a message and a reload keeps the old
material.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from OpenSSL import SSL, crypto

from proxy.config.materials import ListenerMaterials, ServerCredentials, describe_key, key_too_small
from proxy.config.schema import AllowConfig, ConfigError, ListenerConfig, TLSConfig
from proxy.policy.allow import Decision, Policy
from proxy.policy.identity import PeerIdentity, identity_from_chain
from proxy.tls._openssl import (
    X509_V_ERR_APPLICATION_VERIFICATION,
    X509_V_ERR_UNABLE_TO_GET_CRL,
    X509_V_OK,
    ALPNChoice,
    ALPNSelect,
    VerifyStep,
    set_verify,
)
from proxy.tls.classify import X509_V_ERR_CERT_REJECTED
from proxy.tls.resumption import refuse_expired_resumptions

log = logging.getLogger("proxy.tls")

# TLS 1.2 suites when `tls.ciphers` is not set: forward secrecy (ECDHE) and
# AEAD only, for ECDSA and RSA server keys. TLS 1.3 suites are all AEAD.
DEFAULT_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_VERIFY_MODES = {
    "require": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
    "optional": SSL.VERIFY_PEER,
    "none": SSL.VERIFY_NONE,
}
# SSL_MODE_ENABLE_PARTIAL_WRITE: pyOpenSSL turns it on, and with it SSL_write
# silently returns after one record. Our stream needs all-or-nothing writes.
_MODE_ENABLE_PARTIAL_WRITE = 0x1
# SSL_MODE_RELEASE_BUFFERS: free the 16 KiB+ read/write buffers of a session
# while it is idle; a proxy holds many idle connections.
_MODE_RELEASE_BUFFERS = 0x10
_E = TypeVar("_E", bound=x509.ExtensionType)
# Bounded: a few hundred bytes each, one per distinct client certificate.
IDENTITY_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class ChainFacts:
    """What a verified chain says by its bytes alone."""

    identity: PeerIdentity | None  # None when the leaf breaks a strict rule
    refusal: str | None = None  # the strict leaf rule the leaf breaks (client_auth.strict)
    leaf: x509.Certificate | None = None  # kept with a refusal only, to name the client in the log


def chain_facts(chain: list[x509.Certificate], *, strict: bool) -> ChainFacts:
    """The strict leaf rules (when ``strict``), then the identity of ``chain`` (leaf first)."""
    if strict and (refusal := strict_leaf_refusal(chain[0])) is not None:
        return ChainFacts(identity=None, refusal=refusal, leaf=chain[0])
    return ChainFacts(identity=identity_from_chain(chain))


def examine_chain(fingerprints: tuple[bytes, ...], load: Callable[[], list[x509.Certificate]]) -> ChainFacts:
    """A verified chain's facts, strict rules on: ``ServerTLS.examine_chain`` without the cache."""
    return chain_facts(load(), strict=True)


@dataclass
class HandshakeRecord:
    """What the verify callback saw during one handshake (one per Connection)."""

    policy: Policy
    # What the verified chain says, from the SHA-256 of each certificate (leaf first) and, if that chain is not
    # known yet, the certificates themselves: ServerTLS.examine_chain.
    examine: Callable[[tuple[bytes, ...], Callable[[], list[x509.Certificate]]], ChainFacts] = examine_chain
    leaf: x509.Certificate | None = None  # the client's certificate when it was refused, for the log
    errors: list[tuple[int, int]] = field(default_factory=list)  # (X509 error, depth)
    refusal: str | None = None  # the strict leaf rule the client's certificate broke
    identity: PeerIdentity | None = None
    decision: Decision | None = None

    @property
    def denied(self) -> bool:
        return self.decision is not None and not self.decision.allowed

    def release_certificates(self) -> None:
        """Drop the client's certificate once the identity is known: an open
        connection should not hold a certificate it will never look at again."""
        self.leaf = None


def _verify_callback(conn: SSL.Connection, step: VerifyStep, ok: bool) -> bool:
    record: HandshakeRecord = conn.get_app_data()
    depth = step.depth
    if not ok:
        if record.leaf is None:
            record.leaf = step.leaf()  # named in the log, also when it is a CA above it that fails
        if step.error == X509_V_ERR_UNABLE_TO_GET_CRL:
            # CRL checking covers every CA in the chain, but only where a CRL
            # was given (`check` names the CAs without one).
            step.set_error(X509_V_OK)
            return True
        record.errors.append((step.error, depth))
        return False
    return True if depth != 0 else _accept_leaf(record, step)


def _accept_leaf(record: HandshakeRecord, step: VerifyStep) -> bool:
    """The leaf, once its whole chain verified: the strict rules, then the allow rules."""
    try:
        fingerprints = step.chain_sha256()  # the whole verified chain, read from OpenSSL at once
        if not fingerprints:
            raise ValueError("OpenSSL holds no verified chain")
        facts = record.examine(fingerprints, step.chain)
        if facts.identity is None:  # the leaf broke a strict rule
            record.refusal, record.leaf = facts.refusal, facts.leaf
            # Measured with this OpenSSL: "certificate rejected" is answered with a
            # bad_certificate alert; the closer codes (invalid non-CA, keyUsage
            # without digitalSignature) get "certificate unknown".
            step.set_error(X509_V_ERR_CERT_REJECTED)
            return False
        record.identity = facts.identity
        record.decision = record.policy.authorize(facts.identity)
    except Exception:
        log.exception("could not read the client's chain or evaluate the allow rules; denying")
        record.decision = Decision(allowed=False, rule=None)
    if not record.decision.allowed:
        # Without an error code OpenSSL would send "internal error"; this one
        # makes it a "handshake failure" alert: refused, not broken.
        step.set_error(X509_V_ERR_APPLICATION_VERIFICATION)
        return False
    return True


def strict_leaf_refusal(leaf: x509.Certificate) -> str | None:
    """The rule of ``client_auth.strict`` that ``leaf`` breaks, or None.

    OpenSSL accepts both as a client's leaf: a CA certificate, which should
    only ever sign certificates, and a keyUsage without digitalSignature, which
    says the key may not sign, while a client signs the handshake with it.
    Decoding the two extensions costs about 5 µs per full handshake (measured
    on a certificate loaded afresh), some 0.2% of its CPU.
    """
    try:
        constraints = _extension(leaf, x509.BasicConstraints)
        usage = _extension(leaf, x509.KeyUsage)
    except (ValueError, TypeError, x509.DuplicateExtension):
        return "client certificate extensions cannot be parsed"
    if constraints is not None and constraints.ca:
        return "client certificate is a CA certificate (basicConstraints CA:TRUE)"
    if usage is not None and not usage.digital_signature:
        return "client certificate keyUsage lacks digitalSignature"
    return None


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class ServerTLS:
    """One generation of a listener's TLS setup: Context, material and rules."""

    context: SSL.Context
    materials: ListenerMaterials
    policy: Policy
    client_auth: str
    strict: bool = True  # client_auth.strict
    # Identities of recently verified clients by leaf fingerprint: a resumed
    # session skips verification, so this is how it gets its chain back.
    identities: OrderedDict[str, PeerIdentity] = field(default_factory=OrderedDict)
    # What each recently verified chain says, by its certificates' SHA-256; see examine_chain.
    chains: OrderedDict[bytes, ChainFacts] = field(default_factory=OrderedDict)

    def remember(self, identity: PeerIdentity) -> PeerIdentity:
        """Cache ``identity``; return the cached equal one if there is one,
        so the many connections of one client share a single object."""
        known = self.identities.get(identity.sha256)
        if known is not None and known == identity:
            identity = known
        self.identities[identity.sha256] = identity
        self.identities.move_to_end(identity.sha256)
        while len(self.identities) > IDENTITY_CACHE_SIZE:
            self.identities.popitem(last=False)
        return identity

    def recall(self, sha256: str) -> PeerIdentity | None:
        return self.identities.get(sha256)

    def examine_chain(self, fingerprints: tuple[bytes, ...], load: Callable[[], list[x509.Certificate]]) -> ChainFacts:
        """What a verified chain says, worked out once per distinct chain.

        ``fingerprints`` are the SHA-256 of each certificate's DER, leaf first, which OpenSSL computes without a
        certificate object; ``load`` gives the certificates themselves, called only for a chain not seen lately.
        A client that reconnects presents the same chain, and building its facts again from fresh certificate
        objects (the certificates, the strict rules, names, SANs, fingerprint) cost about 90 µs of the 520 µs
        that the server side of a full handshake took (bench/handshake.py). The key covers every certificate
        of the chain, so a leaf that arrives with another chain gets an entry of its own. OpenSSL still
        verifies every chain; only the parsing is saved.
        """
        key = b"".join(fingerprints)  # fixed-size digests: the concatenation is unambiguous
        facts = self.chains.get(key)
        if facts is None:
            facts = self.chains[key] = chain_facts(load(), strict=self.strict)
            while len(self.chains) > IDENTITY_CACHE_SIZE:
                self.chains.popitem(last=False)
        else:
            self.chains.move_to_end(key)
        return facts

    def new_connection(self) -> tuple[SSL.Connection, HandshakeRecord]:
        conn = SSL.Connection(self.context, None)
        record = HandshakeRecord(policy=self.policy, examine=self.examine_chain)
        conn.set_app_data(record)
        conn.set_accept_state()
        return conn, record


def build_server_tls(listener: ListenerConfig, materials: ListenerMaterials, *, index: int = 0) -> ServerTLS:
    """Build the Context and compile the allow rules, or raise a ConfigError
    that names the field and the file (the failure boundary: see the module
    docstring). materials.py already explains what it can foresee, such as
    key sizes and curves; this catches whatever else OpenSSL refuses.
    """
    where = f"listeners[{index}]"
    tls = listener.tls
    auth = listener.client_auth
    ctx = _new_context(tls, where)
    _use_server_credentials(ctx, materials.server, where)

    if auth.mode != "none":
        _trust_client_cas(ctx, listener, materials, where)
        set_verify(ctx, _VERIFY_MODES[auth.mode], _verify_callback)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)

    # Resumption with client auth needs a session id context, or OpenSSL
    # fails the handshake of every client that tries to resume.
    ctx.set_session_id(hashlib.sha256(b"mtls-proxy/" + listener.name.encode()).digest()[:32])
    refuse_expired_resumptions(ctx)  # a resumed session skips verification: see resumption.py

    if tls.alpn:
        ctx.set_alpn_select_callback(_alpn_selector(tuple(p.encode() for p in tls.alpn)))

    return ServerTLS(
        context=ctx,
        materials=materials,
        policy=_compile_policy(auth.allow, where),
        client_auth=auth.mode,
        strict=auth.strict,
    )


def _new_context(tls: TLSConfig, where: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_VERSIONS[tls.min_version])
    ctx.set_max_proto_version(_VERSIONS[tls.max_version])
    # OP_IGNORE_UNEXPECTED_EOF: many clients end with a TCP FIN and no
    # close_notify. Read that as the end of the client's data, so the backend
    # gets its half-close and the reply still flows back, instead of a broken
    # session that loses the reply.
    ctx.set_options(
        SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_COMPRESSION
        | SSL.OP_IGNORE_UNEXPECTED_EOF
    )
    ctx.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    ctx.set_mode(_MODE_RELEASE_BUFFERS)
    try:
        ctx.set_cipher_list((tls.ciphers or DEFAULT_TLS12_CIPHERS).encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ConfigError(where, [f"{where}.tls.ciphers: OpenSSL accepts no cipher in {tls.ciphers!r}"]) from None
    return ctx


def _use_server_credentials(ctx: SSL.Context, server: ServerCredentials, where: str) -> None:
    with _refused(f"{where}.tls.cert", server.cert_path, server.leaf.public_key()):
        ctx.use_certificate(server.leaf)
        for intermediate in server.chain[1:]:
            ctx.add_extra_chain_cert(intermediate)
    with _refused(f"{where}.tls.key", server.key_path, server.key.public_key()):
        ctx.use_privatekey(server.key)
        ctx.check_privatekey()


def _trust_client_cas(ctx: SSL.Context, listener: ListenerConfig, materials: ListenerMaterials, where: str) -> None:
    auth = listener.client_auth
    store = ctx.get_cert_store()
    if store is None:  # OpenSSL gives every new SSL_CTX a store; without one nothing could be verified
        raise ConfigError(where, [f"{where}.client_auth: OpenSSL made no certificate store for this context"])
    with _refused(f"{where}.client_auth.trusted_ca", auth.trusted_ca):
        for ca in materials.trusted_ca:
            store.add_cert(crypto.X509.from_cryptography(ca))
    with _refused(f"{where}.client_auth.crl", auth.crl):
        for crl in materials.crls:
            store.add_crl(crl)
        if materials.crls:
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
    # The trust store and the advertised list are separate in OpenSSL:
    # without add_client_ca the CertificateRequest names no CA at all.
    with _refused(f"{where}.client_auth.{'advertised_ca' if auth.advertised_ca else 'trusted_ca'}",
                  auth.advertised_ca or auth.trusted_ca):
        for ca in materials.advertised_ca:
            ctx.add_client_ca(ca)
    ctx.set_verify_depth(auth.verify_depth)


def _compile_policy(allow: AllowConfig | None, where: str) -> Policy:
    # config.py validates every pattern when it loads; this is the backstop for
    # a config built some other way.
    try:
        return Policy.from_rules(allow)
    except ValueError as exc:
        raise ConfigError(where, [f"{where}.client_auth.allow: {exc}"]) from None


# What OpenSSL, cryptography and pyOpenSSL raise for material they refuse.
_MATERIAL_ERRORS = (SSL.Error, crypto.Error, ValueError, TypeError, UnsupportedAlgorithm)


@contextmanager
def _refused(field_name: str, path: Path | None, key: PublicKeyTypes | None = None) -> Iterator[None]:
    """Turn a refusal of the material from ``path`` into a ConfigError naming ``field_name`` and the file."""
    try:
        yield
    except _MATERIAL_ERRORS as exc:
        raise ConfigError(str(path), [f"{field_name}: {path}: {_readable(exc, key)}"]) from None


def _readable(exc: Exception, key: PublicKeyTypes | None) -> str:
    """OpenSSL's reason codes ("ee key too small") in words an operator can act on."""
    reasons = _openssl_reasons(exc)
    for reason in reasons:
        if reason in ("ee key too small", "ca key too small") and key is not None:
            return key_too_small(key) or f"key too small for OpenSSL's security level: {describe_key(key)}"
        if reason == "ca md too weak":
            return "signed with a digest OpenSSL's security level refuses (such as SHA-1); re-issue it with SHA-256"
        if reason == "key values mismatch":
            return "the private key does not match the certificate"
    if reasons:
        return f"OpenSSL refused it: {'; '.join(reasons)}"
    return f"cannot be used: {exc}"


def _openssl_reasons(exc: Exception) -> list[str]:
    """The reason strings of an SSL.Error or crypto.Error (args[0] is [(lib, func, reason), ...])."""
    errors = exc.args[0] if isinstance(exc, (SSL.Error, crypto.Error)) and exc.args else None
    if not isinstance(errors, list):
        return []
    return [str(entry[-1]) for entry in errors if isinstance(entry, tuple) and entry]


def _alpn_selector(ours: tuple[bytes, ...]) -> ALPNSelect:
    """Server preference: the first of our protocols the client also offers."""

    def select(conn: SSL.Connection, offered: list[bytes]) -> ALPNChoice:
        for proto in ours:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS  # carry on without ALPN

    return select
