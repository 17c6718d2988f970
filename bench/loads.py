"""Load generators: parallel ``openssl s_time``, ``wrk``, ``h2load``, the bulk and idle clients of ``clients.py``,
and ``openssl s_client`` as the second bulk client.

Each function starts its processes, waits for them (every one bounded by a timeout: a stuck client is killed and
reported, never waited on forever), and parses what they print. The caller wraps the call in a
:class:`procfs.Window`, so everything here must have reaped its children by the time it returns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRACE = 20.0  # seconds a client may run past its own duration before it is killed


class LoadError(RuntimeError):
    """A load generator failed: the run has no valid numbers."""


def _run_all(cmds: list[list[str]], timeout: float, env: dict[str, str] | None = None) -> list[str]:
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env)
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


# ---- h2load ------------------------------------------------------------------------------------------------------

PRELOAD_SOURCE = HERE / "h2load_cert.c"


def h2load_preload(directory: Path) -> Path:
    """Build ``h2load_cert.c`` (the LD_PRELOAD library that gives h2load the client certificate) into
    ``directory``, once, and return the library's path. h2load has no option for a client certificate; the source
    says why this is the way."""
    library = directory / "h2load_cert.so"
    if library.exists():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise LoadError(f"no C compiler (cc) to build {PRELOAD_SOURCE.name}, which gives h2load the client "
                        "certificate (apt-get install gcc libc6-dev)")
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(PRELOAD_SOURCE), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LoadError(f"cannot build {PRELOAD_SOURCE.name}: {(proc.stdout + proc.stderr)[-600:]}")
    return library


@dataclass
class H2loadResult:
    requests: int  # the ones that succeeded (2xx); the CPU figure is per succeeded request
    seconds: float
    mean_us: float  # mean time from a request's HEADERS to the end of its response
    max_us: float
    protocol: str  # what ALPN chose: must be h2
    errors: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_H2_FINISHED_RE = re.compile(r"^finished in ([\d.]+)(us|ms|s|m), ", re.M)
_H2_REQUESTS_RE = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                             r"(\d+) errored, (\d+) timeout", re.M)
_H2_TIME_RE = re.compile(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


def h2load(port: int, pki: Path, preload: Path | None, *, connections: int, streams: int, seconds: int = 0,
           requests: int = 0) -> H2loadResult:
    """``h2load -c connections -m streams`` over TLS 1.3, ALPN h2 only, for ``seconds`` (``-D``) or for
    ``requests`` in all (``-n``), with the client certificate when ``preload`` (see :func:`h2load_preload`) is
    given.

    The URL names ``localhost``, the checks' server name, and ``--connect-to`` sends the connections to
    127.0.0.1: h2load sends no SNI for an IP address, and Traefik answers 421 (Misdirected Request) when the SNI
    chose other TLS options than the router's. In a timed run the requests still open when the time is up are
    not counted, as wrk does not count them.
    """
    url = f"https://localhost:{port}/"
    bound = ["-D", str(seconds)] if seconds else ["-n", str(requests)]
    cmd = ["h2load", "-t", "1", "-c", str(connections), "-m", str(streams), *bound, "--npn-list=h2",
           f"--connect-to=127.0.0.1:{port}", url]
    env = None
    if preload is not None:
        env = {**os.environ, "LD_PRELOAD": str(preload), "H2LOAD_CLIENT_CERT": str(pki / "client.crt"),
               "H2LOAD_CLIENT_KEY": str(pki / "client.key")}
    (out,) = _run_all([cmd], timeout=(seconds or 10) + GRACE, env=env)
    finished, counts, times = _H2_FINISHED_RE.search(out), _H2_REQUESTS_RE.search(out), _H2_TIME_RE.search(out)
    if not (finished and counts and times):
        raise LoadError(f"h2load printed no result: {out[-600:]}")
    protocol = re.search(r"^Application protocol: (\S+)", out, re.M)
    chosen = protocol.group(1) if protocol else "none"
    if chosen != "h2":
        raise LoadError(f"h2load did not speak HTTP/2 (ALPN: {chosen}): {out[-400:]}")
    _total, _started, _done, succeeded, failed, errored, timed_out = (int(v) for v in counts.groups())
    if not succeeded:
        raise LoadError(f"no h2load request succeeded: {counts.group(0)}")
    errors = f"{failed} failed, {errored} errored, {timed_out} timed out" if failed or errored or timed_out else ""
    return H2loadResult(succeeded, _micros(finished.group(1) + finished.group(2)) / 1e6,
                        _micros(times.group(3)), _micros(times.group(2)), chosen, errors)


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


def bulk_s_client(port: int, pki: Path, direction: str, count: int) -> dict[str, float]:
    """The bulk run with a second, independent client: ``openssl s_client``, OpenSSL's own C client.

    Its buffering differs from ``clients.py``'s (it moves 16 KiB between stdin/stdout and TLS per call, where the
    Python client hands ``ssl`` 1 MiB at a time). This process feeds its stdin (``SINK n`` and n zero bytes) or
    drains its stdout (``SOURCE n``, then n bytes), so the run ends when the backend confirmed the upload or the
    last byte of the download arrived, not when s_client closed its end. ``-quiet`` keeps s_client's stdout to
    the connection's data (and makes it ignore its stdin's EOF, so it is stopped here once the run is over).
    """
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
           "-cert", str(pki / "client.crt"), "-key", str(pki / "client.key"), "-CAfile", str(pki / "ca.crt")]
    deadline = time.monotonic() + count / 20e6 + GRACE
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    started = time.perf_counter()
    try:
        if direction == "up":
            proc.stdin.write(b"SINK %d\n" % count)
            piece = bytes(1 << 20)
            left = count
            while left:
                size = min(len(piece), left)
                proc.stdin.write(piece[:size])
                left -= size
            proc.stdin.flush()
            answer = proc.stdout.read(3)
            if answer != b"OK\n":
                raise LoadError(f"the backend did not confirm the upload through s_client: {answer!r}")
        else:
            proc.stdin.write(b"SOURCE %d\n" % count)
            proc.stdin.flush()
            got = 0
            while got < count and time.monotonic() < deadline:
                chunk = proc.stdout.read1(1 << 20)
                if not chunk:
                    raise LoadError(f"s_client's download ended after {got} of {count} bytes")
                got += len(chunk)
        seconds = time.perf_counter() - started
        if time.monotonic() > deadline:
            raise LoadError("the s_client bulk run took longer than its deadline")
    finally:
        proc.kill()
        proc.communicate()
    return {"bytes": count, "seconds": seconds, "mb_per_s": count / seconds / 1e6}


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
