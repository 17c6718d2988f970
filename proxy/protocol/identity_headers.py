"""The identity headers of HTTP mode: what the proxy adds to every request and what it strips (pure: no I/O, no trio).

`HeaderPolicy` is built once per listener from the config, so a bad header name or variable fails at startup. Per
connection it gives the headers to append (`added_headers`: XFCC for a verified client, X-Forwarded-For,
X-Forwarded-Proto and the configured extras) and per request it says which incoming headers go (`is_stripped`) and
which Upgrade protocols may pass (`allowed_upgrades`). `proxy.protocol.http1.HttpRelay` applies it to the wire.

Stripping
---------
A header is removed when its name, lowercased and with every character other than a letter or a digit deleted,
equals that reduction of a header the proxy owns. So `X-Forwarded-Client-Cert`, `x_forwarded_client_cert`,
`X.FORWARDED.CLIENT.CERT` all go: CGI and WSGI turn `-` into `_` (so `X_Forwarded_For` and `X-Forwarded-For` become
the same HTTP_X_FORWARDED_FOR), and some servers fold other punctuation too. Every copy goes, on every request.
Owned headers: the ones the proxy sets (XFCC, X-Forwarded-For, X-Forwarded-Proto, each configured extra) and
`ALWAYS_STRIPPED`: the other headers a backend reads from a proxy it trusts (Forwarded, X-Forwarded-Host, ...).
The client is not a trusted proxy, so its copies are forged, and the proxy sets none of them (Host passes through).

Values
------
Certificate text is chosen by whoever made the certificate, so every value is made printable ASCII before it
becomes a header (`_ascii_text`, `_ascii_dn`): nothing can end the header block or smuggle obs-text, and decoding
the `\\XX` escapes gives the original back.

Upgrades
--------
The allow-list (`upgrades`, default websocket) lives here because an upgraded connection is a raw pump the relay
no longer reads: no header can be stripped or added after the 101. h2c is refused at construction for that reason
(see "Upgrade" in proxy.protocol.http1).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from proxy.policy.identity import PeerIdentity

MAX_HEADER_BYTES = 32 * 1024  # request line + header block, like nginx's large_client_header_buffers 4x8k

XFCC = "X-Forwarded-Client-Cert"
XFF = "X-Forwarded-For"
XFP = "X-Forwarded-Proto"

# Headers a backend reads from a proxy it trusts: Werkzeug's ProxyFix, Django, Express "trust proxy", Rails, Spring's
# ForwardedHeaderFilter, and RFC 9440's Client-Cert. This proxy sets none of them, so any copy is the client's.
ALWAYS_STRIPPED = (
    "Forwarded",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "X-Forwarded-Ssl",
    "X-Real-IP",
    "Client-Cert",
    "Client-Cert-Chain",
)

# Hop-by-hop headers never forwarded as received (RFC 9110 section 7.6.1); Connection and Upgrade are rebuilt.
# HTTP2-Settings belongs to the h2c upgrade, which never passes (RFC 7540 section 3.2.1: hop-by-hop).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"http2-settings"})
# Framing and routing headers a Connection token must not remove, nor a configured extra header replace.
FRAMING_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding"})
_NOT_CONFIGURABLE = FRAMING_HEADERS | HOP_BY_HOP | {b"trailer", b"expect"}

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Upgrade protocols that may never be allowed: their traffic carries HTTP requests the relay would not see.
_NEVER_UPGRADED = frozenset({"h2c"})
_NON_ALNUM = bytes(b for b in range(256) if not chr(b).isascii() or not chr(b).isalnum())


# ---- header names ------------------------------------------------------------------------------------------------


def reduce_name(name: str | bytes) -> bytes:
    """The stripping key of a header name: lowercase letters and digits only (`X_Forwarded-For` -> `xforwardedfor`)."""
    raw = name.encode("latin-1") if isinstance(name, str) else name
    return raw.lower().translate(None, _NON_ALNUM)


# ---- identity values: header-safe text ---------------------------------------------------------------------------


def _hex_escape(ch: str) -> str:
    return "".join(f"\\{byte:02X}" for byte in ch.encode("utf-8"))


def _ascii_text(text: str) -> str:
    """Printable ASCII for a header: anything else becomes RFC 4514-style `\\XX` UTF-8 hex pairs.

    Certificate text is attacker-chosen: a newline would break the header block and non-ASCII bytes are obs-text.
    A backslash and spaces at either end (h11 refuses them, receivers strip them) are escaped too, so the value is
    never silently altered: decoding every `\\XX` gives the original back.
    """
    out = [ch if " " <= ch <= "~" and ch != "\\" else _hex_escape(ch) for ch in text]
    return _escape_edge_spaces("".join(out))


def _ascii_dn(dn: str) -> str:
    """An RFC 4514 DN in printable ASCII, still a valid DN for the same name (what OpenSSL's RFC 2253 printer gives).

    Backslashes are already RFC 4514 escapes here, so only non-ASCII and control characters become `\\XX`. A DN
    ends with a space only as the escape `\\ `, which becomes the equivalent `\\20`.
    """
    out = "".join(ch if " " <= ch <= "~" else _hex_escape(ch) for ch in dn)
    if out.endswith("\\ ") and _odd_backslashes_before(out, len(out) - 1):
        out = out[:-1] + "20"
    return _escape_edge_spaces(out)


def _escape_edge_spaces(text: str) -> str:
    if text.startswith(" "):
        text = "\\20" + text[1:]
    if text.endswith(" "):
        text = text[:-1] + "\\20"
    return text


def _odd_backslashes_before(text: str, index: int) -> bool:
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


# ---- XFCC --------------------------------------------------------------------------------------------------------


def xfcc_element(identity: PeerIdentity) -> str:
    """Envoy's XFCC element for a verified client: `Hash=..;Subject="..";URI=..;DNS=..`, keys in Envoy's order.

    Envoy's rules (docs, "x-forwarded-client-cert"): a value holding `,` `;` `=` or `"` is double-quoted, with `"`
    written `\\"`; Subject is always quoted; one URI= per URI SAN and one DNS= per DNS SAN, in certificate order.
    No URI= or DNS= when the certificate has none. All values are made printable ASCII first (`_ascii_text`).
    """
    parts = [f"Hash={identity.sha256}", f"Subject={_xfcc_quote_dn(_ascii_dn(identity.subject))}"]
    parts += [f"URI={_xfcc_value(_ascii_text(uri))}" for uri in identity.uri_sans]
    parts += [f"DNS={_xfcc_value(_ascii_text(dns))}" for dns in identity.dns_sans]
    return ";".join(parts)


def _xfcc_value(value: str) -> str:
    if any(ch in value for ch in ',;="'):
        return '"' + value.replace('"', '\\"') + '"'
    return value


def _xfcc_quote_dn(dn: str) -> str:
    """A DN between double quotes.

    RFC 4514 already writes every `"` and `\\` inside a DN as `\\"` and `\\\\`, so a real DN goes in as is: exactly
    what Envoy does with OpenSSL's RFC 2253 string. Escaping it again would turn `\\"` into `\\\\"`, which a parser
    that honours `\\\\` reads as the end of the quoted string. Any `"` or `\\` that is not already part of an escape
    (only a hand-made PeerIdentity can hold one) is escaped here, so the quoted string can never end early.
    """
    out: list[str] = []
    i = 0
    while i < len(dn):
        if dn[i] == "\\" and i + 1 < len(dn):
            out.append(dn[i : i + 2])
            i += 2
            continue
        out.append("\\" + dn[i] if dn[i] in '"\\' else dn[i])
        i += 1
    return '"' + "".join(out) + '"'


# ---- configured extra headers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Client:
    """What the variables read: the identity (None = anonymous) and the leaf's DER when known."""

    identity: PeerIdentity | None
    leaf_der: bytes | None


def _from_identity(read: Callable[[PeerIdentity], str]) -> Callable[[_Client], str]:
    return lambda client: "" if client.identity is None else read(client.identity)


def _pem_urlencoded(client: _Client) -> str:
    """The leaf PEM, URL-encoded like nginx's $ssl_client_escaped_cert (all but A-Z a-z 0-9 - . _ ~ escaped).

    Only the driver knows the DER; when it passes none, the value is empty and the header is left out.
    """
    if client.identity is None or client.leaf_der is None:
        return ""
    b64 = base64.b64encode(client.leaf_der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
    return quote(pem, safe="")


# Variable name -> value for one client. "" means "no header" (nginx drops a proxy_set_header whose value is empty).
VARIABLES: Mapping[str, Callable[[_Client], str]] = {
    "subject": _from_identity(lambda i: _ascii_dn(i.subject)),
    "issuer": _from_identity(lambda i: _ascii_dn(i.issuer)),
    "common_name": _from_identity(lambda i: ",".join(_ascii_text(cn) for cn in i.common_names)),
    "serial": _from_identity(lambda i: i.serial),
    "fingerprint_sha256": _from_identity(lambda i: i.sha256),
    "uri_sans": _from_identity(lambda i: ",".join(_ascii_text(uri) for uri in i.uri_sans)),
    "dns_sans": _from_identity(lambda i: ",".join(_ascii_text(dns) for dns in i.dns_sans)),
    "not_after": _from_identity(lambda i: i.not_after.isoformat()),
    "verify": lambda client: "NONE" if client.identity is None else "SUCCESS",
    "cert_pem_urlencoded": _pem_urlencoded,
}


class HeaderPolicy:
    """What a listener adds and strips; built once from the config, so mistakes surface at startup.

    `extra_headers` maps a header name to one of `VARIABLES`, e.g. {"X-Client-DN": "subject"}. `upgrades` are
    the protocol names a client may switch to with Upgrade (see "Upgrade" in proxy.protocol.http1).
    """

    def __init__(
        self,
        extra_headers: Mapping[str, str] | None = None,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        upgrades: Iterable[str] = ("websocket",),
    ):
        extras = dict(extra_headers or {})
        _check_extra_headers(extras)
        if max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {max_header_bytes}")
        self.upgrades = _checked_upgrades(upgrades)
        self.extra_headers: Mapping[str, str] = extras
        self.max_header_bytes = max_header_bytes
        owned = [XFCC, XFF, XFP, *ALWAYS_STRIPPED, *extras]
        self._stripped = frozenset(reduce_name(name) for name in owned)

    @property
    def needs_leaf_der(self) -> bool:
        """Whether `cert_pem_urlencoded` is configured; without the DER that header is left out."""
        return "cert_pem_urlencoded" in self.extra_headers.values()

    def is_stripped(self, name: str | bytes) -> bool:
        """Whether an incoming header of this name is removed (see "Stripping" in the module docstring)."""
        return reduce_name(name) in self._stripped

    def allowed_upgrades(self, protocols: Iterable[bytes]) -> list[bytes]:
        """The protocols (as sent: `WebSocket`, `foo/2`) whose name is on the allow-list, in order."""
        return [protocol for protocol in protocols if protocol_name(protocol) in self.upgrades]

    def added_headers(
        self, *, client_ip: str, identity: PeerIdentity | None, leaf_der: bytes | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The headers the proxy appends to every request of one connection."""
        _check_leaf_der(identity, leaf_der)
        values = [(XFF, str(ipaddress.ip_address(client_ip))), (XFP, "https")]
        if identity is not None:
            values.insert(0, (XFCC, xfcc_element(identity)))
        client = _Client(identity, leaf_der)
        values += [(name, VARIABLES[variable](client)) for name, variable in self.extra_headers.items()]
        return [(name.encode("ascii"), value.encode("ascii")) for name, value in values if value]


def _check_extra_headers(extras: Mapping[str, str]) -> None:
    fixed = {reduce_name(name): name for name in (XFCC, XFF, XFP)}
    protected = {reduce_name(name): name.decode("ascii") for name in _NOT_CONFIGURABLE}
    seen: dict[bytes, str] = {}
    for name, variable in extras.items():
        if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
            raise ValueError(
                f"extra header name {name!r} is not a valid HTTP field name "
                "(letters, digits and !#$%&'*+-.^_`|~ only)"
            )
        key = reduce_name(name)
        if key in fixed:
            raise ValueError(f"extra header {name!r} is the proxy's own {fixed[key]} header; choose another name")
        if key in protected:
            raise ValueError(
                f"extra header {name!r} would replace {protected[key]}, which must reach the backend as the client "
                "sent it; choose another name"
            )
        if key in seen:
            raise ValueError(
                f"extra headers {seen[key]!r} and {name!r} are the same header to a backend "
                "(case, '-', '_' and other punctuation do not count); keep one"
            )
        seen[key] = name
        if variable not in VARIABLES:
            raise ValueError(
                f"extra header {name!r}: unknown variable {variable!r}; choose one of {', '.join(VARIABLES)}"
            )


def _checked_upgrades(upgrades: Iterable[str]) -> frozenset[str]:
    if isinstance(upgrades, str):
        raise ValueError(f"upgrades must be a list of protocol names, not the string {upgrades!r}")
    names = frozenset(name.lower() for name in upgrades)
    for name in names:
        if not _TOKEN_RE.fullmatch(name) or "/" in name:
            raise ValueError(f"upgrade {name!r} is not a protocol name (a token without a version, such as websocket)")
    if names & _NEVER_UPGRADED:
        raise ValueError("upgrade 'h2c' cannot be allowed: its HTTP/2 streams would bypass the identity headers")
    return names


def protocol_name(protocol: bytes) -> str:
    """What the allow-list compares: the name without its version, lowercased (`WebSocket/13` -> `websocket`)."""
    return protocol.split(b"/", 1)[0].strip().lower().decode("latin-1")


def _check_leaf_der(identity: PeerIdentity | None, leaf_der: bytes | None) -> None:
    if identity is not None and leaf_der is not None and hashlib.sha256(leaf_der).hexdigest() != identity.sha256:
        raise ValueError("leaf_der is not the certificate of this identity (SHA-256 differs)")

