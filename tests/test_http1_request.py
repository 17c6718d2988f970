"""proxy.protocol.http1_request: the common request head read without h11, checked against h11 itself.

The reader may only ever accept what h11 accepts, and read it the same way (see the module's docstring): the
property tests generate heads that are mostly right and sometimes subtly wrong, and compare the two parsers on each.
The relay tests then show that the relay's output is the same byte for byte whichever parser read the request.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import http1
from proxy.protocol.http1 import HeaderPolicy, HttpRelay
from proxy.protocol.http1_request import PlainRequest, read_plain_request

LIMIT = 16 * 1024
WRK = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"


def h11_reading(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], int] | None:
    """What h11 makes of a bodiless request at the start of `data`: method, target, raw fields, head size."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    parser.receive_data(data)
    try:
        request = parser.next_event()
        if not isinstance(request, h11.Request):
            return None
        end = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(end, h11.EndOfMessage):
        return None  # a body follows: not a request the reader may take
    size = len(data) - len(parser.trailing_data[0])
    return request.method, request.target, list(request.headers.raw_items()), size


# ---- the common shape ---------------------------------------------------------------------------------------------


def test_reads_what_wrk_sends_and_leaves_the_next_request():
    plain = read_plain_request(WRK + b"GET /next", LIMIT)
    assert plain == PlainRequest(b"GET", b"/", [(b"Host", b"127.0.0.1:8443")], len(WRK))


def test_keeps_the_spelling_of_names_and_trims_the_blanks_around_values():
    data = b"DELETE /a?b=c HTTP/1.1\r\nhOsT:x\r\nX-Thing: \t a  b \t\r\n\r\n"
    plain = read_plain_request(data, LIMIT)
    assert plain is not None
    assert plain.headers == [(b"hOsT", b"x"), (b"X-Thing", b"a  b")]
    assert h11_reading(data) == (plain.method, plain.target, [(b"hOsT", b"x"), (b"X-Thing", b"a  b")], plain.size)


@pytest.mark.parametrize("data", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n", id="incomplete"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", id="http-1.0"),
    pytest.param(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", id="connect"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", id="content-length"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="chunked"),
    pytest.param(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", id="no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\r\n\r\n", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", id="bare-cr"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", id="leading-blank-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", id="blank-before-colon"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", id="two-spaces"),
    pytest.param(b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", id="control-in-target"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * LIMIT + b"\r\n\r\n", id="over-the-limit"),
])
def test_anything_unusual_goes_to_h11(data):
    assert read_plain_request(data, LIMIT) is None


# ---- the subset, checked against h11 ------------------------------------------------------------------------------

