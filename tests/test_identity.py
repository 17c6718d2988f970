"""proxy.policy.identity: certificates built here with cryptography (ECDSA P-256), no sockets, no proxy.dev.pki."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from proxy.policy.identity import UNPARSEABLE, PeerIdentity, identity_from_cert, identity_from_chain

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2034, 1, 1, tzinfo=UTC)


def dn(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A Name from (oid, value) pairs, most general first, the order in which they are encoded."""
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def make_cert(
    subject: x509.Name,
    *,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool = False,
    serial: int = 0x1D2C3B4A,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate and its key; self-signed unless an issuer and its key are given."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@dataclasses.dataclass
class Pki:
    """root -> intermediate -> leaf, the shape of a verified chain."""

    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> Pki:
        root_name = dn((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "Acme Root CA"))
        root, root_key = make_cert(root_name, ca=True)
        intermediate, intermediate_key = make_cert(
            dn((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "Acme Clients CA")),
            issuer=root_name,
            issuer_key=root_key,
            ca=True,
        )
        return cls(root, intermediate, intermediate_key)

    def leaf(self, subject: x509.Name, *extensions: x509.ExtensionType, serial: int = 0x1D2C3B4A) -> x509.Certificate:
        cert, _ = make_cert(
            subject,
            issuer=self.intermediate.subject,
            issuer_key=self.intermediate_key,
            serial=serial,
            extensions=extensions,
        )
        return cert

    def chain(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """In the order pyOpenSSL's get_verified_chain returns: leaf first, root last."""
        return [leaf, self.intermediate, self.root]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def patched(cert: x509.Certificate, old: bytes, new: bytes) -> x509.Certificate:
    """The certificate with the last occurrence of `old` in its DER replaced by `new` of the same length.

    Keeping the length keeps every enclosing DER length valid, so the result still loads; its signature no longer
    verifies, which identity never checks. The last occurrence is the subject's copy when issuer and subject share
    a value (the issuer is encoded first).
    """
    assert len(old) == len(new)
    data = der(cert)
    at = data.rindex(old)
    return x509.load_der_x509_certificate(data[:at] + new + data[at + len(old) :])


# --- every field of a well-formed leaf ---------------------------------------------------------------------------

FULL_SUBJECT = dn(
    (NameOID.COUNTRY_NAME, "DE"),
    (NameOID.ORGANIZATION_NAME, "Acme"),
    (NameOID.ORGANIZATION_NAME, "Acme Payments GmbH"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "oncall"),
    (NameOID.COMMON_NAME, "alice"),
    (NameOID.COMMON_NAME, "alice.admin"),
)
FULL_SANS = x509.SubjectAlternativeName(
    [
        x509.DNSName("alice.prod.svc"),
        x509.DNSName("alice.internal"),
        x509.UniformResourceIdentifier("spiffe://acme/ns/prod/sa/alice"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.RFC822Name("alice@acme.example"),
    ]
)


@pytest.fixture(scope="module")
def full_leaf(pki: Pki) -> x509.Certificate:
    return pki.leaf(FULL_SUBJECT, FULL_SANS, serial=0xABCDEF0123456789)


def test_names_are_rfc4514_most_specific_first(full_leaf: x509.Certificate) -> None:
    # RFC 4514 prints the RDNs in reverse encoding order: the last-encoded CN comes first.
    identity = identity_from_cert(full_leaf)
    assert identity.subject == "CN=alice.admin,CN=alice,OU=oncall,OU=payments,O=Acme Payments GmbH,O=Acme,C=DE"
    assert identity.issuer == "CN=Acme Clients CA,O=Acme"


def test_serial_is_lowercase_hex_without_prefix(full_leaf: x509.Certificate) -> None:
    assert identity_from_cert(full_leaf).serial == "abcdef0123456789"


def test_sha256_is_the_hash_of_the_leaf_der(full_leaf: x509.Certificate) -> None:
    assert identity_from_cert(full_leaf).sha256 == hashlib.sha256(der(full_leaf)).hexdigest()


def test_validity_is_aware_utc(full_leaf: x509.Certificate) -> None:
    identity = identity_from_cert(full_leaf)
    assert (identity.not_before, identity.not_after) == (NOT_BEFORE, NOT_AFTER)
    assert identity.not_before.utcoffset() == identity.not_after.utcoffset() == timedelta(0)


def test_repeated_subject_attributes_keep_their_encoding_order(full_leaf: x509.Certificate) -> None:
    identity = identity_from_cert(full_leaf)
    assert identity.common_names == ("alice", "alice.admin")
    assert identity.organizational_units == ("payments", "oncall")
    assert identity.organizations == ("Acme", "Acme Payments GmbH")


def test_sans_of_each_type(full_leaf: x509.Certificate) -> None:
    identity = identity_from_cert(full_leaf)
    assert identity.dns_sans == ("alice.prod.svc", "alice.internal")
    assert identity.uri_sans == ("spiffe://acme/ns/prod/sa/alice",)
    assert identity.ip_sans == ("10.1.2.3", "2001:db8::1")
    assert identity.email_sans == ("alice@acme.example",)


def test_chain_issuers_run_from_the_leafs_issuer_to_the_root(pki: Pki, full_leaf: x509.Certificate) -> None:
    identity = identity_from_chain(pki.chain(full_leaf))
    assert identity.chain_issuers == ("CN=Acme Clients CA,O=Acme", "CN=Acme Root CA,O=Acme")
    assert identity.chain_issuers[0] == identity.issuer


def test_chain_and_lone_leaf_agree_on_everything_but_chain_issuers(pki: Pki, full_leaf: x509.Certificate) -> None:
    from_chain = identity_from_chain(pki.chain(full_leaf))
    alone = identity_from_cert(full_leaf)
    assert alone.chain_issuers == (alone.issuer,)
    assert dataclasses.replace(from_chain, chain_issuers=alone.chain_issuers) == alone


def test_a_chain_of_only_the_leaf_knows_just_its_issuer(full_leaf: x509.Certificate) -> None:
    assert identity_from_chain([full_leaf]).chain_issuers == ("CN=Acme Clients CA,O=Acme",)


def test_an_empty_chain_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="at least the leaf"):
        identity_from_chain([])


def test_identity_is_frozen(full_leaf: x509.Certificate) -> None:
    identity = identity_from_cert(full_leaf)
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.subject = "CN=mallory"  # type: ignore[misc]


# --- expiry and logging ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (NOT_AFTER - timedelta(days=2), 2 * 86400.0),
        (NOT_AFTER - timedelta(seconds=1.5), 1.5),
        (NOT_AFTER, 0.0),
        (NOT_AFTER + timedelta(hours=1), -3600.0),  # already expired: negative, not clamped
    ],
)
def test_remaining_seconds(full_leaf: x509.Certificate, now: datetime, expected: float) -> None:
    assert identity_from_cert(full_leaf).remaining_seconds(now) == expected


