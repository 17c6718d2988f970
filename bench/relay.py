"""CPU per request of the HTTP relay alone (proxy.protocol.http1), without sockets, TLS or trio.

Feeds one small GET and the backend's small response through an HttpRelay, over and over, the way a kept-alive
connection does, and prints the process CPU time per request. This isolates the HTTP layer's share of HTTP
identity mode's cost per request; `run.py`'s wrk_http row measures the whole path against nginx.

Run: ``python bench/relay.py [--requests N]``
"""

from __future__ import annotations

import argparse
import time

from proxy.protocol.http1 import HeaderPolicy, HttpRelay

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"  # what wrk sends
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n"  # backend.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    policy = HeaderPolicy({"X-Client-Subject": "subject", "X-Client-Verify": "verify"})  # run.py's HTTP config
    relay = HttpRelay(policy, client_ip="127.0.0.1", identity=None)
    for _ in range(1000):  # warm up
        relay.from_client(REQUEST)
        relay.from_backend(RESPONSE)
    started = time.process_time()
    for _ in range(args.requests):
        forwarded = relay.from_client(REQUEST)
        answered = relay.from_backend(RESPONSE)
    elapsed = time.process_time() - started
    assert forwarded.requests == 1 and answered.statuses == (200,) and not answered.close
    per_request = elapsed / args.requests * 1e6
    print(f"{per_request:.1f} µs of CPU per request through the HTTP relay ({args.requests} requests)")


if __name__ == "__main__":
    main()
