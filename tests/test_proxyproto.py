"""proxy.protocol.proxyproto: PROXY protocol v1/v2 headers, checked byte for byte against headers built by hand here.

The expected bytes are written out from the spec (HAProxy doc/proxy-protocol.txt, sections 2.1 and 2.2) with
literals and struct.pack, never with the module's own helpers, so that a shared mistake cannot hide.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from proxy.protocol.proxyproto import TLSInfo, TruncatedHeader, decode_v2, encode_v1, encode_v2

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # section 2.2, the 12-byte signature

ALICE_TLS = TLSInfo(
    version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    sni="api.example",
    alpn="h2",
    client_cert_presented=True,
    client_cert_verified=True,
    common_name="alice",
    client_cert_der=b"0\x82\x01\x0afake-der",
)
ANONYMOUS_TLS = TLSInfo(
    version="TLSv1.2",
    cipher="ECDHE-RSA-AES128-GCM-SHA256",
    sni=None,
    alpn=None,
    client_cert_presented=False,
    client_cert_verified=False,
    common_name=None,
    client_cert_der=None,
)
BARE_TLS = TLSInfo(None, None, None, None, False, False, None, None)


def ipv4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


# --- v2 addresses ------------------------------------------------------------------------------------------------


def test_v2_ipv4_without_tls() -> None:
    expected = (
        SIG
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes follow: the IPv4 address block, no TLVs
        + bytes([192, 0, 2, 1])
        + bytes([198, 51, 100, 7])
        + struct.pack("!HH", 51234, 8443)
    )
    assert encode_v2(("192.0.2.1", 51234), ("198.51.100.7", 8443), None) == expected


def test_v2_ipv6() -> None:
    expected = (
        SIG
        + b"\x21\x21"  # version 2 PROXY; AF_INET6, STREAM
        + b"\x00\x24"  # 36 bytes: 16 + 16 + 2 + 2
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db80000000000000000000000ff")
        + struct.pack("!HH", 40000, 443)
    )
    assert encode_v2(("2001:db8::1", 40000), ("2001:db8::ff", 443), None) == expected


MAPPED_192_0_2_1 = bytes.fromhex("00000000000000000000ffff") + ipv4("192.0.2.1")
DB8_1 = bytes.fromhex("20010db8000000000000000000000001")


@pytest.mark.parametrize(
    ("source", "destination", "addresses"),
    [
        (("192.0.2.1", 1000), ("2001:db8::1", 2000), MAPPED_192_0_2_1 + DB8_1),
        (("2001:db8::1", 1000), ("192.0.2.1", 2000), DB8_1 + MAPPED_192_0_2_1),
        # a mapped address on one side and plain IPv4 on the other is still a mixed pair after mapping
        (("::ffff:192.0.2.1", 1000), ("2001:db8::1", 2000), MAPPED_192_0_2_1 + DB8_1),
    ],
)
def test_v2_mixed_families_map_ipv4_into_ipv6(
    source: tuple[str, int], destination: tuple[str, int], addresses: bytes
) -> None:
    expected = SIG + b"\x21\x21\x00\x24" + addresses + struct.pack("!HH", 1000, 2000)
    assert encode_v2(source, destination, None) == expected


def test_v2_two_mapped_addresses_are_sent_as_ipv4() -> None:
    # What a dual-stack listener reports for an IPv4 client: the header says TCP4, as go-proxyproto would.
    expected = SIG + b"\x21\x11\x00\x0c" + ipv4("192.0.2.1") + ipv4("192.0.2.9") + struct.pack("!HH", 5, 6)
    assert encode_v2(("::ffff:192.0.2.1", 5), ("::ffff:192.0.2.9", 6), None) == expected


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        (("localhost", 1), ValueError, "must be an IP address"),
        (("192.0.2.256", 1), ValueError, "must be an IP address"),
        (("192.0.2.1", 65536), ValueError, "port must be in 0..65535"),
        (("192.0.2.1", -1), ValueError, "port must be in 0..65535"),
        ((3232235777, 1), TypeError, "address must be IP address text"),  # ip_address() would accept it
        (("192.0.2.1", True), TypeError, "port must be an int"),
        (("192.0.2.1", "80"), TypeError, "port must be an int"),
    ],
)
def test_invalid_endpoints_raise(source: tuple[str, int], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        encode_v2(source, ("192.0.2.2", 443), None)
    with pytest.raises(error, match=message):
        encode_v1(("192.0.2.2", 443), source)


# --- v2 TLVs -----------------------------------------------------------------------------------------------------

IPV4_BLOCK = ipv4("192.0.2.1") + ipv4("198.51.100.7") + struct.pack("!HH", 51234, 8443)
ENDS = (("192.0.2.1", 51234), ("198.51.100.7", 8443))


def test_v2_with_full_tls_tlvs() -> None:
    ssl_value = (
        b"\x07"  # client: PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        + b"\x00\x00\x00\x00"  # verify: 0, verified
        + b"\x21\x00\x07TLSv1.3"  # PP2_SUBTYPE_SSL_VERSION
        + b"\x22\x00\x05alice"  # PP2_SUBTYPE_SSL_CN
        + b"\x23\x00\x16TLS_AES_256_GCM_SHA384"  # PP2_SUBTYPE_SSL_CIPHER, 22 bytes
    )
    assert len(ssl_value) == 0x30
    expected = (
        SIG
        + b"\x21\x11"
        + b"\x00\x52"  # 12 address bytes + 5 (ALPN) + 14 (AUTHORITY) + 51 (SSL) = 82
        + IPV4_BLOCK
        + b"\x01\x00\x02h2"  # PP2_TYPE_ALPN
        + b"\x02\x00\x0bapi.example"  # PP2_TYPE_AUTHORITY (SNI)
        + b"\x20\x00\x30"  # PP2_TYPE_SSL, 48 bytes
        + ssl_value
    )
    assert encode_v2(*ENDS, ALICE_TLS) == expected
    assert encode_v2(*ENDS, ALICE_TLS, include_cert=False) == expected  # the default leaves the certificate out


def test_include_cert_appends_the_der_as_subtype_0x28() -> None:
    der = ALICE_TLS.client_cert_der
    assert der is not None
    without = encode_v2(*ENDS, ALICE_TLS)
    with_cert = encode_v2(*ENDS, ALICE_TLS, include_cert=True)

    cert_tlv = b"\x28" + struct.pack("!H", len(der)) + der
    # The cert sub-TLV is the last thing in the SSL TLV, which is the last TLV: both lengths grow by its size.
    expected = (
        SIG
        + b"\x21\x11"
        + struct.pack("!H", 0x52 + len(cert_tlv))
        + without[16:-51]  # addresses, ALPN, AUTHORITY unchanged
        + b"\x20"
        + struct.pack("!H", 0x30 + len(cert_tlv))
        + without[-48:]  # client, verify, version, CN, cipher unchanged
        + cert_tlv
    )
    assert with_cert == expected


def test_include_cert_without_a_certificate_adds_nothing() -> None:
    no_der = dataclasses.replace(ALICE_TLS, client_cert_der=None)
    assert encode_v2(*ENDS, no_der, include_cert=True) == encode_v2(*ENDS, ALICE_TLS)


def test_anonymous_client_gets_ssl_flag_only_and_verify_zero() -> None:
    ssl_value = b"\x01" + b"\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.2" + b"\x23\x00\x1bECDHE-RSA-AES128-GCM-SHA256"
    expected = SIG + b"\x21\x11" + struct.pack("!H", 12 + 3 + len(ssl_value)) + IPV4_BLOCK + b"\x20"
    expected += struct.pack("!H", len(ssl_value)) + ssl_value
    assert encode_v2(*ENDS, ANONYMOUS_TLS, include_cert=True) == expected


def test_presented_but_unverified_certificate_sets_verify_nonzero() -> None:
    rejected = dataclasses.replace(BARE_TLS, client_cert_presented=True, client_cert_verified=False)
    assert encode_v2(*ENDS, rejected)[-8:] == b"\x20\x00\x05" + b"\x07" + b"\x00\x00\x00\x01"


@pytest.mark.parametrize("empty", [None, ""])
def test_empty_values_omit_their_tlvs(empty: str | None) -> None:
    tls = TLSInfo(empty, empty, empty, empty, False, False, empty, b"" if empty == "" else None)
    # No ALPN, no AUTHORITY, no sub-TLVs: just the 5-byte SSL header.
    expected = SIG + b"\x21\x11\x00\x14" + IPV4_BLOCK + b"\x20\x00\x05" + b"\x01\x00\x00\x00\x00"
    assert encode_v2(*ENDS, tls, include_cert=True) == expected


def test_non_ascii_cn_and_sni_are_utf8() -> None:
    tls = dataclasses.replace(BARE_TLS, sni="bücher.example", common_name="Zoë")
    header = encode_v2(*ENDS, tls)
    authority = b"\x02\x00\x0f" + b"b\xc3\xbccher.example"
    cn = b"\x22\x00\x04" + b"Zo\xc3\xab"
    assert header[16 + 12 :] == authority + b"\x20\x00\x0c" + b"\x01\x00\x00\x00\x00" + cn


# --- v2 size limits ----------------------------------------------------------------------------------------------
# With only a certificate, an IPv4 header holds 12 (addresses) + 3 (SSL TLV header) + 5 (client, verify) +
# 3 (sub-TLV header) + n bytes after the fixed 16, so n = 65535 - 23 = 65512 is the largest DER that fits.


def cert_only(size: int) -> TLSInfo:
    der = b"c" * size
    return dataclasses.replace(BARE_TLS, client_cert_presented=True, client_cert_verified=True, client_cert_der=der)


def test_largest_certificate_that_fits_fills_the_length_field() -> None:
    header = encode_v2(*ENDS, cert_only(65512), include_cert=True)
    assert header[14:16] == b"\xff\xff"
    assert len(header) == 16 + 0xFFFF
    assert header[28:31] == b"\x20" + struct.pack("!H", 65512 + 8)


def test_header_overflow_raises() -> None:
    with pytest.raises(ValueError, match=r"65536 bytes .* 16-bit length .* certificate alone is 65513 bytes"):
        encode_v2(*ENDS, cert_only(65513), include_cert=True)


def test_tlv_overflow_raises() -> None:
    with pytest.raises(ValueError, match=r"TLV 0x28 value is 65536 bytes"):
        encode_v2(*ENDS, cert_only(65536), include_cert=True)


def test_huge_certificate_is_fine_when_not_included() -> None:
    header = encode_v2(*ENDS, cert_only(100_000))
    assert header == SIG + b"\x21\x11\x00\x14" + IPV4_BLOCK + b"\x20\x00\x05\x07\x00\x00\x00\x00"


# --- v1 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "line"),
    [
        (("192.0.2.1", 51234), ("198.51.100.7", 8443), b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 8443\r\n"),
        (("2001:db8::1", 40000), ("2001:db8::ff", 443), b"PROXY TCP6 2001:db8::1 2001:db8::ff 40000 443\r\n"),
        (("192.0.2.1", 1000), ("2001:db8::1", 2000), b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 2000\r\n"),
        (("2001:db8::1", 1000), ("192.0.2.1", 2000), b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1000 2000\r\n"),
        (("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.9", 2), b"PROXY TCP4 192.0.2.1 192.0.2.9 1 2\r\n"),
        (("fe80::1%eth0", 0), ("::1", 65535), b"PROXY TCP6 fe80::1 ::1 0 65535\r\n"),  # zone id dropped
    ],
)
def test_v1_lines(source: tuple[str, int], destination: tuple[str, int], line: bytes) -> None:
    assert encode_v1(source, destination) == line


def test_v1_longest_line_is_the_104_bytes_section_2_1_allows_for_tcp6() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    line = encode_v1((full, 65535), (full, 65535))
    assert line == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104


# --- decoding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "source", "destination", "tls", "include_cert"),
    [
        ("TCP4", ("192.0.2.1", 51234), ("198.51.100.7", 8443), None, False),
        ("TCP6", ("2001:db8::1", 40000), ("2001:db8::ff", 443), ALICE_TLS, False),
        ("TCP4", ("192.0.2.1", 51234), ("198.51.100.7", 8443), ALICE_TLS, True),
        ("TCP6", ("::ffff:192.0.2.1", 1), ("2001:db8::1", 2), ANONYMOUS_TLS, True),
        ("TCP4", ("192.0.2.1", 0), ("192.0.2.2", 65535), dataclasses.replace(BARE_TLS, common_name="Zoë"), False),
    ],
)
def test_decode_round_trip(
    family: str, source: tuple[str, int], destination: tuple[str, int], tls: TLSInfo | None, include_cert: bool
) -> None:
    header = encode_v2(source, destination, tls, include_cert=include_cert)
    fields, length = decode_v2(header + b"GET / HTTP/1.1\r\n")  # the client's first bytes follow the header

    assert length == len(header)
    assert fields["command"] == "PROXY"
    assert fields["family"] == family
    assert (fields["source"], fields["destination"]) == (source, destination)
    if tls is None:
        assert fields["tlvs"] == []
        assert "ssl" not in fields
        return
    assert fields.get("alpn") == tls.alpn
    assert fields.get("authority") == tls.sni
    ssl = fields["ssl"]
    assert ssl["client"] == (0x07 if tls.client_cert_presented else 0x01)
    assert ssl["verify"] == 0
    assert ssl.get("version") == tls.version
    assert ssl.get("cn") == tls.common_name
    assert ssl.get("cipher") == tls.cipher
    assert ssl.get("client_cert") == (tls.client_cert_der if include_cert else None)


def test_decode_local_header() -> None:
    header = SIG + b"\x20\x00\x00\x00"  # version 2, LOCAL, AF_UNSPEC, nothing follows (a health check)
    assert decode_v2(header + b"rest") == ({"command": "LOCAL", "family": "UNSPEC", "tlvs": []}, 16)


def test_decode_keeps_unknown_tlvs_in_order() -> None:
    header = SIG + b"\x21\x11\x00\x13" + IPV4_BLOCK + b"\x04\x00\x00" + b"\xe0\x00\x01x"  # NOOP, then a custom type
    fields, _ = decode_v2(header)
    assert fields["tlvs"] == [(0x04, b""), (0xE0, b"x")]


HEADER = encode_v2(*ENDS, ALICE_TLS, include_cert=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\r\n", "bad signature"),
        (b"\r\n\r\n\x00\r\nQUIT!" + HEADER[12:], "bad signature"),
        (b"GET", "bad signature"),
        (SIG + b"\x11" + HEADER[13:], "version 1"),
        (SIG + b"\x22" + HEADER[13:], "unknown command 0x2"),
        (SIG + b"\x21\x31" + HEADER[14:], "unsupported family"),
        (SIG + b"\x21\x21\x00\x0c" + IPV4_BLOCK, "too short for the 36-byte address block"),
        (SIG + b"\x21\x11\x00\x0e" + IPV4_BLOCK + b"\x01\x00", "TLV header cut short"),
        (SIG + b"\x21\x11\x00\x10" + IPV4_BLOCK + b"\x02\x00\x05x", "claims 5 bytes, 1 remain"),
        (SIG + b"\x21\x11\x00\x13" + IPV4_BLOCK + b"\x20\x00\x04\x01\x00\x00\x00", "shorter than its 5-byte"),
        (SIG + b"\x21\x11\x00\x17" + IPV4_BLOCK + b"\x20\x00\x08\x01\x00\x00\x00\x00\x22\x00\x09", "claims 9"),
    ],
)
def test_decode_rejects_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        decode_v2(data)
    assert not isinstance(caught.value, TruncatedHeader)


@pytest.mark.parametrize("cut", [0, 5, 12, 15, 16, 27, len(HEADER) - 1])
def test_decode_reports_truncated_headers(cut: int) -> None:
    with pytest.raises(TruncatedHeader, match="truncated"):
        decode_v2(HEADER[:cut])
