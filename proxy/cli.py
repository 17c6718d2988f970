"""Command line: ``mtls-proxy run | check | demo | certs init``.

Exit codes: 0 ok, 2 bad config or arguments (a message, never a traceback),
1 runtime failure (for example a port already in use).
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import trio

from proxy import __version__
from proxy.config import schema as cfg
from proxy.config.materials import ListenerMaterials, load_all
from proxy.config.schema import Config, ConfigError
from proxy.daemon import control as reload_command
from proxy.daemon.capacity import memory_warnings
from proxy.daemon.fdlimit import fd_capacity_warnings, raise_nofile_limit
from proxy.daemon.server import ListenError, Proxy
from proxy.daemon.workers import worker_count
from proxy.ops import probe as probe_command
from proxy.ops.logs import setup_logging

log = logging.getLogger("proxy.cli")

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _error(message: str) -> None:
    print(f"mtls-proxy: error: {message}", file=sys.stderr)


def _load_checked(path: str) -> tuple[Config, tuple[ListenerMaterials, ...], Proxy]:
    """Config, every file it names, and the TLS contexts: what run and check share."""
    config = cfg.load(path)
    materials = load_all(config, source=path)
    # Building the proxy builds every TLS context, so settings OpenSSL
    # refuses (a cipher string, say) are caught here too, before binding.
    try:
        proxy = Proxy(config, materials, config_path=path)  # the file SIGHUP and the file watch re-read
    except ConfigError as exc:
        raise ConfigError(path, exc.problems) from None
    return config, materials, proxy


def _listen_error(caught: BaseException) -> ListenError | None:
    """The ListenError that stopped the proxy, also when trio reports it
    inside an exception group (as it does for a failing task); else None."""
    if isinstance(caught, ListenError):
        return caught
    if not isinstance(caught, BaseExceptionGroup):
        return None
    matched, rest = caught.split(ListenError)
    if matched is None or rest is not None:
        return None
    found: ListenError | BaseExceptionGroup[ListenError] = matched
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


# ---- run ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until a signal; the last log line says the process stopped and why (daemon/lifecycle.py).

    Once logging is set up, every way out logs that line: run_until_signalled after a drain, the supervisor's
    return in workers mode, and here an error that stops the proxy.
    """
    from proxy.daemon.lifecycle import log_stopped, run_until_signalled

    started = time.monotonic()
    # Before the proxy sizes its descriptor budget and before workers fork:
    # they inherit the raised limit.
    raise_nofile_limit()
    try:
        config, materials, proxy = _load_checked(args.config)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    setup_logging(config.log.level, config.log.format)
    for i, mat in enumerate(materials):
        for warning in mat.warnings:
            log.warning("listeners[%d]: %s", i, warning)
    for warning in _capacity_warnings(config):
        log.warning("%s", warning)
    workers = worker_count(config)
    try:
        if workers > 1:
            return _run_workers(config, materials, workers, args.drain_timeout, started, args.config)
        if args.drain_timeout is not None:
            proxy.drain_timeout = args.drain_timeout
        _freeze_startup_objects()
        trio.run(run_until_signalled, proxy)
    except (ListenError, BaseExceptionGroup) as caught:
        listen_error = _listen_error(caught)
        if listen_error is not None:
            _error(str(listen_error))
        log_stopped("error", time.monotonic() - started, level=logging.WARNING)
        if listen_error is None:
            raise
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        # Only outside trio's signal handling, which turns SIGINT into a drain: before it starts or after it ends.
        log_stopped("sigint", time.monotonic() - started, level=logging.WARNING)
        return EXIT_RUNTIME
    return EXIT_OK


def _freeze_startup_objects() -> None:
    """Move everything loaded so far out of the garbage collector's sight.

    Config, contexts and modules live as long as the process; without this
    every full collection walks them again. Before a fork it also keeps the
    collector from touching (and so copying) pages the workers share.
    """
    gc.collect()
    gc.freeze()


def _run_workers(
    config: Config, materials: tuple[ListenerMaterials, ...], workers: int, drain_timeout: float | None,
    started: float, config_path: str,
) -> int:
    from proxy.daemon.lifecycle import log_stopped
    from proxy.daemon.workers import Supervisor

    supervisor = Supervisor(config, materials, workers=workers, drain_timeout=drain_timeout, config_path=config_path)
    _freeze_startup_objects()
    code = supervisor.run()
    # Each worker logged its own line, with its drain's counts. The supervisor returns only once a SIGTERM or
    # SIGINT has drained every worker (a worker that dies otherwise is restarted); which of the two, it does not say.
    log_stopped("signal", time.monotonic() - started, workers=workers)
    return code


# ---- check -------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config, materials, _ = _load_checked(args.config)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    print(f"admin endpoint: http://{config.admin.listen}/metrics")
    print(f"worker processes: {worker_count(config)}" + (" (auto)" if config.workers == "auto" else ""))
    for listener, mat in zip(config.listeners, materials, strict=False):
        print(_describe_listener(listener, mat))
    # As `run` would see them: it raises the soft descriptor limit to the hard one first.
    for warning in _capacity_warnings(config, fd_limit=raise_nofile_limit()):
        print(f"warning: {warning}")
    return EXIT_OK


