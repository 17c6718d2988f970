"""`mtls-proxy demo`: a throwaway PKI, a sample HTTP backend, and the proxy in
front of it on 127.0.0.1 with mandatory client certificates, plus the curl
commands that show it working, replacing a forged identity header, and
refusing a client without a certificate.

The proxy runs in HTTP mode, so the backend receives the client's identity in
`X-Forwarded-Client-Cert` and echoes it: the pasted `curl` shows what a real
backend would be told.

`--dir DIR` keeps the PKI. The demo never overwrites a key there: a missing or
empty folder gets a new PKI, a folder holding a complete demo PKI (from an
earlier demo or `mtls-proxy certs init`) is reused as it is, and anything else
is refused before a file is written (:func:`prepare_pki`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from proxy.config.materials import load_all
from proxy.config.schema import ConfigError, parse
from proxy.daemon.lifecycle import run_until_signalled
from proxy.daemon.server import Proxy
from proxy.dev.demo_backend import demo_handler
from proxy.dev.pki import DevPKI, write_dev_pki
from proxy.ops.admin_http import serve_http

__all__ = ["DemoDirError", "DemoPKI", "demo_config", "instructions", "prepare_pki", "run_demo"]

# The demo listens here and prints URLs with it, so a reused server certificate must name it.
DEMO_HOST = "127.0.0.1"
# What the second printed command sends, for the proxy to drop.
FORGED_XFCC = "X-Forwarded-Client-Cert: forged"

_DIR_HINT = (
    "; give --dir a new or empty folder, or one holding a complete demo PKI "
    "(from an earlier demo or `mtls-proxy certs init`)"
)


class DemoDirError(Exception):
    """The folder given with ``--dir`` is neither new, empty, nor a complete demo PKI.

    The message starts with the folder and says what is wrong with it.
    """


@dataclass(frozen=True)
class DemoPKI:
    """The demo's PKI on disk, and whether it was found there rather than written."""

    paths: DevPKI
    reused: bool