def test_log_fields_are_the_public_summary(full_leaf: x509.Certificate) -> None:
    identity = identity_from_cert(full_leaf)
    assert identity.log_fields() == {
        "subject": identity.subject,
        "issuer": "CN=Acme Clients CA,O=Acme",
        "serial": "abcdef0123456789",
        "sha256": hashlib.sha256(der(full_leaf)).hexdigest(),
        "not_after": "2034-01-01T00:00:00+00:00",
    }


def test_log_fields_cannot_forge_log_lines(pki: Pki) -> None:
    # RFC 4514 escapes NUL but not newlines or ESC; a subject is attacker-chosen text.
    leaf = pki.leaf(dn((NameOID.COMMON_NAME, "x\nlevel=info msg=admitted\x1b[2K")))
    fields = identity_from_cert(leaf).log_fields()
    assert fields["subject"] == "CN=x\\nlevel=info msg=admitted\\x1b[2K"
    assert all(value.isprintable() for value in fields.values())


# --- unusual but well-formed certificates ------------------------------------------------------------------------


def test_certificate_without_san_extension(pki: Pki) -> None:
    identity = identity_from_cert(pki.leaf(dn((NameOID.COMMON_NAME, "alice"))))
    assert identity.dns_sans == identity.uri_sans == identity.ip_sans == identity.email_sans == ()
    assert identity.common_names == ("alice",)