def _capacity_warnings(config: Config, fd_limit: int | None = None) -> list[str]:
    """Where max_connections cannot fit this box: descriptors per process, memory of the cgroup."""
    return fd_capacity_warnings(config, limit=fd_limit) + memory_warnings(config)


def _days_left(when: datetime) -> str:
    days = (when - datetime.now(UTC)).days
    return f"expires {when:%Y-%m-%d}, in {days} days"


def _describe_listener(listener: cfg.ListenerConfig, mat: ListenerMaterials) -> str:
    auth = listener.client_auth
    leaf = mat.server.leaf
    lines = [
        f"listener {listener.name}: {listener.listen} -> {listener.backend.address} ({listener.backend.protocol})",
        f"  server certificate: {leaf.subject.rfc4514_string()} ({_days_left(leaf.not_valid_after_utc)})",
        f"  TLS {listener.tls.min_version}..{listener.tls.max_version}",
        f"  client auth: {auth.mode}",
    ]
    if auth.mode != "none":
        lines.append(f"  trusted CAs: {len(mat.trusted_ca)}, verify depth {auth.verify_depth}")
        lines.append("  CA names advertised in CertificateRequest:")
        lines += [f"    - {ca.subject.rfc4514_string()}" for ca in mat.advertised_ca]
        lines.append(f"  allow: {_describe_allow(auth.allow)}")
    lines += [f"  warning: {w}" for w in mat.warnings]
    return "\n".join(lines)


def _describe_allow(allow: cfg.AllowConfig | None) -> str:
    if allow is None:
        return "any verified client"
    rules = [
        f"{name}={value}"
        for name in ("subjects", "issuers", "common_names", "organizational_units", "dns_sans", "uri_sans",
                     "sha256_fingerprints")
        for value in getattr(allow, name)
    ]
    return "; ".join(rules)


# ---- certs init --------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from proxy.dev.pki import write_dev_pki

    try:
        pki = write_dev_pki(Path(args.dir), overwrite=args.force)
    except FileExistsError as exc:
        _error(f"{exc.filename} already exists (use --force to overwrite)")
        return EXIT_CONFIG
    except OSError as exc:
        _error(f"cannot write {args.dir}: {exc.strerror or exc}")
        return EXIT_RUNTIME
    print(f"wrote a development PKI to {pki.dir}:")
    for label, path in (
        ("CA certificate (trust this)", pki.ca_cert),
        ("CA key", pki.ca_key),
        ("server certificate", pki.server_cert),
        ("server key", pki.server_key),
        ("client certificate", pki.client_cert),
        ("client key", pki.client_key),
    ):
        print(f"  {label:28} {path}")
    print("These are for development only: the keys are unencrypted.")
    return EXIT_OK


# ---- demo --------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.dev.demo import DemoDirError, prepare_pki, run_demo

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mtls-proxy-demo-"))
    try:
        # Before logging is set up and before any port is bound: a folder the
        # demo must not write into is a bad argument, refused with nothing written.
        try:
            pki = prepare_pki(directory)
        except DemoDirError as exc:
            _error(f"--dir {exc}")
            return EXIT_CONFIG
        except OSError as exc:
            _error(f"cannot use {directory}: {exc.strerror or exc}")
            return EXIT_RUNTIME
        setup_logging("info", "text")
        trio.run(run_demo, pki, args.port, args.admin_port)
    except (ListenError, BaseExceptionGroup) as caught:
        listen_error = _listen_error(caught)
        if listen_error is None:
            raise
        _error(f"{listen_error} (pick other ports with --port / --admin-port)")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    return EXIT_OK


# ---- main --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-proxy", description="An mTLS-terminating reverse proxy with Prometheus metrics."
    )
    parser.add_argument("--version", action="version", version=f"mtls-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT (SIGHUP reloads the config and every file it names)")
    run.add_argument("--config", required=True, metavar="FILE")
    run.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                     help="how long open connections may finish after SIGTERM (overrides drain_timeout in the config)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate the config and every file it names")
    check.add_argument("--config", required=True, metavar="FILE")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="a throwaway PKI, a sample backend and the proxy on 127.0.0.1")
    demo.add_argument("--port", type=int, default=8443, help="TLS port (default 8443; 0 = any free port)")
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (default 9090; 0 = any free port)")
    demo.add_argument("--dir", metavar="DIR",
                      help="keep the demo PKI in this folder instead of a temporary one: a new or empty folder gets "
                           "a new PKI, one holding a complete demo PKI is reused as it is, anything else is refused")
    demo.set_defaults(func=cmd_demo)

    reload = sub.add_parser("reload", help="reload the whole config of the running proxy, after checking the file "
                                           "as `check` does")
    reload_command.add_arguments(reload)
    reload.set_defaults(func=reload_command.main)

    probe = sub.add_parser("probe", help="connect as a TLS client and say why a client certificate is admitted or "
                                         "refused (works against any TLS server)")
    probe_command.add_arguments(probe)
    probe.set_defaults(func=probe_command.main)

    certs = sub.add_parser("certs", help="development certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    init = certs_sub.add_parser("init", help="write a dev PKI (CA, server cert for localhost, client cert)")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=cmd_certs_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)
