"""``mtls-proxy reload --config FILE``: check a config file, then have the proxy that runs it reload it, and say how
that went.

The steps:

1. The checks of ``mtls-proxy check`` (``check_config`` in daemon/server.py): the file, every file it names, every
   TLS context. A file that fails them is refused, exit 2, and nothing is signalled: the running proxy would refuse
   it too, but this way the operator reads why here, not in the proxy's log.
2. Find the process: GET /status on the admin endpoint the file names (or ``--admin HOST:PORT``, for a reload that
   moves the endpoint). /status says which config file the process runs and which pid takes SIGHUP (the
   supervisor's, with worker processes); that file must be FILE, and that pid's command line must name it.
3. SIGHUP to that pid, then /status is polled until its reload count (``last_reload.attempt``) moves; the result
   is printed. A port in use is one failure only the process can see.

Why /status and not a pidfile: the container image has no writable path (deploy/README.md), a pidfile goes stale
when its process dies, and a ``pid_file`` setting would be one more thing to configure. Nor a ``POST /reload``:
the admin endpoint stays read-only, and the signal is sent from here, so only a user allowed to signal the process
can make it reload, as with ``kill -HUP``. The command runs where the proxy runs (``kubectl exec`` into its
container): the pid must be one of this machine's, which the command-line check makes sure of.

Exit codes: 0 the reload took effect; 1 it failed in the process, or no proxy answered, or no result came within
``--timeout``; 2 usage, or a config that fails the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config.schema import ConfigError, TCPAddress, parse_listen_address
from proxy.daemon.server import check_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STATUS_TIMEOUT = 5.0  # seconds for one GET /status
POLL_INTERVAL = 0.1
# A single process reloads in milliseconds; with workers, a new generation is forked and must be serving first, and
# WORKER_START_TIMEOUT (daemon/workers.py) bounds that at 30 s.
DEFAULT_TIMEOUT = 60.0


class Refused(Exception):
    """The command stops here: the message for the user, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the config file the proxy runs, edited")
    parser.add_argument("--admin", metavar="HOST:PORT", type=_address,
                        help="where the running proxy's admin endpoint listens, when FILE moves it elsewhere")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the reload's result (default {DEFAULT_TIMEOUT:g})")


def main(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        try:
            config = check_config(path)
        except ConfigError as exc:
            raise Refused(f"{exc}\nnot reloaded: the running proxy keeps its configuration", EXIT_USAGE) from None
        where = [args.admin] if args.admin is not None else [config.admin.listen]
        status, at = _find(where, path)
        pid = _signal_pid(status, path)
        before = _attempt(status)
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise Refused(f"cannot signal pid {pid}: {exc.strerror or exc}", EXIT_FAILED) from None
        # After the reload the endpoint may answer where FILE puts it.
        result = _wait(_unique([at, config.admin.listen]), before, args.timeout)
    except Refused as refused:
        print(f"mtls-proxy: error: {refused}", file=sys.stderr)
        return refused.code
    return _report(result, path, pid)


def _address(text: str) -> TCPAddress:
    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _unique(addresses: list[TCPAddress]) -> list[TCPAddress]:
    return list(dict.fromkeys(addresses))


def _url(address: TCPAddress) -> str:
    """The admin endpoint's /status; a wildcard listen address is reached on loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://{TCPAddress(host, address.port)}/status"


def _get_status(address: TCPAddress) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(_url(address), timeout=STATUS_TIMEOUT) as response:
            document: object = json.loads(response.read())
    except (OSError, ValueError):  # refused, timed out, not HTTP, not JSON (URLError is an OSError)
        return None
    return document if isinstance(document, dict) else None


def _find(where: list[TCPAddress], path: Path) -> tuple[dict[str, object], TCPAddress]:
    """The /status of the proxy that runs ``path``, and where it answered."""
    for address in where:
        status = _get_status(address)
        if status is None:
            continue
        running = status.get("config_file")
        if not isinstance(running, str):
            raise Refused(f"the proxy at {address} runs no config file (a demo?): nothing to reload", EXIT_USAGE)
        if not _same_file(Path(running), path):
            raise Refused(f"the proxy at {address} runs {running}, not {path}", EXIT_USAGE)
        return status, address
    tried = ", ".join(_url(address) for address in where)
    raise Refused(f"no mtls-proxy answers at {tried}; is it running? If {path} moves the admin endpoint, name the "
                  "running one with --admin HOST:PORT", EXIT_FAILED)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.absolute() == b.absolute()


def _signal_pid(status: dict[str, object], path: Path) -> int:
    """The pid /status names, once its command line shows it runs ``path`` here (not a pid of another machine or
    container that happens to exist here too)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        raise Refused(f"/status names no pid to signal (pid: {pid!r})", EXIT_FAILED)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        raise Refused(f"pid {pid} is no process here: run this where the proxy runs", EXIT_FAILED) from None
    config_arg = _config_argument(argv)
    if config_arg is None:
        raise Refused(f"pid {pid} is not an mtls-proxy run with --config ({' '.join(argv).strip()})", EXIT_FAILED)
    config_path = Path(config_arg)
    if not config_path.is_absolute():
        try:
            config_path = Path(os.readlink(f"/proc/{pid}/cwd")) / config_path
        except OSError:
            raise Refused(f"cannot see pid {pid}'s working directory to check its --config {config_arg}",
                          EXIT_FAILED) from None
    if not _same_file(config_path, path):
        raise Refused(f"pid {pid} runs --config {config_arg}, not {path}", EXIT_FAILED)
    return pid


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
    return None


def _attempt(status: dict[str, object]) -> int:
    last = status.get("last_reload")
    attempt = last.get("attempt") if isinstance(last, dict) else None
    if not isinstance(attempt, int):
        raise Refused("/status says nothing of reloads: is this an older mtls-proxy? Send it SIGHUP yourself",
                      EXIT_FAILED)
    return attempt


def _wait(where: list[TCPAddress], before: int, timeout: float) -> dict[str, object]:
    """The ``last_reload`` of /status once its attempt count has moved past ``before``.

    With worker processes, an admin child from before the reload may answer for a moment, with the old count: it
    is asked again.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for address in where:
            status = _get_status(address)
            last = status.get("last_reload") if status is not None else None
            if isinstance(last, dict) and isinstance(last.get("attempt"), int) and last["attempt"] > before:
                return {str(key): value for key, value in last.items()}
        time.sleep(POLL_INTERVAL)
    raise Refused(f"no reload result within {timeout:g}s; the proxy's log says what happened (a reload it had no "
                  "file descriptors for is postponed to the next file check or SIGHUP)", EXIT_FAILED)


def _report(result: dict[str, object], path: Path, pid: int) -> int:
    if result.get("result") == "success":
        print(f"{path}: reloaded by pid {pid} at {result.get('time')}")
        return EXIT_OK
    print(f"mtls-proxy: error: pid {pid} could not reload {path}, and serves on with its previous configuration:\n"
          f"{result.get('error')}", file=sys.stderr)
    return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtls-proxy reload",
                                     description="Check a config file, then have the proxy running it reload it.")
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
