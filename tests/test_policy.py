"""proxy.policy.allow: authorization of plain PeerIdentity values against allow rules.

No certificates or sockets needed.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.policy.allow import Decision, Policy, compile_dns_pattern, compile_uri_pattern
from proxy.policy.identity import UNPARSEABLE, PeerIdentity, identity_from_cert, identity_from_chain
from tests.test_identity import Pki, dn

ALICE_SHA256 = "3f" * 32
ALICE = PeerIdentity(
    subject="CN=alice,OU=payments,O=Acme",
    issuer="CN=Acme Clients CA,O=Acme",
    serial="1d2c3b4a",
    sha256=ALICE_SHA256,
    not_before=datetime(2024, 1, 1, tzinfo=UTC),
    not_after=datetime(2034, 1, 1, tzinfo=UTC),
    common_names=("alice",),
    organizational_units=("payments",),
    organizations=("Acme",),
    dns_sans=("alice.prod.svc",),
    uri_sans=("spiffe://acme/ns/prod/sa/alice",),
    ip_sans=("10.1.2.3",),
    email_sans=("alice@acme.example",),
    chain_issuers=("CN=Acme Clients CA,O=Acme", "CN=Acme Intermediate CA,O=Acme", "CN=Acme Root CA,O=Acme"),
)


@dataclasses.dataclass(frozen=True)
class Allow:
    """Stands in for proxy.config.schema.AllowConfig: same attribute names, values already normalised."""

    subjects: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    uri_sans: tuple[str, ...] = ()
    sha256_fingerprints: tuple[str, ...] = ()


def authorize(identity: PeerIdentity = ALICE, /, **rules: tuple[str, ...]) -> Decision:
    return Policy.from_rules(Allow(**rules)).authorize(identity)


def alice(**changes: object) -> PeerIdentity:
    return dataclasses.replace(ALICE, **changes)  # type: ignore[arg-type]


# --- no rules, empty rules --------------------------------------------------------------------------------------


def test_no_rules_admit_any_verified_client() -> None:
    policy = Policy.from_rules(None)
    assert policy.authorize(ALICE) == Decision(allowed=True, rule=None)
    assert policy.authorize(alice(subject="", common_names=(), dns_sans=(), chain_issuers=("CN=x",))).allowed


def test_empty_rule_set_denies_everyone() -> None:
    assert Policy.from_rules(Allow()).authorize(ALICE) == Decision(allowed=False, rule=None)


def test_default_policy_fails_closed() -> None:
    assert Policy().authorize(ALICE) == Decision(allowed=False, rule=None)


# --- one rule of each kind admits, and says which -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "expected_rule"),
    [
        pytest.param(
            {"subjects": ("CN=alice,OU=payments,O=Acme",)}, "subjects=CN=alice,OU=payments,O=Acme", id="subject"
        ),
        pytest.param({"issuers": ("CN=Acme Clients CA,O=Acme",)}, "issuers=CN=Acme Clients CA,O=Acme", id="issuer"),
        pytest.param({"common_names": ("alice",)}, "common_names=alice", id="common-name"),
        pytest.param({"organizational_units": ("payments",)}, "organizational_units=payments", id="ou"),
        pytest.param({"dns_sans": ("*.prod.svc",)}, "dns_sans=*.prod.svc", id="dns-san"),
        pytest.param(
            {"uri_sans": ("spiffe://acme/ns/prod/sa/*",)}, "uri_sans=spiffe://acme/ns/prod/sa/*", id="uri-san"
        ),
        pytest.param({"sha256_fingerprints": (ALICE_SHA256,)}, f"sha256_fingerprints={ALICE_SHA256}", id="fingerprint"),
    ],
)
def test_each_rule_kind_admits_and_is_named(rules: dict[str, tuple[str, ...]], expected_rule: str) -> None:
    assert authorize(**rules) == Decision(allowed=True, rule=expected_rule)


def test_rule_names_the_configured_value_that_matched_not_the_first_one() -> None:
    decision = authorize(common_names=("bob", "alice", "carol"))
    assert decision.rule == "common_names=alice"


def test_first_matching_rule_in_config_order_is_reported() -> None:
    decision = authorize(common_names=("alice",), subjects=("CN=alice,OU=payments,O=Acme",))
    assert decision.rule == "subjects=CN=alice,OU=payments,O=Acme"


def test_identity_matching_no_rule_is_denied() -> None:
    decision = authorize(
        subjects=("CN=bob,OU=payments,O=Acme",),
        issuers=("CN=Other CA",),
        common_names=("bob", "Alice", "alice "),
        organizational_units=("Payments",),
        dns_sans=("*.staging.svc",),
        uri_sans=("spiffe://acme/ns/staging/*",),
        sha256_fingerprints=("00" * 32,),
    )
    assert decision == Decision(allowed=False, rule=None)


# --- exactness of the plain-string rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        ({"common_names": ("Alice",)}, False),  # case-sensitive
        ({"common_names": ("alic",)}, False),  # no prefix match
        ({"organizational_units": ("payment",)}, False),
        ({"subjects": ("CN=alice,O=Acme",)}, False),  # a DN is matched whole, not by containment
        ({"subjects": ("CN=Alice,OU=payments,O=Acme",)}, False),
        ({"subjects": ("O=Acme,OU=payments,CN=alice",)}, False),  # RDN order matters
    ],
)
def test_plain_rules_are_exact(rules: dict[str, tuple[str, ...]], allowed: bool) -> None:
    assert authorize(**rules).allowed is allowed


def test_every_presented_value_is_considered() -> None:
    identity = alice(common_names=("alice", "alice.admin"), organizational_units=("payments", "oncall"))
    assert authorize(identity, common_names=("alice.admin",)).rule == "common_names=alice.admin"
    assert authorize(identity, organizational_units=("oncall",)).rule == "organizational_units=oncall"


def test_subject_copied_from_the_log_matches_after_normalisation() -> None:
    # A bytes-valued attribute prints as "#hex" but re-parses as text; the config stores the re-parsed form.
    logged = "CN=alice,2.5.4.45=#000102"
    configured = x509.Name.from_rfc4514_string(logged).rfc4514_string()
    assert configured != logged
    assert authorize(alice(subject=logged), subjects=(configured,)).rule == f"subjects={configured}"


def test_unparseable_subject_and_issuers_match_nothing() -> None:
    identity = alice(subject=UNPARSEABLE, chain_issuers=(UNPARSEABLE,))
    assert not authorize(identity, subjects=(UNPARSEABLE,), issuers=(UNPARSEABLE,)).allowed


# --- issuers: any CA in the verified chain ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    ["CN=Acme Clients CA,O=Acme", "CN=Acme Intermediate CA,O=Acme", "CN=Acme Root CA,O=Acme"],
    ids=["issuing-ca", "intermediate", "root"],
)
def test_issuer_rule_matches_any_ca_in_the_chain(issuer: str) -> None:
    assert authorize(issuers=("CN=Partner CA", issuer)) == Decision(allowed=True, rule=f"issuers={issuer}")


def test_issuer_rule_without_a_verified_chain_sees_only_the_leafs_issuer() -> None:
    lone_leaf = alice(chain_issuers=(ALICE.issuer,))
    assert not authorize(lone_leaf, issuers=("CN=Acme Root CA,O=Acme",)).allowed
    assert authorize(lone_leaf, issuers=(ALICE.issuer,)).allowed


def test_issuer_rule_does_not_match_the_leafs_own_subject() -> None:
    assert not authorize(issuers=(ALICE.subject,)).allowed


# --- fingerprints ------------------------------------------------------------------------------------------------


def flip_last_hex_digit(fingerprint: str) -> str:
    return fingerprint[:-1] + ("0" if fingerprint[-1] != "0" else "1")


@pytest.mark.parametrize(
    ("configured", "allowed"),
    [
        pytest.param((ALICE_SHA256,), True, id="exact"),
        pytest.param(("ab" * 32, ALICE_SHA256), True, id="second-of-two"),
        pytest.param((flip_last_hex_digit(ALICE_SHA256),), False, id="last-digit-differs"),
        pytest.param((ALICE_SHA256[:-2],), False, id="prefix"),
        pytest.param((ALICE_SHA256 + "00",), False, id="longer"),
        pytest.param(("",), False, id="empty"),
    ],
)
def test_fingerprint_match_and_near_misses(configured: tuple[str, ...], allowed: bool) -> None:
    assert authorize(sha256_fingerprints=configured).allowed is allowed


# --- wildcard tables ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        # literal
        ("alice.prod.svc", "alice.prod.svc", True),
        ("alice.prod.svc", "alice.prod.svc.evil", False),
        ("alice.prod.svc", "alicexprodxsvc", False),  # dots are literal, not regex wildcards
        # case-insensitive
        ("alice.prod.svc", "ALICE.Prod.SVC", True),
        ("*.PROD.svc", "a.prod.SVC", True),
        ("k.prod.svc", "\u212a.prod.svc", False),  # KELVIN SIGN is not an ASCII "k"
        # `*` is exactly one non-empty label
        ("*.prod.svc", "a.prod.svc", True),
        ("*.prod.svc", "web-1.prod.svc", True),
        ("*.prod.svc", "prod.svc", False),
        ("*.prod.svc", ".prod.svc", False),
        ("*.prod.svc", "a.b.prod.svc", False),
        ("*.prod.svc", "a.prod.svc.", False),
        ("*.prod.svc", "a.prod.svcx", False),
        ("api.*.svc", "api.prod.svc", True),
        ("api.*.svc", "api.prod.eu.svc", False),
        ("*.*.svc", "a.b.svc", True),
        ("*.*.svc", "a.svc", False),
        ("*", "localhost", True),
        ("*", "a.b", False),
        # `**` is one or more labels
        ("**.prod.svc", "a.prod.svc", True),
        ("**.prod.svc", "a.b.c.prod.svc", True),
        ("**.prod.svc", "prod.svc", False),
        ("**.prod.svc", "a..prod.svc", False),
        ("**.prod.svc", "a.prod.svc.evil", False),
        ("api.**.svc", "api.a.b.svc", True),
        ("api.**.svc", "api.svc", False),
        ("**", "anything.at.all", True),
    ],
)
def test_dns_patterns(pattern: str, name: str, matches: bool) -> None:
    assert (compile_dns_pattern(pattern).fullmatch(name) is not None) is matches
    assert authorize(alice(dns_sans=(name,)), dns_sans=(pattern,)).allowed is matches


@pytest.mark.parametrize(
    ("pattern", "uri", "matches"),
    [
        # literal, case-sensitive
        ("spiffe://acme/ns/prod/sa/alice", "spiffe://acme/ns/prod/sa/alice", True),
        ("spiffe://acme/ns/prod/sa/alice", "spiffe://acme/ns/prod/sa/Alice", False),
        ("spiffe://acme/ns/prod/sa/alice", "SPIFFE://acme/ns/prod/sa/alice", False),
        ("spiffe://acme/ns/prod/sa/alice", "spiffe://acme/ns/prod/sa/alice/", False),
        ("https://acme.example/a?b=c", "https://acme.example/a?b=c", True),
        ("https://acme.example/a?b=c", "https://acmexexample/a?b=c", False),  # "." and "?" are literal
        # `*` is exactly one non-empty segment
        ("spiffe://acme/ns/prod/*", "spiffe://acme/ns/prod/sa", True),
        ("spiffe://acme/ns/prod/*", "spiffe://acme/ns/prod/sa/x", False),
        ("spiffe://acme/ns/prod/*", "spiffe://acme/ns/prod/", False),
        ("spiffe://acme/ns/prod/*", "spiffe://acme/ns/prod", False),
        ("spiffe://acme/ns/*/sa/alice", "spiffe://acme/ns/staging/sa/alice", True),
        ("spiffe://acme/ns/*/sa/alice", "spiffe://acme/ns/a/b/sa/alice", False),
        ("spiffe://acme/ns/*/sa/*", "spiffe://acme/ns/prod/sa/alice", True),
        ("spiffe://*/ns/prod/sa/alice", "spiffe://evil/ns/prod/sa/alice", True),
        # `**` is the non-empty remainder, slashes included
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/prod/sa", True),
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/prod/sa/alice/x", True),
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/prod/", False),
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/prod", False),
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/production/sa", False),
        ("spiffe://acme/ns/prod/**", "spiffe://acme/ns/PROD/sa", False),
    ],
)
def test_uri_patterns(pattern: str, uri: str, matches: bool) -> None:
    assert (compile_uri_pattern(pattern).fullmatch(uri) is not None) is matches
    assert authorize(alice(uri_sans=(uri,)), uri_sans=(pattern,)).allowed is matches


def test_any_of_several_sans_may_match() -> None:
    identity = alice(dns_sans=("alice.internal", "alice.prod.svc"), uri_sans=("urn:x", "spiffe://acme/ns/prod/sa/a"))
    assert authorize(identity, dns_sans=("*.prod.svc",)).rule == "dns_sans=*.prod.svc"
    assert authorize(identity, uri_sans=("spiffe://acme/**",)).rule == "uri_sans=spiffe://acme/**"


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param({"dns_sans": ("web-*.prod.svc",)}, id="dns-partial-label"),
        pytest.param({"dns_sans": ("*web.prod.svc",)}, id="dns-partial-label-suffix"),
        pytest.param({"dns_sans": ("***.prod.svc",)}, id="dns-triple-star"),
        pytest.param({"dns_sans": ("**.**.svc",)}, id="dns-two-double-stars"),
        pytest.param({"dns_sans": ("",)}, id="dns-empty"),
        pytest.param({"uri_sans": ("spiffe://acme/ns/prod-*",)}, id="uri-partial-segment"),
        pytest.param({"uri_sans": ("spiffe://acme/**/sa",)}, id="uri-double-star-not-last"),
        pytest.param({"uri_sans": ("*://acme/ns",)}, id="uri-wildcard-scheme"),
        pytest.param({"uri_sans": ("",)}, id="uri-empty"),
    ],
)
def test_bad_patterns_are_rejected_when_the_policy_is_built(rules: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(ValueError, match="pattern"):
        Policy.from_rules(Allow(**rules))


# --- with real certificates --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer", ["CN=Acme Clients CA,O=Acme", "CN=Acme Root CA,O=Acme"], ids=["intermediate", "root"]
)
def test_issuer_rule_on_a_real_verified_chain(issuer: str) -> None:
    # End to end through identity_from_chain, with the certificate helpers of test_identity.
    pki = Pki.create()
    leaf = pki.leaf(dn((NameOID.COMMON_NAME, "alice")))
    policy = Policy.from_rules(Allow(issuers=(issuer,)))
    assert policy.authorize(identity_from_chain(pki.chain(leaf))) == Decision(allowed=True, rule=f"issuers={issuer}")


def test_root_issuer_rule_cannot_admit_without_the_verified_chain() -> None:
    # A lone leaf (rejected certificate, resumed session) names only its direct issuer; the root is unknown.
    pki = Pki.create()
    leaf = pki.leaf(dn((NameOID.COMMON_NAME, "alice")))
    assert not Policy.from_rules(Allow(issuers=("CN=Acme Root CA,O=Acme",))).authorize(identity_from_cert(leaf)).allowed
