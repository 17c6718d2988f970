"""What the RSS of an idle TLS connection through mtls-proxy is made of.

A separate mtls-proxy (``traced_proxy.py``: the same config as the measured row, without the HTTP listeners, with a
control thread) is started on the proxy core after the measurements. Two phases, each with N idle mTLS
connections through to the backend (``clients.py idle``):

1. untraced: RSS and glibc's malloc statistics before and with the N connections open;
2. traced: the same under ``tracemalloc`` (started after the first phase, so it traces only what the connections
   allocate), with a snapshot before and with the N connections.

Per connection that gives: the RSS; what malloc has handed out (OpenSSL's SSL objects and buffers, cffi's buffers,
and Python's blocks over 512 bytes); the Python allocations tracemalloc sees, split into small blocks (pymalloc's
arenas, outside malloc) and large ones (from malloc); so the C allocations that are not Python's are malloc's
figure less Python's large blocks. The top allocation sites and the objects the garbage collector tracks say
which Python objects they are. tracemalloc costs time and memory of its own: only its traced sizes are used, never
the RSS of the traced phase.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loads
from peers import MtlsProxy, PeerError

HERE = Path(__file__).resolve().parent
NFRAMES = 12
SMALL = 512  # pymalloc serves requests up to this many bytes; larger ones go to malloc
TOP = 12


class TracedMtlsProxy(MtlsProxy):
    """mtls-proxy under ``traced_proxy.py``, with a pipe to its control thread."""

    def write_config(self) -> list[str]:
        cmd = super().write_config()
        return [sys.executable, str(HERE / "traced_proxy.py"), cmd[-1]]

    def launch(self) -> None:
        cmd = self.write_config()
        self.stdout = open(self.workdir / "stdout.log", "wb")
        self.stderr = open(self.workdir / "stderr.log", "wb")
        self.proc = subprocess.Popen(["taskset", "-c", self.cpus, *cmd], stdin=subprocess.PIPE, stdout=self.stdout,
                                     stderr=self.stderr, cwd=self.workdir, start_new_session=True)
        self._replies = 0

    def command(self, *words: str, timeout: float = 120.0) -> dict[str, Any]:
        self._replies += 1
        out = self.workdir / f"reply-{self._replies}.json"
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{words[0]} {out} {' '.join(words[1:])}\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not out.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise PeerError(f"the traced proxy did not answer {words[0]!r} in {timeout:.0f}s")
            time.sleep(0.05)
        reply = json.loads(out.read_text())
        if "error" in reply:
            raise PeerError(f"the traced proxy failed {words[0]!r}: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        super().stop()


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1].lstrip("/").removeprefix(".11/").removeprefix(".12/")
    return filename


def _component(filename: str) -> str:
    f = _short(filename)
    if f.startswith(("trio/", "outcome/", "sniffio/")):
        return "trio"
    if f.startswith("OpenSSL/"):
        return "pyOpenSSL"
    if f.startswith("cryptography/"):
        return "cryptography"
    if f.startswith("proxy/"):
        return "mtls-proxy"
    if f.startswith("prometheus_client/"):
        return "prometheus_client"
    if f.startswith("h11/"):
        return "h11"
    return "stdlib and other"


def _proxy_frame(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame in mtls-proxy's own code: which of its code paths made the allocation (``cli.py``,
    where ``trio.run`` starts, says nothing and is left out)."""
    for frame in reversed(traceback):  # a Traceback runs from the oldest frame to the most recent
        if "/proxy/" in frame.filename and not frame.filename.endswith("/proxy/cli.py"):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return f"(none in the innermost {NFRAMES} frames)"


def analyse(before: Path, after: Path, count: int) -> dict[str, Any]:
    """Per-connection Python allocations between two snapshots."""
    snap0 = tracemalloc.Snapshot.load(str(before))
    snap1 = tracemalloc.Snapshot.load(str(after))
    # The control thread's own work is not the connections' (it takes the snapshot before anything else).
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "*/traced_proxy.py")]
    snap0, snap1 = snap0.filter_traces(exclude), snap1.filter_traces(exclude)

    def split(snap: tracemalloc.Snapshot) -> tuple[int, int, int]:
        small = large = blocks = 0
        for trace in snap.traces:
            blocks += 1
            if trace.size > SMALL:
                large += trace.size
            else:
                small += trace.size
        return small, large, blocks

    s0, l0, b0 = split(snap0)
    s1, l1, b1 = split(snap1)
    diffs = snap1.compare_to(snap0, "traceback")
    by_component: Counter[str] = Counter()
    by_proxy_frame: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    for diff in diffs:
        if not diff.size_diff:
            continue
        inner = diff.traceback[-1]  # the most recent frame: where the allocation was made
        by_component[_component(inner.filename)] += diff.size_diff
        by_line[f"{_short(inner.filename)}:{inner.lineno}"] += diff.size_diff
        by_proxy_frame[_proxy_frame(diff.traceback)] += diff.size_diff

    def per_conn(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / count / 1024) for k, v in counter.most_common(TOP) if v > 0]

    return {
        "python_kb": (s1 + l1 - s0 - l0) / count / 1024,
        "python_small_kb": (s1 - s0) / count / 1024,
        "python_large_kb": (l1 - l0) / count / 1024,
        "python_blocks": (b1 - b0) / count,
        "by_component": per_conn(by_component),
        "by_line": per_conn(by_line),
        "by_proxy_frame": per_conn(by_proxy_frame),
    }


def breakdown(pki: Path, backend_port: int, workdir: Path, *, count: int, cpu: int, settle: float,
              wait_for_ports: Callable[[int], None]) -> dict[str, Any]:
    peer = TracedMtlsProxy(spec="mtls-proxy (traced)", options={"http": "off"}, workdir=workdir, pki=pki,
                           backend_port=backend_port, proxy_cpus=str(cpu))
    try:
        peer.start()
        time.sleep(settle)
        wait_for_ports(count)
        base = peer.command("measure")
        with loads.IdleClients(peer.require_port, pki, count):
            time.sleep(settle)
            loaded = peer.command("measure")
        wait_for_ports(count)
        peer.command("trace", str(NFRAMES))
        time.sleep(settle)
        t0 = peer.command("measure", "snapshot")
        with loads.IdleClients(peer.require_port, pki, count):
            time.sleep(settle)
            t1 = peer.command("measure", "snapshot", timeout=300)
    except (PeerError, loads.LoadError, OSError) as exc:
        return {"error": str(exc)}
    finally:
        peer.stop()
    python = analyse(Path(t0["snapshot"]), Path(t1["snapshot"]), count)
    m0, m1 = base.get("malloc", {}), loaded.get("malloc", {})
    malloc_kb = (m1["in_use_kb"] - m0["in_use_kb"]) / count if m0 and m1 else None
    rss = (loaded["rss_kb"] - base["rss_kb"]) / count
    types0, types1 = Counter(base["gc_types"]), Counter(loaded["gc_types"])
    types1.subtract(types0)
    result = {
        "count": count,
        "rss_kb": rss,
        "malloc_kb": malloc_kb,
        "gc_objects": (loaded["gc_objects"] - base["gc_objects"]) / count,
        "gc_types": [(name, n / count) for name, n in types1.most_common(TOP) if n > 0],
        **python,
    }
    if malloc_kb is not None:
        # malloc's growth holds Python's large blocks and every C allocation; the rest of the RSS is pymalloc's
        # small blocks and whatever neither allocator counts as in use (free lists, partly used pages).
        result["native_kb"] = malloc_kb - python["python_large_kb"]
        result["other_kb"] = rss - malloc_kb - python["python_small_kb"]
    return result
