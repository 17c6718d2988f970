"""`mtls-proxy demo`: a throwaway PKI, a sample HTTP backend, and the proxy in
front of it on 127.0.0.1 with mandatory client certificates, plus the curl
commands that show it working (and refusing)."""

from __future__ import annotations

import shlex
from pathlib import Path

import trio

from proxy.config.materials import load_all
from proxy.config.schema import parse
from proxy.daemon.lifecycle import run_until_signalled
from proxy.daemon.server import Proxy
from proxy.dev.demo_backend import demo_handler
from proxy.dev.pki import write_dev_pki
from proxy.ops.admin_http import serve_http


def demo_config(directory: Path, port: int, admin_port: int, backend_port: int) -> dict:
    return {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"level": "info", "format": "text"},
        "listeners": [
            {
                "name": "demo",
                "listen": f"127.0.0.1:{port}",
                "tls": {"cert": "server.crt", "key": "server.key"},
                "client_auth": {"mode": "require", "trusted_ca": "ca.crt"},
                "backend": {"address": f"127.0.0.1:{backend_port}", "protocol": "tcp"},
                "timeouts": {"handshake": 10, "idle": 60},
            }
        ],
    }


def instructions(directory: Path, url: str, admin: str) -> str:
    q = lambda p: shlex.quote(str(directory / p))  # noqa: E731
    with_cert = f"curl --cacert {q('ca.crt')} --cert {q('client.crt')} --key {q('client.key')} {url}"
    without_cert = f"curl --cacert {q('ca.crt')} {url}"
    return "\n".join(
        [
            "",
            "mtls-proxy demo is running: a sample HTTP backend behind the proxy, client certificates required.",
            f"  PKI (CA, server and client certificates): {directory}",
            "",
            "With the client certificate (answers 200 from the backend):",
            f"  {with_cert}",
            "",
            "Without a client certificate (the handshake is refused):",
            f"  {without_cert}",
            "",
            "Metrics:",
            f"  curl http://{admin}/metrics",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


async def run_demo(directory: Path, port: int, admin_port: int) -> None:
    write_dev_pki(directory, overwrite=True)
    async with trio.open_nursery() as nursery:
        _, backend_port = await nursery.start(serve_http, demo_handler(), "127.0.0.1", 0)
        config = parse(demo_config(directory, port, admin_port, backend_port), source="demo", base_dir=directory)
        proxy = Proxy(config, load_all(config))
        async with trio.open_nursery() as proxy_nursery:
            bound = await proxy_nursery.start(run_until_signalled, proxy)
            url = f"https://{bound.listeners['demo'][0]}/"
            print(instructions(directory, url, bound.admin), flush=True)
        nursery.cancel_scope.cancel()  # the proxy has drained: stop the backend
