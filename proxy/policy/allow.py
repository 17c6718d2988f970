"""Authorization: may this verified client through? A pure, fail-closed function over the listener's allow rules.

Shaped like ghostunnel's ACL (auth/auth.go): a flat sequence of "if this rule matches, admit" checks and a final
deny. No rules at all (`allow` omitted from the config) admits any client whose chain verified; an allow section
whose lists are all empty admits nobody. Patterns are compiled once per listener, in `Policy.from_rules`, and
matching is a regex fullmatch per SAN. The config compiles each pattern as it loads too, so that a bad one
surfaces in `check` with the entry that holds it (`allow.dns_sans[0]`) rather than on the first handshake.

Wildcards are whole labels (DNS) or whole path segments (URI), never part of one, as in ghostunnel's wildcard
package: `*.prod.svc` and `spiffe://acme/ns/*/sa/*` are patterns, `web-*.prod.svc` is an error.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from proxy.policy.identity import PeerIdentity


class AllowRules(Protocol):
    """The allow section of a listener (proxy.config.schema.AllowConfig); read-only, any object with these attributes.

    DNs are expected normalised with `x509.Name.from_rfc4514_string(dn).rfc4514_string()` and fingerprints as 64
    lowercase hex digits: the config validates both when it loads.
    """

    @property
    def subjects(self) -> tuple[str, ...]: ...
    @property
    def issuers(self) -> tuple[str, ...]: ...
    @property
    def common_names(self) -> tuple[str, ...]: ...
    @property
    def organizational_units(self) -> tuple[str, ...]: ...
    @property
    def dns_sans(self) -> tuple[str, ...]: ...
    @property
    def uri_sans(self) -> tuple[str, ...]: ...
    @property
    def sha256_fingerprints(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # The rule that admitted, as "kind=configured value" (e.g. "uri_sans=spiffe://acme/ns/prod/*"). None when
    # denied, and when there are no rules ("any verified client"). Denials carry no detail on purpose: like
    # ghostunnel, the outward answer to every refused principal is the same.
    rule: str | None


_ANY_VERIFIED_CLIENT = Decision(allowed=True, rule=None)
_DENIED = Decision(allowed=False, rule=None)


@dataclass(frozen=True, slots=True)
class _Pattern:
    text: str  # as configured, for Decision.rule
    regex: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Policy:
    # The default instance has no rules and allow_any unset, so it denies everything: fail closed.
    allow_any: bool = False
    subjects: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    dns_sans: tuple[_Pattern, ...] = ()
    uri_sans: tuple[_Pattern, ...] = ()
    sha256_fingerprints: tuple[str, ...] = ()

    @classmethod
    def from_rules(cls, allow: AllowRules | None) -> Policy:
        """Compile a listener's allow rules; None admits any verified client. Raises ValueError on a bad pattern."""
        if allow is None:
            return cls(allow_any=True)
        return cls(
            subjects=tuple(allow.subjects),
            issuers=tuple(allow.issuers),
            common_names=tuple(allow.common_names),
            organizational_units=tuple(allow.organizational_units),
            dns_sans=tuple(_Pattern(p, compile_dns_pattern(p)) for p in allow.dns_sans),
            uri_sans=tuple(_Pattern(p, compile_uri_pattern(p)) for p in allow.uri_sans),
            sha256_fingerprints=tuple(allow.sha256_fingerprints),
        )

    def authorize(self, identity: PeerIdentity) -> Decision:
        """Admit on the first matching rule (kinds checked in the order the config lists them); else deny."""
        if self.allow_any:
            return _ANY_VERIFIED_CLIENT
        if (hit := _first_dn(self.subjects, (identity.subject,))) is not None:
            return _admitted("subjects", hit)
        if (hit := _first_dn(self.issuers, identity.chain_issuers)) is not None:
            return _admitted("issuers", hit)
        if (hit := _first_equal(self.common_names, identity.common_names)) is not None:
            return _admitted("common_names", hit)
        if (hit := _first_equal(self.organizational_units, identity.organizational_units)) is not None:
            return _admitted("organizational_units", hit)
        if (hit := _first_match(self.dns_sans, identity.dns_sans)) is not None:
            return _admitted("dns_sans", hit)
        if (hit := _first_match(self.uri_sans, identity.uri_sans)) is not None:
            return _admitted("uri_sans", hit)
        if (hit := _first_fingerprint(self.sha256_fingerprints, identity.sha256)) is not None:
            return _admitted("sha256_fingerprints", hit)
        return _DENIED


