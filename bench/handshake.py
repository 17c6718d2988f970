"""CPU of the server side of one mTLS handshake, in this process: the listener's own Context and verify callback.

Builds a listener's ServerTLS the way the daemon does (``proxy.tls.context.build_server_tls``, client certificate
required, the bench's kind of PKI: ECDSA P-256, TLS 1.3) and runs handshakes with an OpenSSL client over memory
BIOs. Only the server's ``do_handshake`` calls are timed (process CPU time), so the figure is what OpenSSL and the
proxy's callbacks (verification record, chain facts, resumption check) cost per handshake, without sockets,
scheduler or data. ``--resumed`` offers the session of the first handshake each time. ``run.py``'s handshake rows
measure the same end to end through the proxy against nginx; this isolates the part that happens inside
``SSL_do_handshake``. Pin it to one core (``taskset -c 1``) for steadier numbers.

Run: ``python bench/handshake.py [--handshakes N] [--resumed]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL, crypto

from proxy.config.materials import load_all
from proxy.config.schema import parse
from proxy.dev import pki
from proxy.tls._openssl import session_reused
from proxy.tls.context import ServerTLS, build_server_tls

WARM_UP = 50


def listener_tls(directory: Path) -> tuple[ServerTLS, SSL.Context]:
    """The listener's ServerTLS, and a client Context that presents a certificate it trusts."""
    ca = pki.make_ca("bench CA", organization="bench")
    server = pki.make_server_cert(ca)
    client = pki.make_client_cert(ca, common_name="bench-client", organization="bench")
    (directory / "ca.crt").write_bytes(ca.cert_pem())
    (directory / "server.crt").write_bytes(server.chain_pem())
    (directory / "server.key").write_bytes(server.key_pem())
    listener = {
        "name": "bench",
        "listen": "127.0.0.1:1",
        "tls": {"cert": str(directory / "server.crt"), "key": str(directory / "server.key")},
        "client_auth": {"mode": "require", "trusted_ca": str(directory / "ca.crt")},
        "backend": {"address": "127.0.0.1:2"},
    }
    config = parse({"listeners": [listener]}, source="bench/handshake.py")
    tls = build_server_tls(config.listeners[0], load_all(config)[0])
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(crypto.X509.from_cryptography(client.cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(client.key))
    ctx.load_verify_locations(str(directory / "ca.crt"))
    ctx.set_verify(SSL.VERIFY_PEER)
    return tls, ctx


def _move(source: SSL.Connection, destination: SSL.Connection) -> None:
    with contextlib.suppress(SSL.WantReadError):  # nothing to move
        destination.bio_write(source.bio_read(1 << 16))


def handshake(tls: ServerTLS, client_ctx: SSL.Context, session: SSL.Session | None) -> tuple[float, SSL.Connection]:
    """One handshake; the server's CPU seconds in it, and the client's end (for its session)."""
    server, record = tls.new_connection()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    spent = 0.0
    for _ in range(8):  # two flights each way, and the session tickets
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
        _move(client, server)
        started = time.process_time()
        try:
            server.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        spent += time.process_time() - started
        _move(server, client)
        if done:
            break
    else:
        raise RuntimeError("the handshake did not finish")
    if session is None and record.identity is None:
        raise RuntimeError(f"the client was not identified: {record.errors or record.refusal}")
    if session is not None and not session_reused(server):
        raise RuntimeError("the session was not resumed")
    with contextlib.suppress(SSL.WantReadError):
        client.recv(1)  # takes the session tickets the server sent after its last flight
    return spent, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--resumed", action="store_true", help="resume the first handshake's session each time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-handshake-") as directory:
        tls, client_ctx = listener_tls(Path(directory))
    _, first = handshake(tls, client_ctx, None)
    session = first.get_session() if args.resumed else None
    for _ in range(WARM_UP):
        handshake(tls, client_ctx, session)
    spent = [handshake(tls, client_ctx, session)[0] for _ in range(args.handshakes)]
    kind = "resumed" if args.resumed else "full"
    print(f"{statistics.median(spent) * 1e6:.1f} µs of CPU per {kind} handshake on the server side "
          f"(median of {args.handshakes})")


if __name__ == "__main__":
    main()