def prepare_pki(directory: Path) -> DemoPKI:
    """The demo PKI in ``directory``, which is never overwritten.

    A missing or empty folder gets a new PKI. A folder holding exactly the files of a dev PKI, which a demo can use
    (one CA that signed both leaves, each key matching its certificate, all valid now, a server certificate for
    127.0.0.1 that the proxy's own checks accept), is reused and not touched. Anything else raises
    :class:`DemoDirError` before anything is written. OSError passes through (a folder that cannot be read or
    written).
    """
    paths = DevPKI.at(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise DemoDirError(f"{directory} is not a folder{_DIR_HINT}")
        present = {entry.name for entry in directory.iterdir()}
        if present:
            _check_reusable(paths, present)
            return DemoPKI(paths, reused=True)
    write_dev_pki(directory)
    return DemoPKI(paths, reused=False)


def _check_reusable(paths: DevPKI, present: set[str]) -> None:
    names = [path.name for path in paths.files]
    unrelated = sorted(present.difference(names))
    if unrelated:
        listed = ", ".join(unrelated)
        raise DemoDirError(f"{paths.dir} holds files that are not part of a demo PKI: {listed}{_DIR_HINT}")
    missing = [name for name in names if name not in present]
    if missing:
        raise DemoDirError(f"{paths.dir} holds a partial demo PKI, without {', '.join(missing)}{_DIR_HINT}")
    try:
        _check_demo_pki(paths, datetime.now(UTC))
    except _Unusable as exc:
        raise DemoDirError(f"{paths.dir} holds a demo PKI that cannot be reused: {exc}{_DIR_HINT}") from None


class _Unusable(Exception):
    """What makes one file of a complete-looking PKI unusable, in words."""


def _check_demo_pki(paths: DevPKI, now: datetime) -> None:
    ca = _certificates(paths.ca_cert)
    if len(ca) != 1:
        raise _Unusable(f"{paths.ca_cert.name} holds {len(ca)} certificates, not one CA")
    root = ca[0]
    if not _is_ca(root) or not _signed_by(root, root):
        raise _Unusable(f"{paths.ca_cert.name} is not a self-signed CA certificate")
    for cert_path, key_path in (
        (paths.ca_cert, paths.ca_key),
        (paths.server_cert, paths.server_key),
        (paths.client_cert, paths.client_key),
    ):
        cert = _certificates(cert_path)[0]  # a leaf comes first, before any intermediates
        if cert_path != paths.ca_cert and not _signed_by(cert, root):
            raise _Unusable(f"{cert_path.name} is not signed by {paths.ca_cert.name}")
        if _spki(cert.public_key()) != _spki(_public_key_of_private_key(key_path)):
            raise _Unusable(f"{key_path.name} does not match {cert_path.name}")
        if now > cert.not_valid_after_utc:
            raise _Unusable(f"{cert_path.name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if now < cert.not_valid_before_utc:
            raise _Unusable(f"{cert_path.name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if DEMO_HOST not in _ip_sans(_certificates(paths.server_cert)[0]):
        raise _Unusable(f"{paths.server_cert.name} is not issued for {DEMO_HOST}, where the demo listens")
    # Last, what the proxy itself checks in the files it will load (key sizes, curves a client can verify): a
    # problem found here would otherwise stop the demo after it started.
    try:
        load_all(parse(demo_config(paths.dir, 0, 0, 1), source="demo", base_dir=paths.dir))
    except ConfigError as exc:
        # "listeners[0].tls.cert: PATH: what": the config is the demo's own, so the file alone says where.
        raise _Unusable("; ".join(problem.split(": ", 1)[-1] for problem in exc.problems)) from None


def _read(path: Path) -> bytes:
    # A symlink could point a key file anywhere; a demo PKI is plain files.
    if path.is_symlink() or not path.is_file():
        raise _Unusable(f"{path.name} is not a regular file")
    return path.read_bytes()


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise _Unusable(f"{path.name} holds no PEM certificate") from None


def _public_key_of_private_key(path: Path) -> PublicKeyTypes:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise _Unusable(f"{path.name} holds no unencrypted PEM private key") from None
    return key.public_key()


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _ip_sans(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(address) for address in sans.get_values_for_type(x509.IPAddress)]


# --- running it ----------------------------------------------------------------------------------------------


def demo_config(directory: Path, port: int, admin_port: int, backend_port: int) -> dict[str, Any]:
    """The config the demo runs: one listener in HTTP mode, so the backend is told who the client is."""
    return {
        "admin": {"listen": f"{DEMO_HOST}:{admin_port}"},
        "log": {"level": "info", "format": "text"},
        "listeners": [
            {
                "name": "demo",
                "listen": f"{DEMO_HOST}:{port}",
                "tls": {"cert": "server.crt", "key": "server.key"},
                "client_auth": {"mode": "require", "trusted_ca": "ca.crt"},
                "backend": {"address": f"{DEMO_HOST}:{backend_port}", "protocol": "http"},
                "timeouts": {"handshake": 10, "idle": 60},
            }
        ],
    }


def instructions(pki: DemoPKI, url: str, admin: str) -> str:
    """What the demo prints: where the PKI is, and one paste-ready command per line."""
    paths = pki.paths

    def quoted(path: Path) -> str:
        return shlex.quote(str(path))

    trust = f"curl --cacert {quoted(paths.ca_cert)}"
    with_cert = f"{trust} --cert {quoted(paths.client_cert)} --key {quoted(paths.client_key)}"
    found = "found there and reused, nothing rewritten" if pki.reused else "made for this demo"
    return "\n".join(
        [
            "",
            "mtls-proxy demo is running: a sample HTTP backend behind the proxy, client certificates required.",
            f"  PKI (CA, server and client certificates): {paths.dir}",
            f"  ({found})",
            "",
            "With the client certificate (the backend answers 200 and shows the identity headers it received):",
            f"  {with_cert} {url}",
            "",
            "With a forged X-Forwarded-Client-Cert (the proxy replaces it: the backend sees only the proxy's):",
            f"  {with_cert} -H {shlex.quote(FORGED_XFCC)} {url}",
            "",
            "Without a client certificate (the handshake is refused):",
            f"  {trust} {url}",
            "",
            "Metrics:",
            f"  curl http://{admin}/metrics",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


async def run_demo(pki: DemoPKI, port: int, admin_port: int) -> None:
    """Serve the backend and the proxy until SIGTERM or SIGINT has drained the proxy."""
    directory = pki.paths.dir
    async with trio.open_nursery() as nursery:
        _, backend_port = await nursery.start(serve_http, demo_handler(), DEMO_HOST, 0)
        config = parse(demo_config(directory, port, admin_port, backend_port), source="demo", base_dir=directory)
        proxy = Proxy(config, load_all(config))
        async with trio.open_nursery() as proxy_nursery:
            bound = await proxy_nursery.start(run_until_signalled, proxy)
            url = f"https://{bound.listeners['demo'][0]}/"
            print(instructions(pki, url, bound.admin), flush=True)
        nursery.cancel_scope.cancel()  # the proxy has drained: stop the backend