def test_subject_without_common_name(pki: Pki) -> None:
    leaf = pki.leaf(dn((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "batch")))
    identity = identity_from_cert(leaf)
    assert identity.subject == "OU=batch,O=Acme"
    assert identity.common_names == ()
    assert identity.organizational_units == ("batch",)


def test_empty_subject_identified_by_san_only(pki: Pki) -> None:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://acme/ns/prod/sa/job")])
    identity = identity_from_cert(pki.leaf(x509.Name([]), san))
    assert identity.subject == ""
    assert (identity.common_names, identity.organizations) == ((), ())
    assert identity.uri_sans == ("spiffe://acme/ns/prod/sa/job",)


def test_special_characters_are_escaped_in_dn_but_raw_in_fields(pki: Pki) -> None:
    leaf = pki.leaf(dn((NameOID.ORGANIZATION_NAME, "Acme, Inc."), (NameOID.COMMON_NAME, "#al+ice\x00é ")))
    identity = identity_from_cert(leaf)
    assert identity.subject == "CN=\\#al\\+ice\\00é\\ ,O=Acme\\, Inc."
    assert identity.common_names == ("#al+ice\x00é ",)
    assert identity.organizations == ("Acme, Inc.",)


def test_unknown_attribute_types_print_as_dotted_oids(pki: Pki) -> None:
    leaf = pki.leaf(dn((NameOID.EMAIL_ADDRESS, "alice@acme.example"), (NameOID.COMMON_NAME, "alice")))
    assert identity_from_cert(leaf).subject == "CN=alice,1.2.840.113549.1.9.1=alice@acme.example"


# --- malformed certificates: loadable, but some field does not decode --------------------------------------------
# These are what a misbehaving or hostile client may present; the access log still needs an identity for them.


PLACEHOLDER = b"placeholder"  # 11 bytes, patched below into something of the same length


@pytest.fixture(scope="module")
def placeholder_leaf(pki: Pki) -> x509.Certificate:
    """A leaf whose CN, DNS SAN and URI SAN are PLACEHOLDER-based, ready to be patched."""
    sans = x509.SubjectAlternativeName(
        [x509.DNSName("placeholder.dns"), x509.UniformResourceIdentifier("spiffe://placeholder")]
    )
    return pki.leaf(dn((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, PLACEHOLDER.decode())), sans)


UTF8_CN = b"\x0c\x0b" + PLACEHOLDER  # UTF8String, 11 bytes


@pytest.mark.parametrize(
    "bad_cn",
    [
        pytest.param(b"\x0c\x0b\xff\xfe" + b"a" * 9, id="invalid-utf8"),
        pytest.param(b"\x14\x0b" + b"\xe9" * 11, id="t61string-latin1"),
        pytest.param(b"\x02\x0b" + b"\x01" * 11, id="integer-value"),
        pytest.param(b"\x03\x0b\x00" + b"a" * 10, id="bitstring-value"),
    ],
)
def test_undecodable_subject_becomes_unparseable(placeholder_leaf: x509.Certificate, bad_cn: bytes) -> None:
    leaf = patched(placeholder_leaf, UTF8_CN, bad_cn)
    identity = identity_from_cert(leaf)
    assert identity.subject == UNPARSEABLE
    assert identity.common_names == identity.organizations == ()
    # Everything that does not depend on the subject is still there, for the log line.
    assert identity.issuer == "CN=Acme Clients CA,O=Acme"
    assert identity.sha256 == hashlib.sha256(der(leaf)).hexdigest()
    assert identity.dns_sans == ("placeholder.dns",)


