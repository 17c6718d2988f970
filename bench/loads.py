"""Load generators: parallel ``openssl s_time``, ``wrk``, and the bulk and idle clients of ``clients.py``.

Each function starts its processes, waits for them (every one bounded by a timeout: a stuck client is killed and
reported, never waited on forever), and parses what they print. The caller wraps the call in a
:class:`procfs.Window`, so everything here must have reaped its children by the time it returns.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRACE = 20.0  # seconds a client may run past its own duration before it is killed


class LoadError(RuntimeError):
    """A load generator failed: the run has no valid numbers."""


def _run_all(cmds: list[list[str]], timeout: float) -> list[str]:
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for cmd in cmds]
    outs = []
    failed = []
    for proc, cmd in zip(procs, cmds, strict=False):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failed.append(f"{cmd[0]} timed out after {timeout:.0f}s")
        text = out.decode(errors="replace")
        if proc.returncode not in (0, None) and not failed:
            failed.append(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {text[-400:]}")
        outs.append(text)
    if failed:
        raise LoadError("; ".join(failed))
    return outs


# ---- openssl s_time ---------------------------------------------------------------------------------------------

_S_TIME_RE = re.compile(r"(\d+) connections in ([\d.]+) real seconds")


@dataclass
class HandshakeResult:
    connections: int
    reused: int
    seconds: float  # the longest of the clients' own timings

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0


def s_time(port: int, pki: Path, *, reuse: bool, clients: int, seconds: int) -> HandshakeResult:
    """``clients`` parallel ``openssl s_time -new|-reuse -www /`` over TLS 1.3 with the client certificate.

    ``-www /`` makes every connection one small HTTP/1.0 request through to the backend and back, the issue's
    "new connection + one small request". ``s_time`` prints one character per connection: ``r`` when the
    session was resumed, which the resumed run uses to prove that resumption really happened.
    """
    cmd = [
        "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse" if reuse else "-new", "-time", str(seconds),
        "-www", "/", "-tls1_3", "-cert", str(pki / "client.crt"), "-key", str(pki / "client.key"),
        "-CAfile", str(pki / "ca.crt"),
    ]
    outs = _run_all([cmd] * clients, timeout=seconds + GRACE)
    total = reused = 0
    longest = 0.0
    for out in outs:
        match = _S_TIME_RE.search(out)
        if not match:
            raise LoadError(f"s_time printed no result: {out[-400:]}")
        total += int(match.group(1))
        longest = max(longest, float(match.group(2)))
        # The progress characters (one per connection) are lines of only '*' and 'r', before the summary.
        progress = [line for line in out[: match.start()].splitlines() if line and set(line) <= {"*", "r"}]
        reused += sum(line.count("r") for line in progress)
    if total == 0:
        raise LoadError("s_time made no connection")
    return HandshakeResult(total, reused, longest)


# ---- wrk --------------------------------------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise LoadError(f"cannot read the wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    errors: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(url: str, *, connections: int, seconds: int) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    (out,) = _run_all([cmd], timeout=seconds + GRACE)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (total and p50 and p99):
        raise LoadError(f"wrk printed no result: {out[-600:]}")
    errors = []
    sock = re.search(r"Socket errors: (.*)", out)
    if sock:
        errors.append("socket errors: " + sock.group(1).strip())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx responses")
    seconds_taken = _micros(total.group(2) + total.group(3)) / 1e6
    return WrkResult(int(total.group(1)), seconds_taken, _micros(p50.group(1)), _micros(p99.group(1)),
                     "; ".join(errors))


# ---- clients.py -------------------------------------------------------------------------------------------------


def bulk(port: int, pki: Path, direction: str, count: int) -> dict[str, float]:
    cmd = [sys.executable, str(HERE / "clients.py"), "bulk", "--port", str(port), "--pki", str(pki),
           "--direction", direction, "--bytes", str(count)]
    # Generous: 256 MiB at a pessimistic 20 MB/s.
    (out,) = _run_all([cmd], timeout=count / 20e6 + GRACE)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LoadError(f"the bulk client printed no result: {out[-400:]}") from None


class IdleClients:
    """``clients.py idle`` as a context manager: open N connections, hold them, close them on exit."""

    def __init__(self, port: int, pki: Path, count: int) -> None:
        self.count = count
        self.timeout = max(60.0, count * 0.05)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "clients.py"), "idle", "--port", str(port), "--pki", str(pki),
             "--count", str(count), "--hold", str(self.timeout + 120)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def __enter__(self) -> IdleClients:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            self.proc.kill()
            rest, _ = self.proc.communicate()
            tail = (line + (rest or "")).strip().splitlines()[-3:]
            raise LoadError(f"the idle client did not open {self.count} connections: {' | '.join(tail)}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("close\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
