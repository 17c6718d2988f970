"""proxy.protocol.http1: bytes in, bytes out. No sockets; identities built with cryptography (ECDSA P-256).

What reaches the backend is read back with an independent h11 server, so assertions are about the request the
backend would see, not about how the relay happened to serialise it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from urllib.parse import quote, unquote

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.policy.identity import PeerIdentity, identity_from_chain
from proxy.protocol.http1 import ERRORS, HttpRelay, Step, SwitchToRaw, render_error_response
from proxy.protocol.identity_headers import (
    ALWAYS_STRIPPED,
    MAX_HEADER_BYTES,
    HeaderPolicy,
    reduce_name,
    xfcc_element,
)

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2034, 1, 1, tzinfo=UTC)
CLIENT_IP = "203.0.113.7"
HASH_RE = re.compile(r"[0-9a-f]{64}")


# ---- identities ------------------------------------------------------------------------------------------------


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


CA_NAME = _name((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "Acme Clients CA"))
_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA = (
    x509.CertificateBuilder()
    .subject_name(CA_NAME)
    .issuer_name(CA_NAME)
    .public_key(_CA_KEY.public_key())
    .serial_number(1)
    .not_valid_before(NOT_BEFORE)
    .not_valid_after(NOT_AFTER)
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(_CA_KEY, hashes.SHA256())
)


def leaf_cert(subject: x509.Name, sans: list[x509.GeneralName] = (), serial: int = 0x1D2C3B4A) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(CA_NAME)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(_CA_KEY, hashes.SHA256())


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    return identity_from_chain([cert, _CA])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


ALICE = leaf_cert(
    _name((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "alice")),
    [
        x509.DNSName("alice.prod.svc"),
        x509.UniformResourceIdentifier("spiffe://acme/ns/prod/sa/alice"),
        x509.DNSName("alice.internal"),
    ],
)
ALICE_ID = identity_of(ALICE)


def relay(
    extra: dict[str, str] | None = None,
    identity: PeerIdentity | None = ALICE_ID,
    leaf_der: bytes | None = None,
    **policy: int,
) -> HttpRelay:
    return HttpRelay(HeaderPolicy(extra, **policy), client_ip=CLIENT_IP, identity=identity, leaf_der=leaf_der)


# ---- what the backend and the client see -----------------------------------------------------------------------


def backend_view(data: bytes) -> list[tuple[h11.Request, bytes, list[tuple[bytes, bytes]]]]:
    """Every complete request in `data`, parsed by an independent h11 server: (head, body, trailers)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    requests, head, body = [], None, b""
    while True:
        event = server.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return requests
        if isinstance(event, h11.Request):
            head, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            requests.append((head, body, list(event.headers.raw_items())))
            server.send(h11.Response(status_code=204, headers=[]))
            server.send(h11.EndOfMessage())
            if server.our_state is h11.DONE and server.their_state is h11.DONE:
                server.start_next_cycle()
        else:
            return requests


def only_request(data: bytes) -> h11.Request:
    requests = backend_view(data)
    assert len(requests) == 1, requests
    return requests[0][0]


def values(request: h11.Request, name: bytes) -> list[bytes]:
    return [value for n, value in request.headers if n == name.lower()]


