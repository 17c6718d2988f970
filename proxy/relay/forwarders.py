"""The forwarders: what moves a connection's bytes once it is identified, chosen once per listener.

- ``TCPForwarder``: bytes as they come, on the data plane (proxy.relay.dataplane) or with the two-way pump.
- ``HTTP1Forwarder``: the HTTP/1.1 relay (proxy.relay.http1_forwarder), identity headers on every request.
- ``HTTP2Forwarder``: the HTTP/2 relay (proxy.relay.http2_forwarder), identity headers on every stream; it opens
  its backend connections itself (one h2c connection, or one HTTP/1.1 connection per stream), and answers a backend
  that cannot be reached on each stream.

A listener in HTTP mode has an ``HTTPForwarder``, which picks HTTP/2 or HTTP/1.1 per connection, as ALPN decided.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, Protocol

import trio
from cryptography.hazmat.primitives import serialization

from proxy.config.schema import ListenerConfig
from proxy.net.sockstream import SocketStream
from proxy.ops.metrics import ListenerMetrics
from proxy.protocol.http1 import HttpRelay, render_error_response
from proxy.protocol.http2 import (
    AttackContained,
    Http2Event,
    Http2Relay,
    Http2Settings,
    ProtocolViolation,
    StreamClosed,
    StreamError,
    StreamOpened,
)
from proxy.protocol.identity_headers import HeaderPolicy
from proxy.relay.dataplane import forward_on_plane
from proxy.relay.http1_forwarder import HttpCounters, relay_http
from proxy.relay.http2_forwarder import relay_http2
from proxy.relay.tcp_forwarder import CHUNK_SIZE, PumpResult, pump

if TYPE_CHECKING:
    from proxy.relay.connection import Connection

log = logging.getLogger("proxy.relay.forwarders")

# How long answering a client may take when its backend cannot be reached.
ANSWER_TIMEOUT = 1.0

BackendOpener = Callable[[], Awaitable[trio.abc.Stream]]


class Forwarder(Protocol):
    """Relays between the client and a backend the connection has connected."""

    opens_backends: Literal[False]

    def forward(self, conn: Connection, backend: SocketStream) -> Awaitable[PumpResult]:
        """Relay until the connection ends.

        Hands back the relay's coroutine rather than being one: its frames are not nested one deeper for the
        life of the connection.
        """
        ...

    async def backend_unreachable(self, conn: Connection, *, timed_out: bool) -> None:
        """Tell the client the backend could not be reached, if the protocol has a way to say so."""
        ...


class OpeningForwarder(Protocol):
    """Relays for a client whose backend connections it opens itself, with ``open_backend``, as it needs them."""

    opens_backends: Literal[True]

    def relay(self, conn: Connection, open_backend: BackendOpener) -> Awaitable[PumpResult]: ...


class ListenerForwarder(Protocol):
    """A listener's forwarding, chosen once from its config; ``choose`` picks what serves one connection."""

    def choose(self, conn: Connection) -> Forwarder | OpeningForwarder: ...


class TCPForwarder:
    """Bytes as they come: on the data plane (proxy.relay.dataplane), or with the two-way pump
    (proxy.relay.tcp_forwarder) when the session cannot move onto its socket."""

    opens_backends: Literal[False] = False

    def choose(self, conn: Connection) -> TCPForwarder:
        return self

    def __init__(self, config: ListenerConfig, metrics: ListenerMetrics) -> None:
        self.idle_timeout = config.timeouts.idle
        self.metrics = metrics

    async def forward(self, conn: Connection, backend: SocketStream) -> PumpResult:
        m = self.metrics
        result = await forward_on_plane(conn.stream, backend, idle_timeout=self.idle_timeout, on_up=m.bytes_up.inc,
                                        on_down=m.bytes_down.inc)
        if result is None:
            result = await pump(conn.stream, backend, idle_timeout=self.idle_timeout, on_up=m.bytes_up.inc,
                                on_down=m.bytes_down.inc)
        return result

    async def backend_unreachable(self, conn: Connection, *, timed_out: bool) -> None:
        """Nothing to say in TCP: the client sees its connection close."""