def test_undecodable_issuer_becomes_unparseable(pki: Pki) -> None:
    # Self-signed: issuer and subject hold the same CN; patching the first occurrence breaks only the issuer.
    cert, _ = make_cert(dn((NameOID.COMMON_NAME, PLACEHOLDER.decode())))
    data = der(cert)
    at = data.index(UTF8_CN)
    broken = x509.load_der_x509_certificate(data[:at] + b"\x0c\x0b\xff" + b"a" * 10 + data[at + len(UTF8_CN) :])
    identity = identity_from_cert(broken)
    assert identity.issuer == UNPARSEABLE
    assert identity.chain_issuers == (UNPARSEABLE,)
    assert identity.subject == "CN=placeholder"


def test_undecodable_ca_subject_in_chain(pki: Pki, placeholder_leaf: x509.Certificate) -> None:
    broken_intermediate = patched(pki.intermediate, b"Acme Clients CA", b"\xff" * 15)
    identity = identity_from_chain([placeholder_leaf, broken_intermediate, pki.root])
    assert identity.chain_issuers == (UNPARSEABLE, "CN=Acme Root CA,O=Acme")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(b"placeholder.dns", "plàceholder.dn".encode("latin-1") + b"s", id="non-ascii-dns-ia5"),
        pytest.param(b"spiffe://placeholder", b"\xff" * 20, id="invalid-uri-bytes"),
    ],
)
def test_undecodable_san_entry_drops_all_sans(placeholder_leaf: x509.Certificate, old: bytes, new: bytes) -> None:
    identity = identity_from_cert(patched(placeholder_leaf, old, new))
    assert identity.dns_sans == identity.uri_sans == ()
    assert identity.common_names == ("placeholder",)


def test_utf8_in_dns_san_is_kept_as_text(placeholder_leaf: x509.Certificate) -> None:
    # Not a valid hostname (dNSName is IA5), but cryptography decodes it, so it is kept as the certificate says.
    identity = identity_from_cert(patched(placeholder_leaf, b"placeholder.dns", "éé".encode() + b"eholder.dns"))
    assert identity.dns_sans == ("ééeholder.dns",)


def test_duplicate_san_extension(pki: Pki) -> None:
    # CertificateBuilder refuses duplicates, so add an IssuerAlternativeName (OID 2.5.29.18) with the same content
    # and rename it to subjectAltName (2.5.29.17): same length, so the DER stays well-formed.
    names = [x509.DNSName("alice.prod.svc")]
    leaf = pki.leaf(
        dn((NameOID.COMMON_NAME, "alice")), x509.SubjectAlternativeName(names), x509.IssuerAlternativeName(names)
    )
    duplicated = patched(leaf, b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11")
    with pytest.raises(x509.DuplicateExtension):
        _ = duplicated.extensions  # what identity has to survive
    identity = identity_from_cert(duplicated)
    assert identity.dns_sans == ()
    assert identity.common_names == ("alice",)


@pytest.mark.parametrize(
    "raw_san",
    [
        pytest.param(b"garbage", id="not-der"),
        pytest.param(b"\x30\x03\xa3\x01\x00", id="x400-address"),
        pytest.param(b"\x30\x00", id="empty-sequence"),
    ],
)
def test_malformed_san_extension(pki: Pki, raw_san: bytes) -> None:
    san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, raw_san)
    identity = identity_from_cert(pki.leaf(dn((NameOID.COMMON_NAME, "alice")), san))
    assert identity.dns_sans == identity.uri_sans == identity.ip_sans == identity.email_sans == ()
    assert identity.subject == "CN=alice"


