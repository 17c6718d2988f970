"""mtls-proxy (``mtls-proxy run --config FILE``, one worker) with a control thread that measures its memory.

Used by ``memprof.py`` for the breakdown of the RSS per idle TLS connection; never by the measured rows (the
control thread and tracemalloc cost memory and time). Commands arrive one per line on stdin, each naming the
file its JSON answer is written to (atomically, so the harness can poll for it):

``measure OUT [snapshot]``
    RSS, glibc's malloc statistics (``mallinfo2``: bytes in use in the heap and in mmap'd blocks), the number of
    objects the garbage collector tracks, by type, and, with ``snapshot`` while tracing, a tracemalloc snapshot
    dumped next to OUT (``OUT.snap``).
``trace OUT NFRAMES``
    ``tracemalloc.start(NFRAMES)``: Python allocations from now on are traced.

Run: ``python bench/traced_proxy.py CONFIG``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_stats() -> dict[str, float]:
    """glibc's view of the C heap, summed over its arenas: what malloc has handed out and not taken back. OpenSSL
    (in cryptography's ``_rust`` module), cffi buffers and Python's blocks over 512 bytes all come from here;
    Python's small objects come from pymalloc's arenas, which are mmap'd outside malloc."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return {}
    fn.restype = _Mallinfo2
    info = fn()
    return {"heap_kb": info.arena / 1024, "mmap_kb": info.hblkhd / 1024,
            "in_use_kb": (info.uordblks + info.hblkhd) / 1024, "free_in_heap_kb": info.fordblks / 1024}


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(out: Path, snapshot: bool) -> dict[str, object]:
    gc.collect()
    result: dict[str, object] = {"rss_kb": rss_kb(), "malloc": malloc_stats()}
    # The snapshot comes before the object census, whose own lists would otherwise be in it.
    if tracemalloc.is_tracing():
        result["traced_kb"] = tracemalloc.get_traced_memory()[0] / 1024
        if snapshot:
            snap = tracemalloc.take_snapshot()
            snap.dump(str(out) + ".snap")
            result["snapshot"] = str(out) + ".snap"
            del snap
    objects = gc.get_objects()
    types = Counter(type(o).__module__ + "." + type(o).__qualname__ for o in objects)
    del objects
    result.update(gc_objects=sum(types.values()), gc_types=dict(types.most_common(60)))
    return result


def _reply(out: Path, result: dict[str, object]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)


def control() -> None:
    for line in sys.stdin:
        words = line.split()
        if len(words) < 2:
            continue
        command, out = words[0], Path(words[1])
        try:
            if command == "measure":
                _reply(out, measure(out, snapshot="snapshot" in words[2:]))
            elif command == "trace":
                tracemalloc.start(int(words[2]) if len(words) > 2 else 1)
                _reply(out, {"tracing": True})
            else:
                _reply(out, {"error": f"unknown command {command!r}"})
        except Exception as exc:
            _reply(out, {"error": repr(exc)})


def main() -> int:
    threading.Thread(target=control, name="memprof-control", daemon=True).start()
    from proxy.cli import main as proxy_main

    return proxy_main(["run", "--config", sys.argv[1]])


if __name__ == "__main__":
    sys.exit(main())
