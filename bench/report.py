"""Turn the collected numbers into Markdown tables: CPU per unit (the headline), rates, memory, the checks, the
measurement conditions, the issue-5 targets, and the profiles."""

from __future__ import annotations

import statistics
from typing import Any

BASE = "nginx"

# (key, label, unit, format): CPU on the proxy's core per unit of work. Lower is better.
CPU_UNITS = [
    ("full", "full mTLS handshake", "ms", "{:.3f}"),
    ("resumed", "resumed handshake", "ms", "{:.3f}"),
    ("bulk_up", "bulk up, per GB", "s", "{:.3f}"),
    ("bulk_down", "bulk down, per GB", "s", "{:.3f}"),
    ("wrk", "kept-alive request (wrk)", "µs", "{:.1f}"),
]

# Issue 5: (key, what, limit as a ratio to nginx).
RATIO_TARGETS = [
    ("full", "full mTLS handshake", 1.0),
    ("resumed", "resumed handshake", 1.3),
    ("bulk_up", "bulk transfer per GB, client → backend", 1.2),
    ("bulk_down", "bulk transfer per GB, backend → client", 1.2),
    ("wrk", "small requests on kept-alive connections, TCP mode", 2.0),
]
IDLE_RSS_LIMIT_MB = 60.0
PER_CONN_LIMIT_KB = 40.0
PER_CONN_TARGET_AT = 5000


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median of one field over the kept run of every repetition."""
    return median([r[key] for r in runs if r.get("ok") and r.get(key) is not None])


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}×)"


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    if value is None:
        return "–"
    return fmt.format(value) + (f" {unit}" if unit else "")


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_table(data: dict[str, Any], suffix: str = "_cpu") -> str:
    peers = data["peers"]
    base = peers.get(BASE, {}).get("summary", {})
    rows = []
    for spec, peer in peers.items():
        s = peer.get("summary", {})
        row = [f"**{spec}**" if spec.startswith("mtls-proxy") else spec]
        for key, _, unit, fmt in CPU_UNITS:
            value = s.get(f"{key}{suffix}")
            mark = " †" if disturbed(peer, key) else ""
            row.append(_cell(value, fmt, unit) + _ratio(value, base.get(f"{key}{suffix}")) + mark)
        rows.append(row)
    return table(["peer", *[label for _, label, _, _ in CPU_UNITS]], rows)


def disturbed(peer: dict[str, Any], test: str) -> bool:
    return any(r.get("disturbed") for r in peer.get("runs", {}).get(test, []) if r.get("kept"))


def rate_table(data: dict[str, Any]) -> str:
    rows = []
    base = data["peers"].get(BASE, {}).get("summary", {})
    for spec, peer in data["peers"].items():
        s = peer.get("summary", {})
        reused = s.get("resumed_reused")
        rows.append([
            spec,
            _cell(s.get("full_rate"), "{:.0f}") + _ratio(s.get("full_rate"), base.get("full_rate")),
            _cell(s.get("resumed_rate"), "{:.0f}") + _ratio(s.get("resumed_rate"), base.get("resumed_rate"))
            + (f", {reused:.0%} reused" if reused is not None else ""),
            _cell(s.get("bulk_up_rate"), "{:.0f}") + _ratio(s.get("bulk_up_rate"), base.get("bulk_up_rate")),
            _cell(s.get("bulk_down_rate"), "{:.0f}") + _ratio(s.get("bulk_down_rate"), base.get("bulk_down_rate")),
            _cell(s.get("wrk_rate"), "{:.0f}") + _ratio(s.get("wrk_rate"), base.get("wrk_rate")),
            _cell(s.get("wrk_p50"), "{:.0f}", "µs"),
            _cell(s.get("wrk_p99"), "{:.0f}", "µs"),
        ])
    return table(["peer", "full hs/s", "resumed hs/s", "up MB/s", "down MB/s", "wrk req/s", "p50", "p99"], rows)


def latency_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        lat = peer.get("latency")
        if not lat:
            rows.append([spec, "–", "–", "–"])
            continue
        rows.append([
            spec,
            f"{lat['nodelay']['handshake_ms']:.1f} ms",
            f"{lat['nodelay']['first_response_ms']:.1f} ms",
            f"{lat['no_nodelay']['first_response_ms']:.1f} ms",
        ])
    return table(["peer", "connect + mTLS handshake", "first request → response, client with TCP_NODELAY",
                  "same, client without TCP_NODELAY"], rows)


def memory_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        m = peer.get("memory", {})
        idle = m.get("idle")
        rows.append([
            spec,
            _cell(m.get("idle_rss_kb", 0) / 1024 if m.get("idle_rss_kb") else None, "{:.1f}", "MB"),
            _cell(m.get("peak_rss_kb", 0) / 1024 if m.get("peak_rss_kb") else None, "{:.1f}", "MB"),
            (f"{idle['count']}: " + _cell(idle["rss_after_kb"] / 1024, "{:.1f}", "MB")) if idle else "–",
            _cell(idle["per_conn_kb"], "{:.1f}", "KB") if idle else "–",
            _cell(m.get("final_hwm_kb", 0) / 1024 if m.get("final_hwm_kb") else None, "{:.1f}", "MB"),
        ])
    return table(["peer", "idle RSS", "peak RSS under load (VmHWM)", "RSS with N idle TLS conns",
                  "per idle conn", "VmHWM at the end"], rows)


def checks_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        c = peer.get("checks")
        if not c:
            rows.append([spec, "–", "–", "–", "–", "–", peer.get("error", "")[:120]])
            continue
        rows.append([
            spec,
            *[("refused" if not c[k]["reached"] else "**ADMITTED**") for k in ("no_cert", "other_ca")],
            "admitted" if c["good"]["reached"] else "**REFUSED**",
            "admitted" if c["optional_no_cert"]["reached"] else "**REFUSED**",
            str(c["backend_connections_from_refused"]),
            "ok" if c["ok"] else "**MISCONFIGURED, not measured**",
        ])
    return table(["peer", "no client cert", "cert from another CA", "good cert",
                  "optional port, no cert", "refused clients that reached the backend", "verdict"], rows,
                 align="llllll" + "l")


def conditions_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        for test, runs in peer.get("runs", {}).items():
            kept = [r for r in runs if r.get("kept")]
            if not kept:
                continue
            attempts = sum(len(r.get("attempts", [])) for r in kept) or len(kept)
            proxy = median([r["proxy_busy"] for r in kept])
            load = median([r["load_core_busy"] for r in kept])
            backend = median([r["backend_busy"] for r in kept])
            softirq = median([r.get("proxy_core_softirq_s", 0.0) / r["proxy_cpu_s"] for r in kept
                              if r.get("proxy_cpu_s")])
            rows.append([
                spec, test, f"{proxy:.0%}", f"{softirq:.0%}" if softirq is not None else "–", f"{load:.0%}",
                f"{backend:.0%}",
                f"{max(r['foreign_share'] for r in kept):.1%}" + (" †" if disturbed(peer, test) else ""),
                f"{len(kept)}/{attempts}", limit(proxy, load, backend),
            ])
    return table(["peer", "run", "proxy CPU (of one core)", "softirq on the proxy core (vs proxy CPU)",
                  "load core busy", "backend CPU", "foreign CPU (worst kept run)", "runs kept / attempts",
                  "what limited the rate"], rows, align="ll" + "r" * 6 + "l")


def limit(proxy: float, load: float, backend: float) -> str:
    """What most likely capped the rate of a run (the CPU figures are valid either way)."""
    if backend >= 0.8:
        return "the backend"
    if proxy >= 0.85 and load >= 0.95:
        return "both cores"
    if proxy >= 0.85:
        return "the proxy"
    if load >= 0.95:
        return "the load core (clients + backend)"
    return "latency (neither core full)"


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(peer, target, limit, measured, verdict) for every mtls-proxy row."""
    out = []
    base = data["peers"].get(BASE, {}).get("summary", {})
    for spec, peer in data["peers"].items():
        if not spec.startswith("mtls-proxy"):
            continue
        s = peer.get("summary", {})
        for key, what, limit in RATIO_TARGETS:
            value, ref = s.get(f"{key}_cpu"), base.get(f"{key}_cpu")
            if value is None or not ref:
                out.append((spec, what, f"≤ {limit:.1f}× nginx", "not measured", "–"))
                continue
            ratio = value / ref
            verdict = "met" if ratio <= limit else f"missed by {ratio / limit - 1:.0%}"
            si, si_ref = s.get(f"{key}_cpu_si"), base.get(f"{key}_cpu_si")
            if si and si_ref:
                verdict += f" (with softirq: {si / si_ref:.2f}×)"
            out.append((spec, what, f"≤ {limit:.1f}× nginx", f"{ratio:.2f}×", verdict))
        out.append((spec, "small requests on kept-alive connections, HTTP identity mode", "≤ 3.0× nginx",
                    "not measured", "– (the HTTP identity mode is not wired into the proxy yet)"))
        m = peer.get("memory", {})
        idle_kb = m.get("idle_rss_kb")
        if idle_kb:
            mb = idle_kb / 1024
            out.append((spec, "RSS of one worker at idle", f"< {IDLE_RSS_LIMIT_MB:.0f} MB", f"{mb:.1f} MB",
                        "met" if mb < IDLE_RSS_LIMIT_MB else f"missed by {mb / IDLE_RSS_LIMIT_MB - 1:.0%}"))
        idle = m.get("idle")
        if idle:
            kb = idle["per_conn_kb"]
            note = "" if idle["count"] >= PER_CONN_TARGET_AT else f" (measured at {idle['count']}, not 5,000)"
            out.append((spec, f"RSS per additional idle TLS connection at {PER_CONN_TARGET_AT:,}",
                        f"< {PER_CONN_LIMIT_KB:.0f} KB", f"{kb:.1f} KB at {idle['count']:,}",
                        ("met" if kb < PER_CONN_LIMIT_KB else f"missed by {kb / PER_CONN_LIMIT_KB - 1:.0%}") + note))
    return out