# Each piece of a head from a pool of right choices and a pool of wrong ones (wrong for h11, for the reader, or for
# both). A generated head is right throughout, or wrong in exactly one piece: wrong everywhere, nearly every head
# would be refused by both parsers at once and the comparison would say little.
PIECES: dict[str, tuple[list[bytes], list[bytes]]] = {
    "method": ([b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"PURGE"], [b"get", b"CONNECT", b"G T", b"", b"GET\x00"]),
    "target": ([b"/", b"/a?b=c", b"*", b"http://x/y", b"/%00"], [b"/\x80", b"/ a", b"", b"/\x7f"]),
    "version": ([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2", b"http/1.1", b"HTTP/1.1 "]),
    "name": ([b"X-A", b"Accept", b"Connection", b"Upgrade", b"X-Forwarded-Client-Cert", b"x-client-subject"],
             [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"X A", b"", b"X:Y", b"X\x00", b" X"]),
    "value": ([b"a", b" a ", b"\ta\t", b"\x80", b"a, b", b"0", b"chunked", b"close", b"keep-alive", b"upgrade", b""],
              [b"a\x7f", b"\x00", b"a\rb", b"a\nb", b"a\r\n b"]),
    "line end": ([b"\r\n"], [b"\n", b"\r", b"\r\n ", b"\r\n\t"]),
    "after": ([b"", WRK, b"GET /x HTTP/1.1\r\n", b"body?"], [b"\r\n", b"\n"]),
}


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    fields = draw(st.integers(0, 4))
    host_at = draw(st.integers(0, fields))
    kinds = ["method", "target", "version", "line end"]
    for _ in range(fields + 1):
        kinds += ["name", "value", "line end"]
    kinds += ["line end", "after"]
    wrong = draw(st.sampled_from([None, *range(len(kinds))]))
    pieces = [draw(st.sampled_from(PIECES[kind][index == wrong])) for index, kind in enumerate(kinds)]
    method, target, version, end, *rest = pieces
    parts = [method, b" ", target, b" ", version, end]
    for index in range(fields + 1):
        name, value, end = rest[3 * index:3 * index + 3]
        parts += [b"Host" if index == host_at else name, b":", value, end]
    parts += rest[-2:]
    return b"".join(parts)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
def test_what_the_reader_accepts_h11_reads_the_same_way(data):
    plain = read_plain_request(data, LIMIT)
    if plain is not None:
        assert h11_reading(data) == (plain.method, plain.target, plain.headers, plain.size)


def test_the_generated_heads_reach_the_reader_often():
    """The property above means something only if many generated heads are accepted (and many are not)."""
    accepted = []

    @settings(max_examples=500, deadline=None, database=None)
    @given(request_heads())
    def count(data):
        accepted.append(read_plain_request(data, LIMIT) is not None)

    count()
    assert 0.05 < sum(accepted) / len(accepted) < 0.95


# ---- the relay's output is the same either way --------------------------------------------------------------------

POLICY = HeaderPolicy({"X-Client-Subject": "subject"})
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def relay_transcript(requests: list[bytes], *, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(http1, "read_plain_request", lambda data, limit: None)
        relay = HttpRelay(POLICY, client_ip="192.0.2.7", identity=None)
        out: list[object] = []
        for request in requests:
            step = relay.from_client(request)
            out.append((step.to_backend, step.to_client, step.close, step.error, step.requests, relay.state))
            if step.close:
                break
            step = relay.from_backend(RESPONSE)
            out.append((step.to_backend, step.to_client, step.close, step.error, step.statuses, relay.state))
            if step.close:
                break
        return out


@pytest.mark.parametrize("requests", [
    pytest.param([WRK] * 3, id="kept-alive"),
    pytest.param([b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: forged\r\nx-client-subject: forged\r\n"
                  b"Connection: close, X-Client-Subject\r\n\r\n"], id="forged-identity-and-close"),
    pytest.param([b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                  b"Keep-Alive: 5\r\nTE: trailers\r\n\r\n"], id="hop-by-hop"),
    pytest.param([WRK + WRK, WRK], id="pipelined"),
    pytest.param([b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n"], id="connect"),
    pytest.param([b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 17000 + b"\r\n\r\n"], id="too-large"),
])
def test_the_relay_writes_the_same_bytes_whichever_parser_read_the_request(requests, monkeypatch):
    fast = relay_transcript(requests, fast=True, monkeypatch=monkeypatch)
    assert fast == relay_transcript(requests, fast=False, monkeypatch=monkeypatch)
    assert fast  # something was relayed


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request_heads(), min_size=1, max_size=3))
def test_the_relay_writes_the_same_bytes_for_generated_requests(monkeypatch, requests):
    assert relay_transcript(requests, fast=True, monkeypatch=monkeypatch) == relay_transcript(
        requests, fast=False, monkeypatch=monkeypatch)


def test_the_forged_identity_headers_are_gone_on_the_fast_path():
    relay = HttpRelay(POLICY, client_ip="192.0.2.7", identity=None)
    step = relay.from_client(b"GET / HTTP/1.1\r\nHost: a\r\nX-FORWARDED-CLIENT-CERT: forged\r\n"
                             b"X-Client-Subject: forged\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
    assert step.requests == 1 and relay.state is http1.State.AWAIT_RESPONSE
    assert b"forged" not in step.to_backend and b"10.0.0.1" not in step.to_backend
    assert b"X-Forwarded-For: 192.0.2.7\r\n" in step.to_backend
