"""The sample backend that `mtls-proxy demo` puts behind the proxy.

It echoes what reached it, so a user running `curl` through the proxy sees that their request arrived at a plain
HTTP service, and which headers the proxy added on the way: the demo runs the proxy in HTTP mode, so that is the
client's identity (`X-Forwarded-Client-Cert`, `X-Forwarded-For`, `X-Forwarded-Proto`), and never a copy the client
forged. Served with `proxy.ops.admin_http.serve_http`.
"""

from __future__ import annotations

from proxy.ops.admin_http import Handler, Request, Response

__all__ = ["demo_handler"]

DEFAULT_GREETING = "hello from the mtls-proxy demo backend"


def demo_handler(greeting: str = DEFAULT_GREETING) -> Handler:
    """A handler that answers every request with 200 and a plain-text echo of it:

        <greeting>
        GET /path?query
        host: 127.0.0.1:8443
        user-agent: curl/8.5.0
        ...
    """

    async def handle(request: Request) -> Response:
        return Response(body=_echo(greeting, request).encode("utf-8"))

    return handle


def _echo(greeting: str, request: Request) -> str:
    lines = [greeting, f"{request.method} {request.target}"]
    lines += [f"{name}: {value}" for name, value in request.headers]
    return "\n".join(lines) + "\n"
