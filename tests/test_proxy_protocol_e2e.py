"""PROXY protocol headers reach a TCP backend before any client data."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.protocol import proxyproto
from tests.conftest import client_context, exchange, start_backend, start_proxy


def recording_backend(headers: list):
    async def handler(stream, backend):
        buf = b""
        while b"ping" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        headers.append(buf[: buf.index(b"ping")])
        await stream.send_all(b"ping")

    return handler


@pytest.mark.parametrize("include_cert", [False, True])
async def test_v2_header_carries_addresses_and_tls_facts(nursery, test_pki, include_cert):
    headers: list[bytes] = []
    backend = await start_backend(nursery, recording_backend(headers))
    p = await start_proxy(nursery, test_pki, backend.address, tls={"alpn": ["http/1.1"]},
                          backend={"proxy_protocol": "v2", "proxy_protocol_client_cert": include_cert})
    ctx = client_context(test_pki, test_pki.alice, version="1.3")
    ctx.set_alpn_protocols(["http/1.1"])
    result = await exchange(p.port, ctx, b"ping")
    assert result.ok, result.error
    (raw,) = headers
    fields, length = proxyproto.decode_v2(raw)
    assert length == len(raw)  # the header, then the client's bytes, nothing in between
    assert fields["family"] == "TCP4"
    assert fields["source"][0] == "127.0.0.1"
    assert fields["destination"] == ("127.0.0.1", p.port)
    assert fields["alpn"] == "http/1.1"
    assert fields["authority"] == "localhost"
    ssl = fields["ssl"]
    assert ssl["client"] & proxyproto.PP2_CLIENT_CERT_CONN
    assert ssl["verify"] == 0
    assert ssl["version"] == "TLSv1.3"
    assert ssl["cn"] == "alice"
    assert ssl["cipher"].startswith("TLS_")
    if include_cert:
        assert ssl["client_cert"] == test_pki.alice.issued.cert.public_bytes(Encoding.DER)
    else:
        assert "client_cert" not in ssl


async def test_v1_header_is_one_text_line(nursery, test_pki):
    headers: list[bytes] = []
    backend = await start_backend(nursery, recording_backend(headers))
    p = await start_proxy(nursery, test_pki, backend.address, backend={"proxy_protocol": "v1"})
    assert (await exchange(p.port, client_context(test_pki, test_pki.alice), b"ping")).ok
    (raw,) = headers
    assert raw.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert raw.endswith(f" {p.port}\r\n".encode())