def targets_table(data: dict[str, Any]) -> str:
    rows = [list(t) for t in targets(data)]
    return table(["peer", "target (issue 5)", "limit", "measured", "verdict"], rows, align="lllrl")


def _fn(name: str, width: int = 100) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def profile_section(profiles: dict[str, Any]) -> str:
    parts = []
    for name, prof in profiles.items():
        if "error" in prof:
            parts.append(f"### {name}\n\nno profile: {prof['error']}\n")
            continue
        parts.append(f"### {name}\n\n{prof['description']}; {prof['samples']:,} samples "
                     f"({prof['mode']}).\n")
        parts.append("Self time by component (innermost frame of each sample):\n")
        parts.append(table(["%", "component"], [[f"{p:.1f}", c] for c, p in prof.get("components", [])],
                           align="rl"))
        parts.append("\nInclusive (the share of samples in which the function is on the stack; frames on every "
                     "stack left out):\n")
        parts.append(table(["%", "function"], [[f"{p:.1f}", f"`{_fn(f)}`"] for f, p in prof["inclusive"]], align="rl"))
        parts.append("\nSelf (the share of samples in which it is the innermost frame):\n")
        parts.append(table(["%", "function"], [[f"{p:.1f}", f"`{_fn(f)}`"] for f, p in prof["self"]], align="rl"))
        parts.append("")
    return "\n".join(parts)


