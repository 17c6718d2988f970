"""The admin endpoint: /metrics for Prometheus, /healthz and /readyz for probes, /status for humans.

Served by `proxy.ops.admin_http.serve_http`. Every route is read-only, so GET and HEAD are the only methods; the
server itself drops HEAD bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import prometheus_client
from prometheus_client.exposition import choose_encoder

from proxy.ops.admin_http import Handler, Request, Response

__all__ = ["admin_handler"]

_ALLOWED_METHODS = ("GET", "HEAD")
_NOT_FOUND = Response(status=404, body=b"not found\n")
_METHOD_NOT_ALLOWED = Response(
    status=405, body=b"method not allowed\n", headers=(("allow", ", ".join(_ALLOWED_METHODS)),)
)

Route = Callable[[Request], Response]


def admin_handler(
    registry: prometheus_client.CollectorRegistry,
    *,
    ready: Callable[[], bool],
    status: Callable[[], dict[str, object]] | None = None,
) -> Handler:
    """A handler for `serve_http` that serves the admin routes.

    Args:
      registry: the registry whose metrics /metrics exposes.
      ready: asked on every /readyz; true once the proxy accepts traffic (and false again while it drains).
      status: builds the /status document (JSON-serializable; other values are written with str()).
        Without it, /status is 404.
    """
    routes: dict[str, Route] = {
        "/metrics": lambda request: _metrics(registry, request),
        "/healthz": lambda request: Response(body=b"ok\n"),
        "/readyz": lambda request: _readiness(ready()),
    }
    if status is not None:
        routes["/status"] = lambda request: _json(status())

    async def handle(request: Request) -> Response:
        route = routes.get(_path(request.target))
        if route is None:
            return _NOT_FOUND
        if request.method not in _ALLOWED_METHODS:
            return _METHOD_NOT_ALLOWED
        return route(request)

    return handle


def _metrics(registry: prometheus_client.CollectorRegistry, request: Request) -> Response:
    # The client library's own negotiation: OpenMetrics when the scraper asks for it (Prometheus does), else the
    # classic text format with the content type that matches what generate_latest writes.
    encode, content_type = choose_encoder(request.header("accept") or "")
    return Response(body=encode(registry), content_type=content_type)


def _readiness(is_ready: bool) -> Response:
    return Response(body=b"ready\n") if is_ready else Response(status=503, body=b"not ready\n")


def _json(document: dict[str, object]) -> Response:
    body = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
    return Response(body=body.encode("utf-8"), content_type="application/json")


def _path(target: str) -> str:
    return target.split("?", 1)[0]
