"""The handshake through a real proxy on loopback: who gets in, who does not, and why."""

from __future__ import annotations

import pytest

from tests.conftest import exchange, client_context, start_proxy, wait_for


async def test_valid_client_round_trips_one_mebibyte(nursery, test_pki, echo_backend):
    p = await start_proxy(nursery, test_pki, echo_backend.address)
    payload = bytes(range(256)) * 4096  # 1 MiB
    result = await exchange(p.port, client_context(test_pki, test_pki.alice), payload)
    assert result.ok, result.error
    assert result.data == payload
    await wait_for(lambda: p.metric("mtls_proxy_bytes_total", direction="backend_to_client") == len(payload))
    assert p.metric("mtls_proxy_bytes_total", direction="client_to_backend") == len(payload)
    assert p.metric("mtls_proxy_handshakes_total", result="success") == 1
    assert p.metric("mtls_proxy_client_certificates_total", presented="true") == 1
