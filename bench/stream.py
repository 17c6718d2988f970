"""CPU per GiB of the TLS stream alone (proxy.tls.stream), both ends in this process over a socketpair.

Moves MiB of data one way and then the other between two ``TLSStream``s (TLS 1.3, ECDSA P-256, the client
presenting a certificate) and prints the process CPU time per GiB for each direction. Each direction runs one
sender and one receiver, so the figure is the cost of ``send_all`` and ``receive_some`` together, with the socket
and scheduler work of both ends. It isolates the stream's own cost, which ``run.py``'s bulk rows measure end to end
through the proxy against nginx. Pin it to one core (``taskset -c 1``) for steadier numbers.

Run: ``python bench/stream.py [--mib N]``
"""

from __future__ import annotations

import argparse
import socket
import time

import trio
from OpenSSL import SSL, crypto

from proxy.dev import pki
from proxy.net.sockstream import SocketStream
from proxy.tls.stream import TLSStream

PIECE = 64 * 1024  # what the pump reads and writes at a time


def contexts() -> tuple[SSL.Context, SSL.Context]:
    ca = pki.make_ca("Bench CA")
    server, client = pki.make_server_cert(ca), pki.make_client_cert(ca, common_name="bench client")
    made = []
    for method, issued in ((SSL.TLS_SERVER_METHOD, server), (SSL.TLS_CLIENT_METHOD, client)):
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(crypto.X509.from_cryptography(issued.cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(issued.key))
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca.cert))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda conn, cert, err, depth, ok: ok)
        ctx.clear_mode(0x1)  # SSL_MODE_ENABLE_PARTIAL_WRITE off, as the proxy's Context has it
        ctx.set_mode(0x10)  # SSL_MODE_RELEASE_BUFFERS, as the proxy's Context has it
        made.append(ctx)
    return made[0], made[1]


async def measure(total: int) -> dict[str, float]:
    server_ctx, client_ctx = contexts()
    a, b = socket.socketpair()
    server_conn, client_conn = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server_conn.set_accept_state()
    client_conn.set_connect_state()
    server = TLSStream(SocketStream(a), server_conn)
    client = TLSStream(SocketStream(b), client_conn, server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    piece = bytes(PIECE)
    result = {}
    for name, sender, receiver in (("client to server", client, server), ("server to client", server, client)):

        async def send(sender: TLSStream = sender) -> None:
            for _ in range(total // PIECE):
                await sender.send_all(piece)

        started = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = 0
            while got < total // PIECE * PIECE:
                got += len(await receiver.receive_some(PIECE))
        result[name] = (time.process_time() - started) / (got / 2**30)
    await server.aclose()
    await client.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    result = trio.run(measure, args.mib * 2**20)
    print(", ".join(f"{name}: {seconds:.3f} CPU-s/GiB" for name, seconds in result.items()) + f" ({args.mib} MiB)")


if __name__ == "__main__":
    main()
