"""PROXY protocol headers: what the proxy sends a TCP backend before any data, so it learns who the client is.

Pure: bytes out (and, for tests and test backends, bytes in), no I/O. Section names below are those of HAProxy's
doc/proxy-protocol.txt ("The PROXY protocol", versions 1 and 2), the one spec every implementation follows.

- Version 1 (section 2.1, "Human-readable header format") is one text line with the two addresses and ports.
- Version 2 (section 2.2, "Binary header format") is a 16-byte fixed part, the address block, then TLVs
  (type, 16-bit length, value). We send the ones ghostunnel sends in its `tls` / `tls-full` modes:
  PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY (the SNI), and PP2_TYPE_SSL with its sub-TLVs, plus, only when asked, the DER
  client certificate as sub-TLV 0x28 (not in HAProxy's spec; ghostunnel and go-proxyproto use that number).

Addresses. A PROXY header carries one family for both ends. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
dual-stack socket reports for an IPv4 peer) is an IPv4 address, as Go's `net.IP.To4` and so go-proxyproto treat it:
when both ends are IPv4 the header is TCP4, otherwise TCP6 with any IPv4 end written in its mapped form.

Size. Every TLV length and the header's own length field are 16-bit. A value that cannot fit (in practice only a
very large client certificate) raises ValueError instead of being cut or dropped: a backend must never receive
partial or silently missing TLS facts (ghostunnel fails closed the same way, v1.11.1 notes).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

# --- section 2.2: the fixed 16 bytes -----------------------------------------------------------------------------

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # 12 bytes, "\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
_FIXED = struct.Struct("!12sBBH")  # signature, version|command, family|transport, length of what follows
_VERSION_2 = 0x2  # high nibble of byte 13
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1  # low nibble of byte 13
_TCP_OVER_IPV4, _TCP_OVER_IPV6 = 0x11, 0x21  # byte 14: AF_INET|STREAM, AF_INET6|STREAM
_UNSPEC = 0x00  # AF_UNSPEC|UNSPEC, the usual family of a LOCAL header
_ADDRESSES = {_TCP_OVER_IPV4: struct.Struct("!4s4sHH"), _TCP_OVER_IPV6: struct.Struct("!16s16sHH")}  # 12 / 36 bytes
_MAX_LENGTH = 0xFFFF

# --- section 2.2: TLV types (2.2.1 ALPN, 2.2.2 AUTHORITY, 2.2.6 "The PP2_TYPE_SSL type and subtypes") -------------

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28  # not in HAProxy's list: ghostunnel `tls-full` / go-proxyproto

# The `client` bit field of PP2_TYPE_SSL (section 2.2.6).
PP2_CLIENT_SSL = 0x01  # the client connected over TLS
PP2_CLIENT_CERT_CONN = 0x02  # the client presented a certificate over this connection
PP2_CLIENT_CERT_SESS = 0x04  # the client presented a certificate at least once over this TLS session

_TLV_HEADER = struct.Struct("!BH")
_SSL_HEADER = struct.Struct("!BI")  # struct pp2_tlv_ssl: uint8_t client; uint32_t verify; then sub-TLVs
# Non-zero `verify` for a certificate that failed verification. HAProxy puts the X509_V_ERR code there; TLSInfo
# carries only a bool, and the spec only promises zero versus non-zero.
_VERIFY_FAILED = 1

# --- section 2.1: version 1 --------------------------------------------------------------------------------------

# Section 2.1 gives the longest lines a receiver must accept, CRLF included: 56 bytes for TCP4, 104 for TCP6 and
# 107 for UNKNOWN (so a 108-byte buffer always holds a line and a NUL). We send only TCP4/TCP6 lines.
V1_MAX_LENGTH = 107


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What the backend learns about the client's TLS session; None and "" fields are left out of the header."""

    version: str | None  # e.g. "TLSv1.3"
    cipher: str | None  # e.g. "TLS_AES_256_GCM_SHA384"
    sni: str | None
    alpn: str | None
    client_cert_presented: bool  # sets PP2_CLIENT_CERT_CONN (and _SESS)
    client_cert_verified: bool  # `verify` is 0 when verified or when no certificate was presented
    common_name: str | None  # leaf subject's CN
    client_cert_der: bytes | None  # sent only with include_cert=True


class TruncatedHeader(ValueError):
    """The bytes so far are a valid start of a v2 header but not all of it: a reader should read more."""