def client_view(data: bytes, method: bytes = b"GET") -> list[h11.Event]:
    """The events a client parses from `data` after sending one request with `method`."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events = []
    while (event := client.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(event)
        if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    return events


def get(target: str = "/", *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: app.example", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ---- forged identity headers -----------------------------------------------------------------------------------

FORGED = [
    "x-forwarded-client-cert: Hash=forged1;Subject=\"CN=admin\"",
    "X-FORWARDED-CLIENT-CERT: Hash=forged2",
    "X-Forwarded-Client-Cert: Hash=forged3",
    "X-Forwarded-Client-Cert: Hash=forged4",
    "X_Forwarded_Client_Cert: Hash=forged5",
    "x.forwarded.client.cert: Hash=forged6",
    "x-client-dn: forged7",
    "X_CLIENT_DN: forged8",
    "X-Client-Verify: forged9",
    "x_client_verify: forged10",
    "X-Forwarded-For: 10.0.0.1",
    "x_forwarded_for: forged11",
    "X-FORWARDED-PROTO: http",
    "X-Forwarded_Proto: forged12",
    "Forwarded: for=10.0.0.2;proto=https",
    "X-Forwarded-Host: forged13.example",
    "X-Real-IP: 10.0.0.3",
    "Client-Cert: :forged14:",
]
FORGED_MARKERS = [b"forged", b"10.0.0.", b"CN=admin", b"proto=http"]
EXTRA = {"X-Client-DN": "subject", "X-Client-Verify": "verify"}


def test_forged_identity_headers_never_reach_the_backend_on_any_request_of_a_keep_alive_connection() -> None:
    r = relay(EXTRA)
    for n in range(3):
        step = r.from_client(get(f"/r{n}", *FORGED))
        assert step.requests == 1 and not step.close
        lowered = step.to_backend.lower()
        for marker in FORGED_MARKERS:
            assert marker.lower() not in lowered, (n, marker)
        request = only_request(step.to_backend)
        assert values(request, b"x-forwarded-client-cert") == [xfcc_element(ALICE_ID).encode()]
        assert values(request, b"x-forwarded-for") == [CLIENT_IP.encode()]
        assert values(request, b"x-forwarded-proto") == [b"https"]
        assert values(request, b"x-client-dn") == [b"CN=alice,O=Acme"]
        assert values(request, b"x-client-verify") == [b"SUCCESS"]
        for absent in (b"forwarded", b"x-forwarded-host", b"x-real-ip", b"client-cert"):
            assert values(request, absent) == []
        # No header the backend gets is a punctuation variant of one the proxy owns.
        owned = {reduce_name(name) for name in ("X-Forwarded-Client-Cert", "X-Forwarded-For", *EXTRA)}
        names = [name for name, _ in request.headers.raw_items()]
        assert sorted(reduce_name(name) for name in names if reduce_name(name) in owned) == sorted(owned)
        step = r.from_backend(OK)
        assert step.statuses == (200,) and not step.close
    assert r.requests == 3


def test_forged_headers_in_chunked_trailers_are_stripped_too() -> None:
    r = relay(EXTRA)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\nX_Forwarded_Client_Cert: forged\r\nx-client-dn: forged\r\nX-Checksum: 42\r\n\r\n"
    step = r.from_client(head + body)
    [(_request, data, trailers)] = backend_view(step.to_backend)
    assert data == b"abc"
    assert trailers == [(b"X-Checksum", b"42")]
    assert b"forged" not in step.to_backend


def test_a_connection_token_cannot_make_a_later_hop_drop_the_proxys_headers() -> None:
    r = relay()
    step = r.from_client(
        get("/", "Connection: X-Forwarded-Client-Cert, X-Forwarded-For, keep-alive, X-Secret, Host, Content-Length",
            "X-Secret: hop", "Keep-Alive: timeout=5", "Proxy-Connection: keep-alive", "TE: trailers")
    )
    request = only_request(step.to_backend)
    assert values(request, b"connection") == []  # keep-alive is the HTTP/1.1 default; no token names our headers
    for hop in (b"x-secret", b"keep-alive", b"proxy-connection", b"te"):
        assert values(request, hop) == []
    assert values(request, b"host") == [b"app.example"]  # framing headers are never removed by a token
    assert len(values(request, b"x-forwarded-client-cert")) == 1


def test_client_close_is_forwarded_as_the_only_connection_token() -> None:
    step = relay().from_client(get("/", "Connection: close, X-Foo", "X-Foo: 1"))
    request = only_request(step.to_backend)
    assert values(request, b"connection") == [b"close"]
    assert values(request, b"x-foo") == []


@pytest.mark.parametrize(
    "name",
    ["X-Forwarded-Client-Cert", "x-forwarded-client-cert", "X_FORWARDED_CLIENT_CERT", "x.forwarded.client.cert",
     "X-Forwarded_Client-Cert", "x~forwarded~client~cert", "Forwarded", "X_Forwarded_Host", "X-Client-DN",
     "x_client_dn"],
)
def test_stripping_rule_ignores_case_and_punctuation(name: str) -> None:
    assert HeaderPolicy({"X-Client-DN": "subject"}).is_stripped(name.encode())


@pytest.mark.parametrize("name", ["Host", "Authorization", "X-Forwarded-Client-Certs", "X-Client", "Cookie"])
def test_stripping_rule_keeps_other_headers(name: str) -> None:
    assert not HeaderPolicy({"X-Client-DN": "subject"}).is_stripped(name.encode())


def test_always_stripped_family_is_documented_and_removed() -> None:
    r = relay()
    forged = [f"{name}: forged" for name in ALWAYS_STRIPPED]
    step = r.from_client(get("/", *forged))
    assert b"forged" not in step.to_backend
    only_request(step.to_backend)


# ---- XFCC formatting -------------------------------------------------------------------------------------------


def test_xfcc_element_has_envoys_keys_in_envoys_order() -> None:
    assert xfcc_element(ALICE_ID) == (
        f"Hash={ALICE_ID.sha256};"
        'Subject="CN=alice,O=Acme";'
        "URI=spiffe://acme/ns/prod/sa/alice;"
        "DNS=alice.prod.svc;DNS=alice.internal"
    )
    assert HASH_RE.fullmatch(ALICE_ID.sha256)


def test_xfcc_repeats_uri_and_dns_per_san_in_certificate_order_and_omits_absent_ones() -> None:
    two_uris = identity_of(
        leaf_cert(
            _name((NameOID.COMMON_NAME, "svc")),
            [x509.UniformResourceIdentifier("spiffe://b/x"), x509.UniformResourceIdentifier("spiffe://a/y")],
        )
    )
    assert xfcc_element(two_uris).endswith(';Subject="CN=svc";URI=spiffe://b/x;URI=spiffe://a/y')
    bare = identity_of(leaf_cert(_name((NameOID.COMMON_NAME, "bare"))))
    assert xfcc_element(bare) == f'Hash={bare.sha256};Subject="CN=bare"'


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://acme/ns/prod", "URI=spiffe://acme/ns/prod"),
        ("https://a.example/p?x=1", 'URI="https://a.example/p?x=1"'),  # =
        ("urn:a;b", 'URI="urn:a;b"'),  # ;
        ("urn:a,b", 'URI="urn:a,b"'),  # ,
        ('urn:a"b', 'URI="urn:a\\"b"'),  # " is escaped
        ('urn:x";URI=spiffe://admin', 'URI="urn:x\\";URI=spiffe://admin"'),
        ("urn:back\\slash", "URI=urn:back\\5Cslash"),  # \ is hex-escaped, never left before a "
    ],
)
def test_xfcc_uri_quoting(uri: str, expected: str) -> None:
    identity = identity_of(leaf_cert(_name((NameOID.COMMON_NAME, "q")), [x509.UniformResourceIdentifier(uri)]))
    assert xfcc_element(identity) == f'Hash={identity.sha256};Subject="CN=q";{expected}'


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (_name((NameOID.ORGANIZATION_NAME, "Acme, Inc."), (NameOID.COMMON_NAME, "bob")),
         'Subject="CN=bob,O=Acme\\, Inc."'),
        (_name((NameOID.COMMON_NAME, 'say "hi"')), 'Subject="CN=say \\"hi\\""'),  # RFC 4514's \" kept, not doubled
        (_name((NameOID.COMMON_NAME, 'x";URI=spiffe://admin')), 'Subject="CN=x\\"\\;URI=spiffe://admin"'),
        (_name((NameOID.COMMON_NAME, "a=b")), 'Subject="CN=a=b"'),
        (_name((NameOID.COMMON_NAME, "back\\slash")), 'Subject="CN=back\\\\slash"'),
        (_name((NameOID.COMMON_NAME, "Zoë")), 'Subject="CN=Zo\\C3\\AB"'),  # non-ASCII as RFC 4514 hex pairs
        (_name((NameOID.COMMON_NAME, "two\nlines")), 'Subject="CN=two\\0Alines"'),  # never a header break
        (_name((NameOID.COMMON_NAME, "trailing ")), 'Subject="CN=trailing\\20"'),
    ],
)
def test_xfcc_subject_is_always_quoted_rfc4514(subject: x509.Name, expected: str) -> None:
    identity = identity_of(leaf_cert(subject))
    assert xfcc_element(identity) == f"Hash={identity.sha256};{expected}"


def parse_xfcc(element: str) -> list[tuple[str, str]]:
    """A strict RFC 9110 reader: `\\` escapes the next character inside quotes; `;` separates pairs outside them."""
    pairs, i = [], 0
    while i < len(element):
        key_end = element.index("=", i)
        key, i, value = element[i:key_end], key_end + 1, ""
        if i < len(element) and element[i] == '"':
            i += 1
            while element[i] != '"':
                if element[i] == "\\":
                    i += 1
                value += element[i]
                i += 1
            i += 1
        else:
            while i < len(element) and element[i] != ";":
                value += element[i]
                i += 1
        pairs.append((key, value))
        assert i == len(element) or element[i] == ";", element
        i += 1
    return pairs


@pytest.mark.parametrize(
    "cn",
    ['x";URI=spiffe://admin;x="', "a\\", "a\\\";DNS=evil", 'q"', "\\\"\\\\\";;,="],
)
def test_hostile_values_cannot_add_xfcc_keys_for_a_strict_parser(cn: str) -> None:
    identity = identity_of(
        leaf_cert(
            _name((NameOID.COMMON_NAME, cn)),
            [x509.UniformResourceIdentifier(f'urn:{cn}'), x509.DNSName("ok.example")],
        )
    )
    pairs = parse_xfcc(xfcc_element(identity))
    assert [key for key, _ in pairs] == ["Hash", "Subject", "URI", "DNS"]
    assert pairs[3] == ("DNS", "ok.example")


def test_quoted_subject_unescapes_to_the_rfc4514_subject() -> None:
    identity = identity_of(leaf_cert(_name((NameOID.COMMON_NAME, 'a"b'), (NameOID.COMMON_NAME, "c,d"))))
    [_, (key, value)] = parse_xfcc(xfcc_element(identity))
    # A strict reader removes one level of backslashes; Envoy-style readers (only \" is special) keep the DN as is.
    assert key == "Subject" and value == identity.subject.replace('\\"', '"').replace("\\,", ",")


def test_anonymous_client_gets_no_xfcc_and_verify_none() -> None:
    r = relay({"X-Client-DN": "subject", "X-Client-Verify": "verify", "X-Client-URIs": "uri_sans"}, identity=None)
    step = r.from_client(get("/", "X-Forwarded-Client-Cert: Hash=forged"))
    request = only_request(step.to_backend)
    assert values(request, b"x-forwarded-client-cert") == []
    assert values(request, b"x-client-dn") == []  # empty value: no header, as nginx does
    assert values(request, b"x-client-uris") == []
    assert values(request, b"x-client-verify") == [b"NONE"]
    assert values(request, b"x-forwarded-for") == [CLIENT_IP.encode()]
    assert b"forged" not in step.to_backend


# ---- configured extra headers ----------------------------------------------------------------------------------

ALL_VARIABLES = {
    "X-Client-Subject": "subject",
    "X-Client-Issuer": "issuer",
    "X-Client-CN": "common_name",
    "X-Client-Serial": "serial",
    "X-Client-Fingerprint": "fingerprint_sha256",
    "X-Client-URIs": "uri_sans",
    "X-Client-DNS": "dns_sans",
    "X-Client-Not-After": "not_after",
    "X-Client-Verify": "verify",
    "X-Client-Cert": "cert_pem_urlencoded",
}


def test_every_variable() -> None:
    r = relay(ALL_VARIABLES, leaf_der=der(ALICE))
    request = only_request(r.from_client(get()).to_backend)
    got = {name: values(request, name.lower().encode()) for name in ALL_VARIABLES}
    pem = ALICE.public_bytes(serialization.Encoding.PEM).decode()
    assert got == {
        "X-Client-Subject": [b"CN=alice,O=Acme"],
        "X-Client-Issuer": [b"CN=Acme Clients CA,O=Acme"],
        "X-Client-CN": [b"alice"],
        "X-Client-Serial": [b"1d2c3b4a"],
        "X-Client-Fingerprint": [ALICE_ID.sha256.encode()],
        "X-Client-URIs": [b"spiffe://acme/ns/prod/sa/alice"],
        "X-Client-DNS": [b"alice.prod.svc,alice.internal"],
        "X-Client-Not-After": [b"2034-01-01T00:00:00+00:00"],
        "X-Client-Verify": [b"SUCCESS"],
        "X-Client-Cert": [quote(pem, safe="").encode()],
    }
    assert unquote(got["X-Client-Cert"][0].decode()) == pem
    assert got["X-Client-Cert"][0].startswith(b"-----BEGIN%20CERTIFICATE-----%0A")


def test_configured_names_are_sent_with_the_configured_spelling() -> None:
    step = relay({"x-SSL-client-S-DN": "subject"}).from_client(get())
    assert b"\r\nx-SSL-client-S-DN: CN=alice,O=Acme\r\n" in step.to_backend


def test_odd_identity_text_is_escaped_into_valid_header_values() -> None:
    odd = leaf_cert(
        _name((NameOID.COMMON_NAME, " Zoë\r\nX-Injected: 1 ")),
        [x509.DNSName("a.example"), x509.UniformResourceIdentifier("urn:a\x7fb\tc")],
    )
    r = relay({"X-CN": "common_name", "X-DN": "subject", "X-URI": "uri_sans"}, identity=identity_of(odd))
    request = only_request(r.from_client(get()).to_backend)
    assert values(request, b"x-cn") == [b"\\20Zo\\C3\\AB\\0D\\0AX-Injected: 1\\20"]
    assert values(request, b"x-dn") == [b"CN=\\ Zo\\C3\\AB\\0D\\0AX-Injected: 1\\20"]
    assert values(request, b"x-uri") == [b"urn:a\\7Fb\\09c"]
    assert values(request, b"x-injected") == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"X Client": "subject"}, "not a valid HTTP field name"),
        ({"": "subject"}, "not a valid HTTP field name"),
        ({"X-Client-DN": "subjekt"}, "unknown variable 'subjekt'; choose one of subject, issuer"),
        ({"x-forwarded-client-cert": "subject"}, "proxy's own X-Forwarded-Client-Cert"),
        ({"X_Forwarded_For": "subject"}, "proxy's own X-Forwarded-For"),
        ({"Host": "subject"}, "would replace host"),
        ({"Content_Length": "serial"}, "would replace content-length"),
        ({"Connection": "verify"}, "would replace connection"),
        ({"X-Client-DN": "subject", "x_client_dn": "issuer"}, "'X-Client-DN' and 'x_client_dn' are the same header"),
    ],
)
def test_policy_rejects_bad_config_at_construction(extra: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        HeaderPolicy(extra)


def test_relay_checks_its_inputs() -> None:
    policy = HeaderPolicy({"X-Client-Cert": "cert_pem_urlencoded"})
    assert policy.needs_leaf_der
    without_der = HttpRelay(policy, client_ip=CLIENT_IP, identity=ALICE_ID)
    assert values(only_request(without_der.from_client(get()).to_backend), b"x-client-cert") == []
    other = leaf_cert(_name((NameOID.COMMON_NAME, "mallory")))
    with pytest.raises(ValueError, match="not the certificate of this identity"):
        HttpRelay(policy, client_ip=CLIENT_IP, identity=ALICE_ID, leaf_der=der(other))
    with pytest.raises(ValueError):
        HttpRelay(HeaderPolicy(), client_ip="10.0.0.1\r\nX: y", identity=None)
    HttpRelay(policy, client_ip="2001:db8::1", identity=None)  # anonymous: no DER needed


# ---- bodies stream through -------------------------------------------------------------------------------------


def test_content_length_body_streams_in_pieces() -> None:
    r = relay()
    step = r.from_client(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 30000\r\n\r\n" + b"a" * 1000)
    sent = bytearray(step.to_backend)
    assert b"a" * 1000 in step.to_backend
    for piece in (b"b" * 9000, b"c" * 20000):
        step = r.from_client(piece)
        assert step.to_backend == piece  # forwarded as it comes, nothing held back
        sent += step.to_backend
    [(request, body, _)] = backend_view(bytes(sent))
    assert values(request, b"content-length") == [b"30000"]
    assert body == b"a" * 1000 + b"b" * 9000 + b"c" * 20000


def test_chunked_body_streams_in_pieces() -> None:
    r = relay()
    sent = bytearray(r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").to_backend)
    pieces = [b"5\r\nhel", b"lo\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
    for piece in pieces:
        step = r.from_client(piece)
        assert len(step.to_backend) < 32
        sent += step.to_backend
    [(request, body, _)] = backend_view(bytes(sent))
    assert values(request, b"transfer-encoding") == [b"chunked"]
    assert body == b"hello world"


def test_response_body_streams_back_in_pieces_unchanged() -> None:
    r = relay()
    r.from_client(get())
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/x-odd\r\nX-Backend: 1\r\nContent-Length: 10\r\n\r\n"
    step = r.from_backend(head + b"01234")
    assert step.to_client == head + b"01234"
    assert step.statuses == (200,)
    step = r.from_backend(b"56789")
    assert step.to_client == b"56789" and step.statuses == () and not step.close


def test_chunked_response_is_relayed_with_its_trailers() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"
    )
    events = client_view(step.to_client)
    assert [type(e) for e in events] == [h11.Response, h11.Data, h11.EndOfMessage]
    assert events[1].data == b"abc" and list(events[2].headers) == [(b"x-sum", b"9")]


def test_head_response_has_no_body() -> None:
    r = relay()
    r.from_client(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    step = r.from_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert step.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" and not step.close
    assert r.from_client(get()).requests == 1  # the cycle ended without any body bytes


# ---- keep-alive, pipelining ------------------------------------------------------------------------------------


def test_pipelined_pair_is_processed_in_order() -> None:
    r = relay()
    step = r.from_client(get("/first") + get("/second"))
    assert [req.target for req, _, _ in backend_view(step.to_backend)] == [b"/first"]
    assert step.requests == 1
    assert r.client_paused  # the second request waits; the driver stops reading the client
    step = r.from_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    # The end of the first response releases the second request, in the same step.
    assert step.to_client.endswith(b"first") and step.statuses == (200,)
    request = only_request(step.to_backend)
    assert request.target == b"/second" and values(request, b"x-forwarded-for") == [CLIENT_IP.encode()]
    assert step.requests == 1 and not r.client_paused
    step = r.from_backend(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert step.statuses == (404,) and step.to_backend == b""
    assert r.requests == 2


def test_pipelined_body_split_across_the_pause_arrives_whole_and_in_order() -> None:
    r = relay()
    post = b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    first = r.from_client(get("/first") + post + b"01234")
    assert r.client_paused and b"/second" not in first.to_backend
    released = r.from_backend(OK)
    assert not r.client_paused and released.requests == 1
    rest = r.from_client(b"56789")
    requests = backend_view(first.to_backend + released.to_backend + rest.to_backend)
    assert [(req.target, body) for req, body, _ in requests] == [(b"/first", b""), (b"/second", b"0123456789")]


def test_pipelined_request_after_a_malformed_one_is_never_forwarded() -> None:
    r = relay()
    step = r.from_client(get("/ok") + b"NOT HTTP\r\n\r\n")
    step = r.from_backend(OK)
    assert step.to_client.startswith(OK) and step.to_client[len(OK):] == render_error_response(400)
    assert step.close and step.error == "bad_request" and step.statuses == (200, 400)


def test_client_eof_between_requests_closes() -> None:
    r = relay()
    r.from_client(get())
    r.from_backend(OK)
    assert r.from_client(b"") == Step(close=True)
    assert r.closed


def test_client_half_close_after_a_complete_request_still_gets_the_response() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_client(b"")
    assert step == Step()
    step = r.from_backend(OK)
    assert step.to_client.startswith(b"HTTP/1.1 200 OK\r\n") and step.close


def test_backend_closing_after_its_response_closes_the_client_connection_too() -> None:
    r = relay()
    r.from_client(get())
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    step = r.from_backend(response)
    assert step.to_client == response  # unchanged, one Connection header
    assert step.close and step.error is None


def test_backend_http10_response_closes_with_a_single_connection_header() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(b"HTTP/1.0 200 OK\r\nConnection: keep-alive, X-Hop\r\nContent-Length: 2\r\n\r\nok")
    assert step.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-hop, close\r\n\r\nok"
    assert step.close


def test_close_delimited_backend_response_is_rechunked_for_the_client() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(b"HTTP/1.0 200 OK\r\n\r\nsome")
    assert b"Transfer-Encoding: chunked" in step.to_client and not step.close
    step = r.from_backend(b"")
    assert step.close and step.to_client == b"0\r\n\r\n"


def test_http10_client_gets_no_1xx_and_a_dechunked_body() -> None:
    r = relay()
    step = r.from_client(b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
    request = only_request(step.to_backend)
    assert values(request, b"connection") == [b"close"]
    step = r.from_backend(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    assert step.to_client.startswith(b"HTTP/1.1 200 OK\r\n")  # no 1xx for an HTTP/1.0 client
    assert b"Transfer-Encoding" not in step.to_client and step.to_client.endswith(b"\r\n\r\nhi")
    assert step.close


def test_early_response_while_the_body_is_still_coming_ends_the_connection() -> None:
    r = relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
    step = r.from_backend(b"HTTP/1.1 413 Payload Too Large\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert step.to_client.count(b"Connection") == 1 and b"\r\nConnection: close\r\n" in step.to_client
    assert step.statuses == (413,) and step.close


# ---- 100-continue ----------------------------------------------------------------------------------------------


def test_expect_100_continue_is_forwarded_and_the_backends_100_relayed() -> None:
    r = relay()
    step = r.from_client(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert values(backend_view(step.to_backend + b"data")[0][0], b"expect") == [b"100-continue"]
    step = r.from_backend(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert step.to_client == b"HTTP/1.1 100 Continue\r\n\r\n" and step.statuses == ()
    step = r.from_client(b"data")
    assert step.to_backend == b"data"
    step = r.from_backend(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert step.statuses == (201,) and not step.close


def test_final_answer_instead_of_100_closes_after_it() -> None:
    r = relay()
    r.from_client(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    step = r.from_backend(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    assert step.statuses == (417,) and step.close


# ---- Upgrade ---------------------------------------------------------------------------------------------------

WS_REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
WS_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def test_upgrade_hands_over_to_raw_bytes_with_both_leftovers() -> None:
    r = relay()
    step = r.from_client(WS_REQUEST + b"\x81\x05early")
    request = only_request(step.to_backend)
    assert values(request, b"upgrade") == [b"websocket"]
    assert values(request, b"connection") == [b"upgrade"]
    assert values(request, b"x-forwarded-client-cert") == [xfcc_element(ALICE_ID).encode()]
    assert b"early" not in step.to_backend  # not HTTP: held until the backend agrees to switch
    step = r.from_backend(WS_101 + b"\x81\x02hi")
    assert step.to_client.startswith(b"HTTP/1.1 101 ") and b"\r\nUpgrade: websocket\r\n" in step.to_client
    assert step.to_client.endswith(b"\r\n\r\n")
    assert step.switch == SwitchToRaw(client_leftover=b"\x81\x05early", backend_leftover=b"\x81\x02hi")
    assert step.statuses == (101,) and not step.close
    assert r.switched and not r.client_paused
    # A read that was already in flight when the switch happened passes through untouched.
    assert r.from_client(b"\x81\x03raw") == Step(to_backend=b"\x81\x03raw")
    assert r.from_backend(b"\x81\x03raw") == Step(to_client=b"\x81\x03raw")


def test_refused_upgrade_keeps_the_connection_in_http() -> None:
    r = relay()
    r.from_client(WS_REQUEST)
    step = r.from_backend(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert step.switch is None and step.statuses == (426,) and not step.close
    assert r.from_client(get()).requests == 1


def test_upgrade_needs_the_connection_token() -> None:
    step = relay().from_client(get("/", "Upgrade: websocket"))
    request = only_request(step.to_backend)
    assert values(request, b"upgrade") == [] and values(request, b"connection") == []


def test_unsolicited_101_is_refused() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(WS_101)
    assert step.to_client == render_error_response(502) and step.close and step.error == "upgrade_refused"
    assert step.switch is None and not r.switched


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
        (b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n", 405, "connect_not_allowed"),
    ],
)
def test_bad_requests_are_answered_and_closed(data: bytes, status: int, error: str) -> None:
    r = relay()
    step = r.from_client(data)
    assert step.to_backend == b""
    assert step.to_client == render_error_response(status)
    assert step.close and step.error == error and step.statuses == (status,)
    assert error in ERRORS
    assert r.from_client(get()) == Step(close=True)  # nothing more is processed


def test_malformed_chunk_after_the_head_was_forwarded() -> None:
    r = relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    step = r.from_client(b"zz\r\n")
    assert step.to_client == render_error_response(400) and step.close


def test_oversized_header_block_arriving_in_pieces_is_431() -> None:
    r = relay()
    assert r.from_client(b"GET / HTTP/1.1\r\nHost: a\r\n") == Step()
    step = Step()
    for _ in range(40):
        step = r.from_client(b"X-Big: " + b"b" * 1000 + b"\r\n")
        if step.close:
            break
    assert step.to_client == render_error_response(431) and step.error == "headers_too_large"
    assert step.to_backend == b""


def test_oversized_header_block_arriving_at_once_is_431() -> None:
    r = relay(max_header_bytes=4096)
    step = r.from_client(get("/", "X-Big: " + "b" * 5000))
    assert step.to_client == render_error_response(431) and step.to_backend == b"" and step.close


def test_header_block_under_the_limit_passes() -> None:
    step = relay().from_client(get("/", "X-Big: " + "b" * (MAX_HEADER_BYTES - 500)))
    assert step.requests == 1


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 abc\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
)
def test_malformed_backend_response_is_502(response: bytes) -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(response)
    assert step.to_client == render_error_response(502) and step.close and step.error == "bad_response"
    assert step.statuses == (502,)


def test_backend_eof_before_the_response_is_502() -> None:
    r = relay()
    r.from_client(get())
    step = r.from_backend(b"")
    assert step.to_client == render_error_response(502) and step.close


def test_backend_eof_mid_body_only_closes() -> None:
    r = relay()
    r.from_client(get())
    r.from_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    step = r.from_backend(b"")
    assert step.to_client == b"" and step.close and step.error == "bad_response"


def test_backend_closing_an_idle_connection_closes_without_a_response() -> None:
    r = relay()
    r.from_client(get())
    r.from_backend(OK)
    step = r.from_backend(b"")
    assert step == Step(close=True, error="backend_closed")


def test_backend_response_without_a_request_is_rejected() -> None:
    step = relay().from_backend(OK)
    assert step.close and step.error == "bad_response"


# ---- error responses rendered for the driver -------------------------------------------------------------------


def test_render_error_response_exact_bytes() -> None:
    assert render_error_response(502) == (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 16\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"502 Bad Gateway\n"
    )
    assert render_error_response(504, head=True) == (
        b"HTTP/1.1 504 Gateway Timeout\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 20\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    [response, data, _end] = client_view(render_error_response(431))
    assert response.status_code == 431 and data.data == b"431 Request Header Fields Too Large\n"


@pytest.mark.parametrize(("status", "error"), [(502, "backend_unreachable"), (504, "backend_timeout")])
def test_fail_answers_a_waiting_request(status: int, error: str) -> None:
    r = relay()
    r.from_client(get())
    step = r.fail(status)
    assert step.to_client == render_error_response(status)
    assert step.close and step.error == error and step.statuses == (status,)


def test_fail_omits_the_body_for_head() -> None:
    r = relay()
    r.from_client(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert r.fail(502).to_client == render_error_response(502, head=True)


def test_fail_after_the_response_head_only_closes() -> None:
    r = relay()
    r.from_client(get())
    r.from_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert r.fail(502) == Step(close=True, error="backend_unreachable")


def test_fail_after_a_switch_only_closes() -> None:
    r = relay()
    r.from_client(WS_REQUEST)
    r.from_backend(WS_101)
    assert r.fail(502).to_client == b""


# ---- counters for metrics --------------------------------------------------------------------------------------


def test_requests_and_statuses_are_counted_per_step_and_per_connection() -> None:
    r = relay()
    statuses: list[int] = []
    requests = 0
    for status in (200, 304, 500):
        step = r.from_client(get())
        requests += step.requests
        step = r.from_backend(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        statuses += step.statuses
    step = r.from_client(b"BAD\r\n\r\n")
    statuses += step.statuses
    assert statuses == [200, 304, 500, 400]
    assert requests == r.requests == 3


# ---- Upgrade allow-list: no tunnel the proxy did not agree to ----------------------------------------------------

H2C_REQUEST = (
    b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    b"X-Forwarded-Client-Cert: Hash=FORGED;Subject=\"CN=admin\"\r\nX-Client-Verify: SUCCESS\r\n"
    b"X-Forwarded-For: 10.6.6.6\r\n\r\n"
)


def upgrade_relay(upgrades: tuple[str, ...] = ("websocket",)) -> HttpRelay:
    policy = HeaderPolicy({"X-Client-Verify": "verify"}, upgrades=upgrades)
    return HttpRelay(policy, client_ip=CLIENT_IP, identity=None)


def test_h2c_upgrade_request_goes_on_as_a_plain_request_without_its_settings() -> None:
    r = upgrade_relay()
    step = r.from_client(H2C_REQUEST)
    request = only_request(step.to_backend)
    assert values(request, b"upgrade") == [] and values(request, b"connection") == []
    assert values(request, b"http2-settings") == []
    assert values(request, b"x-forwarded-client-cert") == []
    assert values(request, b"x-client-verify") == [b"NONE"]
    assert values(request, b"x-forwarded-for") == [CLIENT_IP.encode()]
    # The backend answers it as the plain request it got, and the connection stays HTTP.
    step = r.from_backend(OK)
    assert step.statuses == (200,) and step.switch is None and not step.close
    assert r.from_client(get()).requests == 1


@pytest.mark.parametrize(
    ("upgrade_lines", "forwarded"),
    [
        ([b"websocket"], [b"websocket"]),
        ([b"WebSocket/13"], [b"WebSocket/13"]),  # case and version do not count
        ([b"h2c, websocket"], [b"websocket"]),
        ([b"H2C/2, websocket , foo"], [b"websocket"]),
        ([b"h2c", b"websocket"], [b"websocket"]),  # several Upgrade lines
        ([b"h2c"], []),
        ([b"h2c/1.0, foo/2"], []),
        ([b"websocketx, web"], []),  # names are compared whole
    ],
)
def test_only_allow_listed_upgrade_protocols_reach_the_backend(
    upgrade_lines: list[bytes], forwarded: list[bytes]
) -> None:
    lines = b"".join(b"Upgrade: %s\r\n" % line for line in upgrade_lines)
    step = upgrade_relay().from_client(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n" + lines + b"\r\n")
    request = only_request(step.to_backend)
    assert values(request, b"upgrade") == ([b", ".join(forwarded)] if forwarded else [])
    assert values(request, b"connection") == ([b"upgrade"] if forwarded else [])


def test_http2_settings_never_reaches_the_backend_even_without_upgrade() -> None:
    step = upgrade_relay().from_client(get("/", "HTTP2-Settings: AAMAAABk"))
    assert values(only_request(step.to_backend), b"http2-settings") == []


def test_the_configured_upgrades_replace_the_default() -> None:
    r = upgrade_relay(("echo",))
    step = r.from_client(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket, Echo/2\r\n\r\n")
    assert values(only_request(step.to_backend), b"upgrade") == [b"Echo/2"]
    step = r.from_backend(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ECHO\r\nConnection: upgrade\r\n\r\n")
    assert step.switch is not None and step.statuses == (101,)


@pytest.mark.parametrize(
    ("request_bytes", "response"),
    [
        (H2C_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
        (WS_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
        (WS_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n"),
        (WS_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n"),  # switched to what?
    ],
    ids=["h2c-requested", "h2c-instead-of-websocket", "h2c-on-top-of-websocket", "no-upgrade-header"],
)
def test_101_to_a_protocol_not_both_offered_and_allowed_is_502_and_no_tunnel(
    request_bytes: bytes, response: bytes
) -> None:
    r = upgrade_relay()
    r.from_client(request_bytes)
    step = r.from_backend(response + b"\x00\x00\x12\x04raw h2 frames")
    assert step.to_client == render_error_response(502)
    assert step.close and step.switch is None and not r.switched
    assert step.error == "upgrade_refused" and step.error in ERRORS and step.statuses == (502,)
    assert r.from_client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == Step(close=True)  # nothing more passes


@pytest.mark.parametrize(
    ("upgrades", "message"),
    [(("h2c",), "h2c"), (("H2C", "websocket"), "h2c"), (("websocket/13",), "protocol name"), (("a b",), "a b"),
     ("websocket", "list")],
)
def test_policy_refuses_upgrades_it_cannot_keep_safe(upgrades: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HeaderPolicy(upgrades=upgrades)


# ---- HTTP/1 framing that a backend could read differently: 400 and close ----------------------------------------


def assert_refused_with_400(step: Step) -> None:
    assert step.to_client == render_error_response(400)
    assert step.close and step.error == "bad_request" and step.statuses == (400,)


def test_transfer_encoding_in_an_http10_request_is_400() -> None:
    r = relay()
    step = r.from_client(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert_refused_with_400(step)
    assert step.to_backend == b"" and "HTTP/1.0" in step.detail


def test_http10_request_without_host_is_400() -> None:
    step = relay().from_client(b"GET /old HTTP/1.0\r\n\r\n")
    assert_refused_with_400(step)
    assert step.to_backend == b"" and "Host" in step.detail


@pytest.mark.parametrize("size", [b"10000000000000000", b"F" * 20], ids=["2^64", "h11-max"])
def test_chunk_size_over_64_bits_is_400(size: bytes) -> None:
    # With the head: nothing of the request reaches the backend.
    step = relay().from_client(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nabc" % size)
    assert_refused_with_400(step)
    assert step.to_backend == b""
    # After the head went on: the bad chunk line itself is not forwarded.
    r = relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    step = r.from_client(size + b"\r\nabc")
    assert_refused_with_400(step)
    assert step.to_backend == b""


def test_largest_64_bit_chunk_size_still_streams() -> None:
    r = relay()
    step = r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc")
    assert step.to_backend.endswith(b"3\r\nabc\r\n") and not step.close


def test_chunked_request_body_split_anywhere_still_passes_the_strict_check() -> None:
    body = b"5;ext=1\r\nhello\r\n1F\r\n" + b"z" * 31 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire = head + body + get("/next")
    for split in range(len(head) - 2, len(wire)):
        r = relay()
        first = r.from_client(wire[:split])
        second = r.from_client(wire[split:])
        assert not first.close and not second.close, split
        requests = backend_view(first.to_backend + second.to_backend)
        assert requests[0][1] == b"hello" + b"z" * 31 and requests[0][2] == [(b"X-Sum", b"1")], split
        assert r.from_backend(OK).requests == 1, split  # the pipelined request follows


def test_content_length_over_18_digits_is_400() -> None:
    step = relay().from_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551621\r\n\r\nabc")
    assert_refused_with_400(step)
    assert step.to_backend == b""
    ok = relay().from_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999999999\r\n\r\nabc")
    assert not ok.close and ok.requests == 1