def render(data: dict[str, Any], *, with_profiles: bool = True) -> str:
    s = data["settings"]
    out = [
        "## CPU per unit of work on the proxy's core (the headline; lower is better; ratio to nginx)\n",
        f"Median of {s['reps']} run(s) each. Full handshake = a new TLS 1.3 connection with the client certificate "
        "and one small HTTP/1.0 request through to the backend (`openssl s_time -new -www /`); resumed = the same "
        "with `-reuse`. Bulk = one connection, "
        f"{s['bulk_bytes'] / 2**20:.0f} MiB each way. wrk = {s['wrk_connections']} kept-alive connections on the "
        "optional-client-auth port (wrk cannot present a client certificate, so these connections carry none).\n",
        cpu_table(data),
        "\nThe same, plus the kernel's softirq time on the proxy's core (loopback TCP work the proxy's sends cause, "
        "which this kernel charges to no process; see the conditions):\n",
        cpu_table(data, "_cpu_si"),
        "\n† at least one kept run had more foreign CPU than the limit (see the conditions): read with care.\n"
        if any(disturbed(p, key) for p in data["peers"].values() for key, *_ in CPU_UNITS)
        else "",
        "\n## Rates (on a shared 2-core machine these depend on the load generator too; see the conditions)\n",
        rate_table(data),
        "\n## One connection at a time (median of "
        f"{s['latency_conns']} sequential connections, Python `ssl` client)\n",
        "Without TCP_NODELAY a client's first request waits in Nagle's algorithm until the server acknowledges the "
        "client's last handshake flight; a server that sends its session tickets at once acknowledges it "
        "immediately, a silent one lets the 40 ms delayed-ACK timer run.\n",
        latency_table(data),
        "\n## Memory\n",
        "Idle RSS: after start, before any load. Peak under load: VmHWM after the load runs, before the idle "
        "connections. Per idle connection: (RSS with N idle mTLS connections open through to the backend − RSS "
        "before) / N. RSS is summed over the peer's processes (nginx: master + worker).\n",
        memory_table(data),
        "\n## Targets of issue 5\n",
        targets_table(data),
        "\n## Checks before measuring\n",
        checks_table(data),
        "\n## Conditions of the kept runs\n",
        "Proxy CPU is the peer's CPU time over the run's wall time (1.0 = one core busy). The softirq column is "
        "network work the kernel did on the proxy's core outside any process's CPU time (not in the headline), "
        "relative to the proxy's CPU. Foreign CPU is what "
        "processes the benchmark did not start used, as a share of one core; a run above "
        f"{s['foreign_limit']:.0%} is repeated (up to {s['retries']} times) and the least disturbed one kept.\n",
        conditions_table(data),
    ]
    if data.get("backend_ceiling"):
        b = data["backend_ceiling"]
        out.append(f"\nBackend alone (wrk straight at it, plain HTTP, {s['wrk_connections']} connections): "
                   f"{b['rate']:.0f} req/s at {b['backend_busy']:.0%} of a core, "
                   f"{b['cpu_us']:.1f} µs of backend CPU per request.\n")
    if with_profiles and data.get("profiles"):
        out.append("\n## Where mtls-proxy spends its time (py-spy)\n")
        out.append(profile_section(data["profiles"]))
    return "\n".join(out)
