"""Profile a running mtls-proxy with py-spy while a load runs, and boil the samples down to the top frames.

``py-spy record --format raw`` writes collapsed stacks, one line per distinct stack: ``outer;...;inner COUNT``,
each frame ``function (file:line)``. Two views come out of it: *inclusive* (the share of samples in which a
function is anywhere on the stack: where the time goes, top-down) and *self* (the share in which it is the
innermost frame: what actually burns the CPU). Line numbers are dropped so a function's lines add up.

``--native`` adds the C frames (OpenSSL, the interpreter), which is what tells crypto from Python overhead. It
needs py-spy to pause the process for each sample, which slows it a little: the profiles are for shares, never
for the numbers in the tables (which are measured without py-spy attached). If native unwinding fails, the
profile is taken again without it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

RATE = 250
TOP = 15
_FRAME_RE = re.compile(r"^(.*) \(([^()]*?)(?::\d+)?\)$")


def executable() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return executable() is not None


def _split(frame: str) -> tuple[str, str]:
    """``function (where:line)`` -> (function, where without the line number)."""
    match = _FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip(), ""
    return match.group(1), match.group(2)


def _short(where: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def component(where: str) -> str:
    """Which part of the stack a frame belongs to, for the self-time roll-up."""
    w = _short(where)
    if "_rust.abi3.so" in w or "libcrypto" in w or "libssl" in w:
        return "OpenSSL 4 (linked into cryptography's _rust.abi3.so)"
    if w.startswith(("libc.so", "libpthread")):
        return "libc: system calls, malloc, memcpy"
    if w.endswith((".c", ".h")) or w.startswith(("python3", "libpython")):
        return "CPython interpreter (C), incl. the garbage collector"
    if "_cffi_backend" in w:
        return "cffi (pyOpenSSL's calls into OpenSSL)"
    if re.search(r"\.so(\.\d+)*$", w):
        return f"native: {w}"
    if w.startswith(("trio/", "outcome/", "sniffio/")):
        return "trio (Python)"
    if w.startswith("OpenSSL/"):
        return "pyOpenSSL (Python)"
    if w.startswith("cryptography/"):
        return "cryptography (Python)"
    if w.startswith("proxy/") or "/proxy/" in w:
        return "mtls-proxy (Python)"
    if w.startswith("prometheus_client/"):
        return "prometheus_client (Python)"
    if w.startswith("h11/"):
        return "h11 (Python; HTTP mode's parser)"
    if w.startswith(("<frozen abc>", "abc.py")):
        return "abc: isinstance() against abstract classes"
    return "Python stdlib and other"


def summarize(raw: str, top: int = TOP) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        names = [f"{function} ({_short(where)})" for function, where in frames]
        self_[names[-1]] += count
        parts[component(frames[-1][1])] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return {"samples": 0, "inclusive": [], "self": [], "components": []}
    # Frames on (nearly) every stack (runpy, main, trio.run) say nothing.
    # Unresolved native addresses (libc's thread entry) say nothing either.
    telling = [(name, n) for name, n in inclusive.most_common() if n < 0.99 * total and not name.startswith("0x")]
    return {
        "samples": total,
        "inclusive": [(name, 100.0 * n / total) for name, n in telling[:top]],
        "self": [(name, 100.0 * n / total) for name, n in self_.most_common(top)],
        "components": [(name, 100.0 * n / total) for name, n in parts.most_common()],
    }


def _record(pid: int, action: Callable[[], None], output: Path, cpu: int, native: bool) -> tuple[str, str]:
    cmd = ["taskset", "-c", str(cpu), executable() or "py-spy", "record", "--pid", str(pid), "--rate", str(RATE),
           "--format", "raw", "--output", str(output)]
    cmd += ["--native"] if native else ["--nonblocking"]
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        import time

        time.sleep(1.0)  # py-spy attaches
        action()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            out, _ = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            out, _ = spy.communicate()
    text = output.read_text(errors="replace") if output.exists() else ""
    return text, out.decode(errors="replace")


def record(pid: int, action: Callable[[], None], output: Path, *, description: str, cpu: int) -> dict[str, Any]:
    """Run ``action`` (a load) while py-spy samples ``pid``; return the summary."""
    try:
        raw, log = _record(pid, action, output.with_suffix(".native.txt"), cpu, native=True)
        mode = f"py-spy --native, {RATE} Hz"
        if not summarize(raw)["samples"]:
            raw, log = _record(pid, action, output.with_suffix(".txt"), cpu, native=False)
            mode = f"py-spy --nonblocking, {RATE} Hz (native unwinding failed: {log.strip()[-200:]})"
    except Exception as exc:
        return {"error": str(exc), "description": description}
    result = summarize(raw)
    if not result["samples"]:
        return {"error": f"py-spy recorded nothing: {log.strip()[-300:]}", "description": description}
    return {**result, "description": description, "mode": mode}