def test_unparseable_is_not_a_distinguished_name() -> None:
    # It must never equal a configured DN, which the config parses with from_rfc4514_string.
    with pytest.raises(ValueError):
        x509.Name.from_rfc4514_string(UNPARSEABLE)


def test_peer_identity_can_be_built_from_plain_values() -> None:
    # Other modules' tests (policy, logging) construct identities directly; keep that possible.
    identity = PeerIdentity(
        subject="CN=a",
        issuer="CN=ca",
        serial="1",
        sha256="0" * 64,
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
        common_names=("a",),
        organizational_units=(),
        organizations=(),
        dns_sans=(),
        uri_sans=(),
        ip_sans=(),
        email_sans=(),
        chain_issuers=("CN=ca",),
    )
    assert identity.remaining_seconds(NOT_BEFORE) == (NOT_AFTER - NOT_BEFORE).total_seconds()


# ---- the per-listener cache of what verified chains say (proxy.tls.context) ---------------------------------------


def _server_tls(strict: bool = True):
    from proxy.tls.context import ServerTLS

    return ServerTLS(context=None, materials=None, policy=None, client_auth="require", strict=strict)


def _examine(tls, chain: list[x509.Certificate], loads: list[int] | None = None):
    """``tls.examine_chain`` as the verify callback calls it: the certificates' SHA-256, and a loader."""

    def load() -> list[x509.Certificate]:
        if loads is not None:
            loads.append(1)
        return [x509.load_der_x509_certificate(der(cert)) for cert in chain]  # fresh objects, as from OpenSSL

    return tls.examine_chain(tuple(hashlib.sha256(der(cert)).digest() for cert in chain), load)


def test_a_chain_seen_again_reuses_its_facts_and_another_chain_gets_its_own(pki: Pki, full_leaf) -> None:
    tls = _server_tls()
    loads: list[int] = []
    first = _examine(tls, pki.chain(full_leaf), loads)
    assert first.identity == identity_from_chain(pki.chain(full_leaf)) and first.refusal is None
    again = _examine(tls, pki.chain(full_leaf), loads)
    assert again is first and len(loads) == 1, "the same chain was parsed again"
    other_chain = _examine(tls, [full_leaf, pki.intermediate], loads)  # the same leaf, a shorter chain
    assert other_chain is not first and len(loads) == 2
    assert other_chain.identity.chain_issuers == ("CN=Acme Clients CA,O=Acme",)


def test_a_strict_refusal_is_a_fact_of_the_chain_and_names_the_leaf(pki: Pki) -> None:
    no_signing = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                               data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                               encipher_only=False, decipher_only=False)
    leaf = pki.leaf(dn((NameOID.COMMON_NAME, "cannot-sign")), no_signing, serial=77)
    tls = _server_tls()
    facts = _examine(tls, pki.chain(leaf))
    assert facts.identity is None and facts.refusal == "client certificate keyUsage lacks digitalSignature"
    assert facts.leaf.serial_number == 77  # for the access log
    assert _examine(tls, pki.chain(leaf)) is facts
    lenient = _examine(_server_tls(strict=False), pki.chain(leaf))  # client_auth.strict: false
    assert lenient.refusal is None and lenient.identity.serial == format(77, "x")


def test_the_chain_cache_is_bounded(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.tls import context

    monkeypatch.setattr(context, "IDENTITY_CACHE_SIZE", 2)
    tls = _server_tls()
    leaves = [pki.leaf(dn((NameOID.COMMON_NAME, f"client-{i}")), serial=i + 1) for i in range(3)]
    built = [_examine(tls, pki.chain(leaf)) for leaf in leaves]
    assert len(tls.chains) == 2
    assert _examine(tls, pki.chain(leaves[2])) is built[2]
    rebuilt = _examine(tls, pki.chain(leaves[0]))  # the oldest was dropped: built again
    assert rebuilt is not built[0] and rebuilt == built[0]
    assert len(tls.chains) == 2
