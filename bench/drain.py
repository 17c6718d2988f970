"""How long a SIGTERM drain takes past its deadline, with many idle mTLS connections open.

    python bench/drain.py --connections 9900 --drain-timeout 10

Starts `mtls-proxy run` in front of a backend that holds every connection, opens N mTLS connections that then
stay silent, sends SIGTERM, and reports when the process exited and how many access-log lines it wrote. The drain
contract: exit by drain_timeout plus a small constant, whatever N is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemonkit import (
    HoldingBackend,
    client_context,
    close_all,
    dev_pki,
    free_port,
    open_idle_tls,
    proxy_config,
    raise_own_fd_limit,
    start_daemon,
)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (the wall clock lies on a loaded machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile(pid: int, output: str):
    import subprocess

    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                            "--output", output, "--nonblocking"], stdout=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attaches
    return spy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--drain-timeout", type=float, default=2)
    parser.add_argument("--profile", metavar="FILE", help="py-spy the drain into FILE (collapsed stacks)")
    args = parser.parse_args()
    raise_own_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        pki = dev_pki(directory / "pki")
        backend = HoldingBackend()
        config = proxy_config(pki, backend.address, port=free_port(), admin_port=free_port(),
                              drain_timeout=args.drain_timeout,
                              listener={"max_connections": args.connections + 100})
        daemon = start_daemon(directory, config)
        clients = []
        try:
            started = time.monotonic()
            clients = open_idle_tls(daemon.port, client_context(pki), args.connections)
            print(f"{len(clients)} connections open in {time.monotonic() - started:.1f}s", flush=True)
            time.sleep(1)  # let the last backend connects land
            spy = _profile(daemon.proc.pid, args.profile) if args.profile else None
            cpu_before = _cpu_seconds(daemon.proc.pid)
            sent = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(daemon.proc.pid, 0)
            took = time.monotonic() - sent
            daemon.proc.returncode = code = os.waitstatus_to_exitcode(status)
            drain_cpu = usage.ru_utime + usage.ru_stime - cpu_before
            if spy is not None:
                spy.wait(30)
        finally:
            close_all(clients)
            daemon.stop()
            backend.close()
        text = daemon.log().splitlines()
        lines = [json.loads(line) for line in text if line.startswith("{")]
        for line in text:
            if not line.startswith("{"):
                print("log:", line)
        access = [line for line in lines if line.get("logger") == "proxy.access"]
        print(f"exit code {code} after {took:.2f}s (drain_timeout {args.drain_timeout}s, "
              f"over by {took - args.drain_timeout:.2f}s); CPU during the drain {drain_cpu:.2f}s; "
              f"access-log lines: {len(access)}")


if __name__ == "__main__":
    main()