def encode_v2(
    source: tuple[str, int], destination: tuple[str, int], tls: TLSInfo | None, *, include_cert: bool = False
) -> bytes:
    """A PROXY v2 header (command PROXY, TCP) for a client at `source` that connected to `destination`.

    Args:
        source, destination: (IP address text, port); IPv4, IPv6 or IPv4-mapped IPv6.
        tls: None for a header with the addresses only; otherwise ALPN, AUTHORITY and SSL TLVs are added.
        include_cert: also send the DER client certificate (sub-TLV 0x28), when there is one.

    Raises:
        ValueError: an address is not an IP address, a port is out of range, or a TLV or the whole header exceeds
            its 16-bit length.
        TypeError: an address is not a str or a port not an int.
    """
    family, src, dst = _endpoints(source, destination)
    payload = _ADDRESSES[family].pack(src[0].packed, dst[0].packed, src[1], dst[1])
    if tls is not None:
        payload += _tls_tlvs(tls, include_cert=include_cert)
    if len(payload) > _MAX_LENGTH:
        raise ValueError(
            f"PROXY v2 header would carry {len(payload)} bytes of addresses and TLVs, over the {_MAX_LENGTH} its "
            f"16-bit length allows{_cert_hint(tls, include_cert)}"
        )
    return _FIXED.pack(SIGNATURE, _VERSION_2 << 4 | _CMD_PROXY, family, len(payload)) + payload


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v1 line: b"PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n", or TCP6 (section 2.1)."""
    family, src, dst = _endpoints(source, destination)
    protocol = "TCP4" if family == _TCP_OVER_IPV4 else "TCP6"
    line = f"PROXY {protocol} {_ip_text(src[0])} {_ip_text(dst[0])} {src[1]} {dst[1]}\r\n".encode("ascii")
    assert len(line) <= V1_MAX_LENGTH, line  # an invariant of valid addresses and ports, not an input check
    return line


def decode_v2(data: bytes) -> tuple[dict[str, Any], int]:
    """Parse the v2 header at the start of `data`: (fields, header length in bytes). For tests and test backends.

    Fields: "command" ("PROXY" | "LOCAL"), "family" ("TCP4" | "TCP6" | "UNSPEC"), "source" and "destination"
    ((address text, port), absent for UNSPEC), "tlvs" (every top-level (type, value) in order), and, when their TLVs
    are present, "alpn" and "authority" (str) and "ssl" (dict: "client", "verify" and, when sent, "version", "cn",
    "cipher" as str and "client_cert" as bytes).

    Raises:
        TruncatedHeader: `data` is a correct beginning but too short.
        ValueError: anything else that is not a well-formed v2 header.
    """
    if data[: len(SIGNATURE)] != SIGNATURE[: len(data)]:
        raise ValueError("not a PROXY v2 header: bad signature")
    if len(data) < _FIXED.size:
        raise TruncatedHeader(f"PROXY v2 header truncated: {len(data)} of at least {_FIXED.size} bytes")
    _, version_command, family, length = _FIXED.unpack_from(data)
    end = _FIXED.size + length
    if version_command >> 4 != _VERSION_2:
        raise ValueError(f"not a PROXY v2 header: version {version_command >> 4}")
    commands = {_CMD_LOCAL: "LOCAL", _CMD_PROXY: "PROXY"}
    if version_command & 0x0F not in commands:
        raise ValueError(f"PROXY v2 header with unknown command {version_command & 0x0F:#x}")
    if len(data) < end:
        raise TruncatedHeader(f"PROXY v2 header truncated: {len(data)} of {end} bytes")
    fields: dict[str, Any] = {"command": commands[version_command & 0x0F]}

    if family == _UNSPEC:
        # Section 2.2: AF_UNSPEC (what LOCAL headers use) carries no address the receiver may use; skip the block.
        fields["family"] = "UNSPEC"
        fields["tlvs"] = []
        return fields, end
    if family not in _ADDRESSES:
        raise ValueError(f"PROXY v2 header with unsupported family/transport {family:#04x}")
    addresses = _ADDRESSES[family]
    if length < addresses.size:
        raise ValueError(f"PROXY v2 length {length} is too short for the {addresses.size}-byte address block")
    src, dst, sport, dport = addresses.unpack_from(data, _FIXED.size)
    fields["family"] = "TCP4" if family == _TCP_OVER_IPV4 else "TCP6"
    fields["source"] = (_ip_text(ipaddress.ip_address(src)), sport)
    fields["destination"] = (_ip_text(ipaddress.ip_address(dst)), dport)

    fields["tlvs"] = tlvs = _parse_tlvs(data[_FIXED.size + addresses.size : end])
    for kind, value in tlvs:
        if kind == PP2_TYPE_ALPN:
            fields["alpn"] = value.decode()
        elif kind == PP2_TYPE_AUTHORITY:
            fields["authority"] = value.decode()
        elif kind == PP2_TYPE_SSL:
            fields["ssl"] = _parse_ssl(value)
    return fields, end


# --- encoding helpers --------------------------------------------------------------------------------------------

_Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _endpoints(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, _Endpoint, _Endpoint]:
    """Both ends in one family: TCP4 when both are IPv4 (mapped ones unmapped), else TCP6 with IPv4 mapped."""
    src, dst = _endpoint(source, "source"), _endpoint(destination, "destination")
    if isinstance(src[0], ipaddress.IPv4Address) and isinstance(dst[0], ipaddress.IPv4Address):
        return _TCP_OVER_IPV4, src, dst
    return _TCP_OVER_IPV6, _as_ipv6(src), _as_ipv6(dst)


def _endpoint(address: tuple[str, int], what: str) -> _Endpoint:
    host, port = address
    if not isinstance(host, str):  # ip_address() would also take an int, or packed bytes
        raise TypeError(f"PROXY header {what} address must be IP address text, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"PROXY header {what} port must be an int, got {port!r}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"PROXY header {what} port must be in 0..65535, got {port}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"PROXY header {what} must be an IP address, got {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped, port
        ip = ipaddress.IPv6Address(ip.packed)  # drops a "%scope" zone id: the header has no place for it
    return ip, port


def _as_ipv6(endpoint: _Endpoint) -> _Endpoint:
    ip, port = endpoint
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed), port
    return ip, port


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Address text for v1 and the decoder. Mapped IPv4 is spelled `::ffff:a.b.c.d` on every Python version
    (3.13 changed str() of these; 3.11 prints `::ffff:102:304`)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _tls_tlvs(tls: TLSInfo, *, include_cert: bool) -> bytes:
    """PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, then PP2_TYPE_SSL, in HAProxy's order (sections 2.2.1, 2.2.2, 2.2.6).

    Flags: PP2_CLIENT_SSL always (this is a TLS listener). A presented certificate sets PP2_CLIENT_CERT_CONN and
    PP2_CLIENT_CERT_SESS, which is what HAProxy sends after a full handshake: a certificate presented on this
    connection was by definition presented in its session. (HAProxy sends _SESS alone on a resumed session; TLSInfo
    does not say whether the session was resumed, and the identity is the session's certificate either way.)

    `verify` is 0 when the certificate verified or when there was none, as HAProxy leaves it, and 1 after a failed
    verification. The spec's wording ("zero if the client presented a certificate and it was successfully
    verified") alone does not cover the no-certificate case, so a backend must test PP2_CLIENT_CERT_CONN, not only
    verify == 0, before it treats a connection as authenticated.
    """
    client = PP2_CLIENT_SSL
    if tls.client_cert_presented:
        client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    verify = _VERIFY_FAILED if tls.client_cert_presented and not tls.client_cert_verified else 0
    ssl = _SSL_HEADER.pack(client, verify) + b"".join(
        [
            _tlv(PP2_SUBTYPE_SSL_VERSION, _text(tls.version)),  # US-ASCII, e.g. "TLSv1.3"
            _tlv(PP2_SUBTYPE_SSL_CN, _text(tls.common_name)),  # UTF-8
            _tlv(PP2_SUBTYPE_SSL_CIPHER, _text(tls.cipher)),  # US-ASCII cipher name
            _tlv(PP2_SUBTYPE_SSL_CLIENT_CERT, tls.client_cert_der if include_cert else None),  # DER
        ]
    )
    return b"".join(
        [
            _tlv(PP2_TYPE_ALPN, _text(tls.alpn)),  # the negotiated protocol id, e.g. "h2"
            _tlv(PP2_TYPE_AUTHORITY, _text(tls.sni)),  # 2.2.2: over TLS, the server_name (SNI) value; UTF-8
            _tlv(PP2_TYPE_SSL, ssl),
        ]
    )


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8")


def _tlv(kind: int, value: bytes | None) -> bytes:
    """One TLV (section 2.2): type, 16-bit big-endian length, value. An absent or empty value yields no TLV."""
    if not value:
        return b""
    if len(value) > _MAX_LENGTH:
        raise ValueError(
            f"PROXY v2 TLV {kind:#04x} value is {len(value)} bytes, over the {_MAX_LENGTH} its 16-bit length allows"
        )
    return _TLV_HEADER.pack(kind, len(value)) + value


def _cert_hint(tls: TLSInfo | None, include_cert: bool) -> str:
    if tls is None or not include_cert or not tls.client_cert_der:
        return ""
    return f" (the client certificate alone is {len(tls.client_cert_der)} bytes of DER; without include_cert it fits)"


# --- decoding helpers --------------------------------------------------------------------------------------------


def _parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TLV_HEADER.size:
            raise ValueError(f"PROXY v2 TLV header cut short at offset {offset}")
        kind, length = _TLV_HEADER.unpack_from(data, offset)
        offset += _TLV_HEADER.size
        if len(data) - offset < length:
            raise ValueError(f"PROXY v2 TLV {kind:#04x} claims {length} bytes, {len(data) - offset} remain")
        tlvs.append((kind, data[offset : offset + length]))
        offset += length
    return tlvs


_SSL_SUBTYPES = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_CLIENT_CERT: "client_cert",
}


def _parse_ssl(value: bytes) -> dict[str, Any]:
    if len(value) < _SSL_HEADER.size:
        raise ValueError(f"PP2_TYPE_SSL value is {len(value)} bytes, shorter than its {_SSL_HEADER.size}-byte header")
    client, verify = _SSL_HEADER.unpack_from(value)
    ssl: dict[str, Any] = {"client": client, "verify": verify}
    for kind, sub in _parse_tlvs(value[_SSL_HEADER.size :]):
        if kind in _SSL_SUBTYPES:
            ssl[_SSL_SUBTYPES[kind]] = sub if kind == PP2_SUBTYPE_SSL_CLIENT_CERT else sub.decode()
    return ssl
