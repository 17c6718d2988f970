"""What the benchmark reads from /proc: CPU time and memory of process trees, and the CPU everyone else used.

CPU time is ``utime + stime`` from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks). That figure covers every
thread of the process. A process tree (nginx's master and worker) is found by following ``ppid`` through a scan of
``/proc``, so the workers a peer forks are counted without knowing about them in advance.

Foreign load is what ran on the machine during a measurement window that the benchmark did not start: the busy
ticks of ``/proc/stat`` (user + nice + system) minus the CPU time of our own processes. It is found two ways,
and the larger is used:

* a scan of every process alive at both ends of the window (or born inside it), minus ours and minus kernel
  threads (``ksoftirqd`` and ``kworker`` mostly do our own loopback networking);
* the residual ``busy - ours - kernel threads - scanned foreign``, which catches short-lived processes that came
  and went inside the window (a test suite spawning ``curl`` and ``openssl``), which no scan ever sees.

Our own processes are: the harness itself, the long-lived children it reads from /proc (peers, backend), and
the short-lived load generators, which it has reaped by the end of the window and so finds in
``getrusage(RUSAGE_CHILDREN)``.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
KTHREADD = 2


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    ticks: int  # utime + stime, all threads
    start: int  # start time in ticks since boot: tells a recycled pid from the original


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    head, _, rest = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    # rest starts at field 3 (state): ppid is field 4, utime 14, stime 15, starttime 22.
    return ProcStat(pid, comm, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]))


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def scan() -> dict[int, ProcStat]:
    out = {}
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is not None:
            out[pid] = stat
    return out


def descendants(root: int, table: dict[int, ProcStat] | None = None) -> list[int]:
    """``root`` and every process below it."""
    table = scan() if table is None else table
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    table = scan()
    return sum(table[pid].ticks for pid in descendants(root, table)) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kb(root: int, key: str) -> int:
    """Sum of a status field over a process tree. For nginx (master + worker) that counts shared pages twice,
    which is what ``ps`` users see too; the README says so."""
    return sum(status_kb(pid, key) for pid in descendants(root))


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def system_busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system = int(fields[1]), int(fields[2]), int(fields[3])
    return user + nice + system


def per_cpu_busy_ticks() -> dict[int, tuple[int, int, int]]:
    """cpu number -> (busy ticks, total ticks, softirq ticks), from /proc/stat.

    softirq is listed because this kernel accounts it apart (IRQ time accounting): loopback TCP receive work done
    in softirq context lands there, in nobody's utime/stime. On the proxy's core it is mostly the proxy's own
    sends; the conditions table shows it next to the proxy's CPU so that no peer hides cost in it.
    """
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                fields = line.split()
                values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                idle = values[3] + values[4]
                out[int(fields[0][3:])] = (sum(values) - idle, sum(values), values[6])
    return out


def _self_and_children_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _is_kernel_thread(stat: ProcStat) -> bool:
    return stat.pid == KTHREADD or stat.ppid == KTHREADD


@dataclass
class Window:
    """Accounting for one measurement: call :meth:`start`, run the load (reaping the load generators),
    call :meth:`stop`. ``ours`` lists the roots of the long-lived process trees we started."""

    ours: Iterable[int]
    watch: dict[str, int] = field(default_factory=dict)  # label -> root pid whose CPU seconds are reported
    cpus: Iterable[int] = ()

    def start(self) -> Window:
        self._roots = list(self.ours)
        self._t0 = time.monotonic()
        self._busy0 = system_busy_ticks()
        self._cpu0 = per_cpu_busy_ticks()
        self._table0 = scan()
        self._self0 = _self_and_children_seconds()
        self._watch0 = {label: self._tree_ticks(pid, self._table0) for label, pid in self.watch.items()}
        return self

    @staticmethod
    def _tree_ticks(root: int, table: dict[int, ProcStat]) -> int:
        return sum(table[pid].ticks for pid in descendants(root, table))

    def stop(self) -> dict[str, object]:
        table1 = scan()
        busy1 = system_busy_ticks()
        cpu1 = per_cpu_busy_ticks()
        self_seconds = _self_and_children_seconds() - self._self0
        elapsed = time.monotonic() - self._t0
        table0 = self._table0

        mine = {os.getpid()}
        for root in self._roots:
            mine.update(descendants(root, table0))
            mine.update(descendants(root, table1))

        def delta(pid: int) -> int:
            new = table1[pid]
            old = table0.get(pid)
            if old is None or old.start != new.start:  # born in the window
                return new.ticks
            return new.ticks - old.ticks

        ours_ticks = sum(delta(pid) for pid in mine if pid in table1 and pid != os.getpid())
        kernel_ticks = sum(delta(pid) for pid, st in table1.items() if _is_kernel_thread(st))
        foreign: dict[str, float] = {}
        for pid, st in table1.items():
            if pid in mine or _is_kernel_thread(st):
                continue
            d = delta(pid)
            if d > 0:
                key = f"{st.comm}[{pid}]"
                foreign[key] = foreign.get(key, 0) + d / CLK_TCK
        scanned = sum(foreign.values())
        busy = (busy1 - self._busy0) / CLK_TCK
        ours = ours_ticks / CLK_TCK + self_seconds
        residual = busy - ours - kernel_ticks / CLK_TCK - scanned
        top = sorted(foreign.items(), key=lambda kv: -kv[1])[:5]
        watched = {
            label: (self._tree_ticks(pid, table1) - self._watch0[label]) / CLK_TCK for label, pid in self.watch.items()
        }
        # The same per process of each watched tree (a multi-process peer: how the work spread over its workers).
        per_process = {
            label: {f"{table1[p].comm}[{p}]": delta(p) / CLK_TCK for p in descendants(root, table1)}
            for label, root in self.watch.items()
        }
        cpu_util, softirq = {}, {}
        for cpu in self.cpus:
            if cpu in cpu1 and cpu in self._cpu0:
                b = cpu1[cpu][0] - self._cpu0[cpu][0]
                t = cpu1[cpu][1] - self._cpu0[cpu][1]
                cpu_util[cpu] = b / t if t else 0.0
                softirq[cpu] = (cpu1[cpu][2] - self._cpu0[cpu][2]) / CLK_TCK
        return {
            "elapsed": elapsed,
            "cpu": watched,
            "per_process": per_process,
            "cpu_util": cpu_util,
            "softirq": softirq,
            "busy": busy,
            "ours": ours,
            "kernel": kernel_ticks / CLK_TCK,
            "foreign": scanned + max(0.0, residual),
            "foreign_scanned": scanned,
            "residual": residual,
            "foreign_top": top,
        }


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp): each holds a local port for 60 s."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                count += sum(1 for line in f if line.split(None, 4)[3] == "06")
        except OSError:
            pass
    return count