class HTTP1Forwarder:
    """The HTTP/1.1 relay (proxy.relay.http1_forwarder), which gives the backend the client's identity in headers."""

    opens_backends: Literal[False] = False

    def __init__(self, config: ListenerConfig, metrics: ListenerMetrics) -> None:
        backend = config.backend
        self.policy = HeaderPolicy(backend.identity_headers, upgrades=backend.upgrades)
        self.idle_timeout = config.timeouts.idle
        self.read_timeout = config.timeouts.handshake  # for the request a backend failure answers
        self.metrics = metrics
        m = metrics
        self.counters = HttpCounters(requests=m.http_requests.inc, status=m.http_response, up=m.bytes_up.inc,
                                     down=m.bytes_down.inc)

    def relay(self, conn: Connection) -> HttpRelay:
        return HttpRelay(self.policy, client_ip=conn.client_host(), identity=conn.record.identity,
                         leaf_der=_leaf_der(self.policy, conn))

    async def forward(self, conn: Connection, backend: SocketStream) -> PumpResult:
        relay = self.relay(conn)
        counters = self.counters
        result = await forward_on_plane(conn.stream, backend, idle_timeout=self.idle_timeout, on_up=counters.up,
                                        on_down=counters.down, http=(relay, counters))
        if result is None:  # the session could not move onto its socket: the task driver
            result = await relay_http(conn.stream, backend, relay, idle_timeout=self.idle_timeout,
                                      counters=self.counters)
        return result

    async def backend_unreachable(self, conn: Connection, *, timed_out: bool) -> None:
        """Read the client's request (briefly), then answer it 502, or 504 after a timeout, as an HTTP proxy does."""
        relay = self.relay(conn)
        stream = conn.stream
        with trio.move_on_after(self.read_timeout):
            try:
                data = await stream.receive_some(CHUNK_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            relay.from_client(data)
        step = relay.fail(504 if timed_out else 502)
        for code in step.statuses:
            self.metrics.http_response(code)
        if step.to_client:
            with trio.move_on_after(ANSWER_TIMEOUT):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(step.to_client)


class HTTP2Forwarder:
    """The HTTP/2 relay (proxy.relay.http2_forwarder): the client's streams to an h2c backend, or each to its own
    HTTP/1.1 backend connection (``backend.http_version``), with the identity headers on every stream."""

    opens_backends: Literal[True] = True

    def __init__(self, config: ListenerConfig, metrics: ListenerMetrics, policy: HeaderPolicy) -> None:
        h2 = config.http2
        self.settings = Http2Settings(
            max_concurrent_streams=h2.max_concurrent_streams,
            initial_window_size=h2.initial_window_size,
            connection_window_size=h2.connection_window_size,
            max_frame_size=h2.max_frame_size,
            max_header_list_size=h2.max_header_list_size,
        )
        self.policy = policy
        self.backend_http_version = config.backend.http_version
        self.connect_timeout = config.backend.connect_timeout
        self.idle_timeout = config.timeouts.idle
        self.listener = config.name
        self.metrics = metrics

    def relay(self, conn: Connection, open_backend: BackendOpener) -> Awaitable[PumpResult]:
        relay = Http2Relay(self.policy, client_ip=conn.client_host(), identity=conn.record.identity,
                           leaf_der=_leaf_der(self.policy, conn), settings=self.settings,
                           backend_http_version=self.backend_http_version)
        m = self.metrics
        return relay_http2(conn.stream, open_backend, relay, connect_timeout=self.connect_timeout,
                           idle_timeout=self.idle_timeout, drain=conn.rt.draining,
                           on_event=_Http2Events(conn, m, self.listener).on_event, on_up=m.bytes_up.inc,
                           on_down=m.bytes_down.inc)


class _Http2Events:
    """What the HTTP/2 relay reports, counted and logged for one connection."""

    def __init__(self, conn: Connection, metrics: ListenerMetrics, listener: str) -> None:
        self.conn = conn
        self.metrics = metrics
        self.listener = listener

    def on_event(self, event: Http2Event) -> None:
        m = self.metrics
        if isinstance(event, StreamOpened):
            m.http2_requests.inc()
            m.http2_active_streams.inc()
            self.conn.line.streams = (self.conn.line.streams or 0) + 1
        elif isinstance(event, StreamClosed):
            m.http2_active_streams.dec()  # every StreamOpened gets exactly one StreamClosed
            if event.status is not None:
                m.http_response(event.status)
        elif isinstance(event, AttackContained):
            m.http2_attack_contained(event.reason)
            log.warning("listener %s: HTTP/2 %s from %s contained: %s", self.listener, event.reason,
                        self.conn.client, event.detail)
        elif isinstance(event, ProtocolViolation):
            log.info("listener %s: HTTP/2 protocol error by the %s of %s: %s", self.listener, event.side,
                     self.conn.client, event.detail)
        elif isinstance(event, StreamError):
            log.info("listener %s: stream %d of %s: %s (%s)", self.listener, event.stream_id, self.conn.client,
                     event.reason, event.detail)


class HTTPForwarder:
    """HTTP mode: HTTP/2 for a client that negotiated h2 with ALPN, HTTP/1.1 for the others.

    With ``backend.http_version: "2"`` the backend speaks only HTTP/2, so an HTTP/1.1 client gets a 505 that says so.
    """

    def __init__(self, config: ListenerConfig, metrics: ListenerMetrics) -> None:
        self.http1 = HTTP1Forwarder(config, metrics)
        self.http2 = HTTP2Forwarder(config, metrics, self.http1.policy)
        self.h2_backend = config.backend.http_version == "2"

    def choose(self, conn: Connection) -> Forwarder | OpeningForwarder:
        if conn.line.alpn == "h2":
            return self.http2
        if self.h2_backend:
            return _HTTP1ToHTTP2Refused(self.http1)
        return self.http1


class _HTTP1ToHTTP2Refused:
    """An HTTP/1.1 client on a listener whose backend speaks only HTTP/2: one 505 answer, no backend."""

    opens_backends: Literal[True] = True

    def __init__(self, http1: HTTP1Forwarder) -> None:
        self.http1 = http1

    async def relay(self, conn: Connection, open_backend: BackendOpener) -> PumpResult:
        stream = conn.stream
        with trio.move_on_after(self.http1.read_timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.receive_some(CHUNK_SIZE)  # the request, read so that the answer is not reset away
        answer = render_error_response(505)
        self.http1.metrics.http_response(505)
        with trio.move_on_after(ANSWER_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(answer)
        return PumpResult(bytes_down=len(answer), ended_by="http2_required")


def _leaf_der(policy: HeaderPolicy, conn: Connection) -> bytes | None:
    """The client certificate's DER, when the identity headers include it (``cert_pem_urlencoded``)."""
    if not policy.needs_leaf_der or conn.record.identity is None:
        return None
    leaf = conn.stream.peer_certificate()
    return leaf.public_bytes(serialization.Encoding.DER) if leaf is not None else None


def forwarder_for(config: ListenerConfig, metrics: ListenerMetrics) -> TCPForwarder | HTTPForwarder:
    """The forwarding of a listener: the one place its backend protocol is looked at."""
    if config.backend.protocol == "http":
        return HTTPForwarder(config, metrics)
    return TCPForwarder(config, metrics)