def _admitted(kind: str, value: str) -> Decision:
    return Decision(allowed=True, rule=f"{kind}={value}")


# Each finder returns the first configured value that one of the presented values satisfies, or None.


def _first_equal(allowed: tuple[str, ...], presented: Iterable[str]) -> str | None:
    presented_set = set(presented)
    return next((value for value in allowed if value in presented_set), None)


def _first_dn(allowed: tuple[str, ...], presented: Iterable[str]) -> str | None:
    if not allowed:
        return None  # spare parsing the identity's DNs when no rule could use them
    canonical = (_canonical_dn(dn) for dn in presented)
    return _first_equal(allowed, (dn for dn in canonical if dn is not None))


def _first_match(allowed: tuple[_Pattern, ...], presented: tuple[str, ...]) -> str | None:
    return next((p.text for p in allowed if any(p.regex.fullmatch(name) for name in presented)), None)


def _first_fingerprint(allowed: tuple[str, ...], presented: str) -> str | None:
    # Constant-time compare, as ghostunnel does for its pins: the time taken says nothing about how close a
    # presented fingerprint came to a configured one.
    presented_bytes = presented.encode()
    return next((fp for fp in allowed if hmac.compare_digest(fp.encode(), presented_bytes)), None)


def _canonical_dn(dn: str) -> str | None:
    """`dn` normalised the way the config normalises its DNs; None if it does not parse (it then matches nothing).

    For cryptography's own output this is almost always the identity, but not quite: a bytes-valued attribute
    prints as "#hex" and re-parses as text. Running both sides through the same function keeps the comparison
    honest, e.g. for a subject copied from the access log into the config.
    """
    try:
        return x509.Name.from_rfc4514_string(dn).rfc4514_string()
    except ValueError:
        return None


# DNS: a label is a run of anything but dots; the name is matched ASCII-case-insensitively (DNS names are ASCII,
# and re.ASCII keeps Unicode case folding such as KELVIN SIGN -> "k" out of it).
_DNS_WILDCARDS = {"*": r"[^.]+", "**": r"[^.]+(?:\.[^.]+)*"}

# URI: a segment is a run of anything but slashes; `**` takes the rest of the URI, which must not be empty.
_URI_WILDCARDS = {"*": r"[^/]+", "**": r".+"}


def compile_dns_pattern(pattern: str) -> re.Pattern[str]:
    """`*` is exactly one label, `**` one or more labels; everything else is literal. Match with fullmatch().

    At most one `**`: two of them would make the match ambiguous and the regex needlessly slow to fail.
    """
    _require_non_empty(pattern)
    labels = pattern.split(".")
    if labels.count("**") > 1:
        raise ValueError(f"DNS pattern {pattern!r}: '**' may appear only once")
    parts = [_wildcard_part(pattern, label, "label", _DNS_WILDCARDS) for label in labels]
    return re.compile(r"\.".join(parts), re.IGNORECASE | re.ASCII)


def compile_uri_pattern(pattern: str) -> re.Pattern[str]:
    """`*` is exactly one path segment, `**` (last segment only) the non-empty rest. Case-sensitive; use fullmatch()."""
    _require_non_empty(pattern)
    segments = pattern.split("/")
    if "**" in segments[:-1]:
        raise ValueError(f"URI pattern {pattern!r}: '**' may only be the last segment, like 'spiffe://acme/**'")
    parts = [_wildcard_part(pattern, segment, "segment", _URI_WILDCARDS) for segment in segments]
    # DOTALL: `**` means any remainder, even one holding a (bizarre) newline, just as `*` already does.
    return re.compile("/".join(parts), re.DOTALL)


def _wildcard_part(pattern: str, part: str, unit: str, wildcards: dict[str, str]) -> str:
    if part in wildcards:
        return wildcards[part]
    if "*" in part:
        raise ValueError(f"pattern {pattern!r}: a wildcard must be a whole {unit} ('*' or '**'), not {part!r}")
    return re.escape(part)


def _require_non_empty(pattern: str) -> None:
    if not pattern:
        raise ValueError("empty pattern")
