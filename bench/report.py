"""Turn the collected numbers into Markdown tables: CPU per unit (the headline), rates, the HTTP identity mode over
HTTP/1.1 and HTTP/2, worker processes, memory, the checks, the measurement conditions, the issue-5 targets, and the
profiles."""

from __future__ import annotations

import re
import statistics
from typing import Any

BASE = "nginx"
GO_PEER = "traefik"  # the second reference of the targets (issue 13: "report Traefik's too")

# (key, label, unit, format): CPU on the proxy's core per unit of work. Lower is better.
CPU_UNITS = [
    ("full", "full mTLS handshake", "ms", "{:.3f}"),
    ("resumed", "resumed handshake", "ms", "{:.3f}"),
    ("bulk_up", "bulk up, per GB", "s", "{:.3f}"),
    ("bulk_down", "bulk down, per GB", "s", "{:.3f}"),
    ("bulk2_up", "bulk up, per GB (s_client)", "s", "{:.3f}"),
    ("bulk2_down", "bulk down, per GB (s_client)", "s", "{:.3f}"),
    ("wrk", "kept-alive request (wrk)", "µs", "{:.1f}"),
    ("wrk_http", "kept-alive request, HTTP identity mode (wrk)", "µs", "{:.1f}"),
    ("h2", "kept-alive request, HTTP/2 identity mode (h2load, client certificate)", "µs", "{:.1f}"),
]

# Issue 5: (key, what, limit as a ratio to nginx).
RATIO_TARGETS = [
    ("full", "full mTLS handshake", 1.0),
    ("resumed", "resumed handshake", 1.3),
    ("bulk_up", "bulk transfer per GB, client → backend", 1.2),
    ("bulk_down", "bulk transfer per GB, backend → client", 1.2),
    ("wrk", "small requests on kept-alive connections, TCP mode", 2.0),
    ("wrk_http", "small requests on kept-alive connections, HTTP identity mode", 3.0),
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


def paced_section(data: dict[str, Any]) -> str:
    s = data["settings"]
    if not data.get("paced_backend"):
        return ""
    return (
        f"\n## Added latency at a fixed rate ({s['paced_rate']:.0f} requests/s, far below saturation)\n\n"
        f"`PING` → `PONG` on 8 kept-alive mTLS connections (the mandatory-auth port, the client certificate) taken in "
        f"turn, one request every {1e6 / s['paced_rate']:.0f} µs for {s['paced_seconds']:g} s, timed from when each "
        "was due (or from the end of the one before, if that ended later), by a Python `ssl` client on the load "
        "core; the same to the backend alone over plain TCP (the lower of two runs, after the peers' checks) is "
        "the base that \"added\" subtracts. A multi-worker row spans the load core too.\n\n"
        + paced_table(data)
    )


def paced_table(data: dict[str, Any]) -> str:
    """p50/p99 of PING → PONG at a fixed rate through each peer, and what the peer adds to the backend alone."""
    direct = data.get("paced_backend")
    if not direct:
        return "not measured in this run\n"
    base = data["peers"].get(BASE, {}).get("latency", {}).get("paced")
    rows = [["backend alone (plain TCP)", f"{direct['p50_us']:.0f} µs", f"{direct['p99_us']:.0f} µs", "–", "–", "–"]]
    for spec, peer in data["peers"].items():
        paced = peer.get("latency", {}).get("paced")
        if not paced:
            rows.append([spec, "–", "–", "–", "–", "–"])
            continue
        added50, added99 = paced["p50_us"] - direct["p50_us"], paced["p99_us"] - direct["p99_us"]
        against = "–"
        if base:
            base50, base99 = base["p50_us"] - direct["p50_us"], base["p99_us"] - direct["p99_us"]
            against = f"{added50 - base50:+.0f} / {added99 - base99:+.0f} µs"
        rows.append([spec, f"{paced['p50_us']:.0f} µs", f"{paced['p99_us']:.0f} µs", f"{added50:.0f} µs",
                     f"{added99:.0f} µs", against])
    return table(["peer", "p50", "p99", "added p50", "added p99", "added, against nginx's (p50 / p99)"], rows)


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
            _refused_at_backend(c),
            "ok" if c["ok"] else "**MISCONFIGURED, not measured**",
        ])
    return table(["peer", "no client cert", "cert from another CA", "good cert",
                  "optional port, no cert", "refused clients that reached the backend", "verdict"], rows,
                 align="llllll" + "l")


def _refused_at_backend(checks: dict[str, Any]) -> str:
    opened, silent = checks["backend_connections_from_refused"], checks.get("silent_backend_connections_from_refused")
    if not opened or not silent:
        return str(opened)
    return f"{opened - silent} ({silent} connection(s) opened and closed without a byte)"


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
                f"{len(kept)}/{attempts}",
                "the load core, which it shares (see \"Worker processes\")" if _spans_cores(peer)
                else limit(proxy, load, backend),
            ])
    return table(["peer", "run", "proxy CPU (of one core)", "softirq on the proxy core (vs proxy CPU)",
                  "load core busy", "backend CPU", "foreign CPU (worst kept run)", "runs kept / attempts",
                  "what limited the rate"], rows, align="ll" + "r" * 6 + "l")


def _spans_cores(peer: dict[str, Any]) -> bool:
    return any(c in str(peer.get("cpus", "")) for c in ",-")


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


def single_worker(peer: dict[str, Any]) -> bool:
    return peer.get("workers", 1) == 1


def _against_go(value: float | None, ref: float | None, go: float | None) -> str:
    """The Go peer's ratio to nginx, and the row's ratio to the Go peer, for one unit of work."""
    if not go or not ref or value is None:
        return "–"
    return f"{GO_PEER} {go / ref:.2f}× nginx; this row {value / go:.2f}× {GO_PEER}"


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(peer, target, limit, measured, verdict, against Traefik) for every single-worker mtls-proxy row (the targets
    are per core; a multi-worker row has its own section)."""
    out = []
    base = data["peers"].get(BASE, {}).get("summary", {})
    go = data["peers"].get(GO_PEER, {}).get("summary", {})
    for spec, peer in data["peers"].items():
        if not spec.startswith("mtls-proxy") or not single_worker(peer):
            continue
        s = peer.get("summary", {})
        for key, what, limit in RATIO_TARGETS:
            value, ref = s.get(f"{key}_cpu"), base.get(f"{key}_cpu")
            if value is None or not ref:
                out.append((spec, what, f"≤ {limit:.1f}× nginx", "not measured", "–", "–"))
                continue
            ratio = value / ref
            verdict = "met" if ratio <= limit else f"missed by {ratio / limit - 1:.0%}"
            si, si_ref = s.get(f"{key}_cpu_si"), base.get(f"{key}_cpu_si")
            if si and si_ref:
                verdict += f" (with softirq: {si / si_ref:.2f}×)"
            rate, rate_ref = s.get(f"{key}_rate"), base.get(f"{key}_rate")
            if key == "wrk_http" and rate and rate_ref:
                verdict += f"; requests/s {rate / rate_ref:.2f}× nginx's ({rate:.0f} against {rate_ref:.0f})"
            out.append((spec, what, f"≤ {limit:.1f}× nginx", f"{ratio:.2f}×", verdict,
                        _against_go(value, ref, go.get(f"{key}_cpu"))))
        m = peer.get("memory", {})
        idle_kb = m.get("idle_rss_kb")
        if idle_kb:
            mb = idle_kb / 1024
            out.append((spec, "RSS of one worker at idle", f"< {IDLE_RSS_LIMIT_MB:.0f} MB", f"{mb:.1f} MB",
                        "met" if mb < IDLE_RSS_LIMIT_MB else f"missed by {mb / IDLE_RSS_LIMIT_MB - 1:.0%}", "–"))
        idle = m.get("idle")
        if idle:
            kb = idle["per_conn_kb"]
            note = "" if idle["count"] >= PER_CONN_TARGET_AT else f" (measured at {idle['count']}, not 5,000)"
            out.append((spec, f"RSS per additional idle TLS connection at {PER_CONN_TARGET_AT:,}",
                        f"< {PER_CONN_LIMIT_KB:.0f} KB", f"{kb:.1f} KB at {idle['count']:,}",
                        ("met" if kb < PER_CONN_LIMIT_KB else f"missed by {kb / PER_CONN_LIMIT_KB - 1:.0%}") + note,
                        "–"))
    return out


def http_table(data: dict[str, Any]) -> str:
    rows = []
    base = data["peers"].get(BASE, {}).get("summary", {})
    for spec, peer in data["peers"].items():
        s = peer.get("summary", {})
        kept = [r for r in peer.get("runs", {}).get("wrk_http", []) if r.get("kept") and r.get("ok")]
        if not kept:
            continue
        share = min(r["identity_share"] for r in kept)
        header = kept[0].get("identity_header", "X-Client-Verify")
        xfcc = max(r.get("backend_xfcc_requests", 0) for r in kept)
        conns = median([r["backend_connections"] for r in kept])
        rows.append([
            f"**{spec}**" if spec.startswith("mtls-proxy") else spec,
            _cell(s.get("wrk_http_rate"), "{:.0f}") + _ratio(s.get("wrk_http_rate"), base.get("wrk_http_rate")),
            _cell(s.get("wrk_http_p50"), "{:.0f}", "µs"),
            _cell(s.get("wrk_http_p99"), "{:.0f}", "µs"),
            _cell(s.get("wrk_http_cpu"), "{:.1f}", "µs") + _ratio(s.get("wrk_http_cpu"), base.get("wrk_http_cpu"))
            + (" †" if disturbed(peer, "wrk_http") else ""),
            _cell(s.get("wrk_http_cpu_si"), "{:.1f}", "µs")
            + _ratio(s.get("wrk_http_cpu_si"), base.get("wrk_http_cpu_si")),
            _cell(s.get("wrk_cpu"), "{:.1f}", "µs"),
            f"{share:.1%}" + (f" ({xfcc} with XFCC)" if xfcc else "")
            + ("" if header == "X-Client-Verify" else f" (with {header})"),
            f"{conns:.0f}" if conns is not None else "–",
        ])
    if not rows:
        return ""
    return table(["peer", "requests/s", "p50", "p99", "CPU per request", "CPU per request + softirq",
                  "same peer, TCP mode (for scale)", "backend requests with X-Client-Verify",
                  "backend connections opened"], rows)


def http_headers_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        checks = peer.get("checks", {})
        h = checks.get("http")
        if not h:
            continue
        cert_header = h.get("cert_header", "X-Forwarded-Client-Cert")
        prefix = "" if cert_header == "X-Forwarded-Client-Cert" else f"{cert_header}: "
        requests = [("good client certificate", h["good"]), ("no certificate, forged headers", h["optional_no_cert"])]
        if checks.get("h2", {}).get("good", {}).get("reached"):
            requests.append(("good client certificate, HTTP/2", checks["h2"]["good"]))
        for label, result in requests:
            headers = result.get("headers", {})
            cells = ["<br>".join(f"`{v}`" for v in headers.get(name, [])) or "(none)"
                     for name in (cert_header.lower(), "x-client-subject", "x-client-verify", "x-forwarded-for",
                                  "x-forwarded-proto")]
            rows.append([spec, label, prefix + cells[0], *cells[1:]])
    if not rows:
        return ""
    return table(["peer", "request", "X-Forwarded-Client-Cert (or the peer's own certificate header)",
                  "X-Client-Subject", "X-Client-Verify", "X-Forwarded-For", "X-Forwarded-Proto"], rows,
                 align="lllllll")


def http2_table(data: dict[str, Any]) -> str:
    """The HTTP/2 row: h2load's rate and mean request time, CPU per request, the same peer's HTTP/1.1
    identity-mode figure and the ratio of the two, and what the backend received."""
    rows = []
    base = data["peers"].get(BASE, {}).get("summary", {})
    for spec, peer in data["peers"].items():
        s = peer.get("summary", {})
        kept = [r for r in peer.get("runs", {}).get("h2", []) if r.get("kept") and r.get("ok")]
        if not kept:
            continue
        share = min(r["identity_share"] for r in kept)
        header = kept[0].get("identity_header", "X-Forwarded-Client-Cert")
        conns = median([r["backend_connections"] for r in kept])
        h2, h1 = s.get("h2_cpu"), s.get("wrk_http_cpu")
        rows.append([
            f"**{spec}**" if spec.startswith("mtls-proxy") else spec,
            _cell(s.get("h2_rate"), "{:.0f}") + _ratio(s.get("h2_rate"), base.get("h2_rate")),
            _cell(s.get("h2_mean") / 1e3 if s.get("h2_mean") else None, "{:.1f}", "ms"),
            _cell(h2, "{:.1f}", "µs") + _ratio(h2, base.get("h2_cpu")) + (" †" if disturbed(peer, "h2") else ""),
            _cell(s.get("h2_cpu_si"), "{:.1f}", "µs") + _ratio(s.get("h2_cpu_si"), base.get("h2_cpu_si")),
            _cell(h1, "{:.1f}", "µs"),
            f"{h2 / h1:.2f}×" if h2 and h1 else "–",
            f"{share:.1%} ({header})",
            f"{conns:.0f}" if conns is not None else "–",
        ])
    if not rows:
        return ""
    return table(["peer", "requests/s", "mean request time", "CPU per request", "CPU per request + softirq",
                  "same peer, HTTP/1.1 identity mode (wrk)", "HTTP/2 ÷ HTTP/1.1", "backend requests with the "
                  "certificate header", "backend connections opened"], rows)


def http2_goal(data: dict[str, Any]) -> str:
    """Issue 14's goal for every single-worker mtls-proxy row: HTTP/2 CPU per request no worse than the HTTP/1.1
    identity mode's, and the ratios to nginx (and Traefik) over HTTP/2."""
    lines = []
    peers = data["peers"]
    base, go = peers.get(BASE, {}).get("summary", {}), peers.get(GO_PEER, {}).get("summary", {})
    for spec, peer in peers.items():
        s = peer.get("summary", {})
        h2, h1 = s.get("h2_cpu"), s.get("wrk_http_cpu")
        if not spec.startswith("mtls-proxy") or not single_worker(peer) or h2 is None:
            continue
        if h1:
            verdict = "met" if h2 <= h1 else f"missed by {h2 / h1 - 1:.0%}"
            against_h1 = (f"against {h1:.1f} µs per HTTP/1.1 identity-mode request (wrk, same run): "
                          f"{h2 / h1:.2f}×, goal ≤ 1.00×: {verdict}")
        else:
            against_h1 = "(the HTTP/1.1 identity mode was not measured in this run)"
        others = [f"{h2 / ref['h2_cpu']:.2f}× {name}'s {ref['h2_cpu']:.1f} µs" for name, ref in
                  ((BASE, base), (GO_PEER, go)) if ref.get("h2_cpu")]
        lines.append(f"- **{spec}**: {h2:.1f} CPU-µs per HTTP/2 request {against_h1}"
                     + (f"; over HTTP/2, {' and '.join(others)}" if others else "") + ".")
    return "\n".join(lines) + "\n" if lines else ""


def http2_checks_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        h = peer.get("checks", {}).get("h2")
        if not h:
            continue
        rows.append([spec, _refusal(h["no_cert"]), _refusal(h["other_ca"]), str(h["backend_requests_from_refused"]),
                     h["h2load"][:120], "ok" if h["ok"] else "**" + "; ".join(h["problems"])[:300] + "**"])
    if not rows:
        return ""
    return table(["peer", "no client cert", "cert from another CA", "requests of refused clients at the backend",
                  "h2load with the certificate (one request)", "identity headers"], rows, align="lllrll")


def _refusal(r: dict[str, Any]) -> str:
    if r["reached"]:
        return "**ADMITTED**"
    alert = re.search(r"\[SSL: ([A-Z0-9_]+)\]", r["detail"])
    return f"refused: {alert.group(1).lower() if alert else r['detail'][:70]}"


def http_checks_table(data: dict[str, Any]) -> str:
    rows = []
    for spec, peer in data["peers"].items():
        h = peer.get("checks", {}).get("http")
        if not h:
            continue
        rows.append([spec, _refusal(h["no_cert"]), _refusal(h["other_ca"]), _refusal(h["other_ca_optional_port"]),
                     str(h["backend_requests_from_refused"]),
                     "ok" if h["ok"] else "**" + "; ".join(h["problems"])[:300] + "**"])
    if not rows:
        return ""
    return table(["peer", "no client cert (require port)", "cert from another CA", "another CA, optional port",
                  "requests of refused clients at the backend", "identity headers"], rows, align="llllrl")


def workers_section(data: dict[str, Any]) -> str:
    """Issue 5: two workers take about twice the handshakes of one when the load generator is not the limit.

    On two cores the load generator shares CPU 0 with the second worker, so the rate cannot show it. What can:
    the CPU per handshake stays the same with two workers, and the work is spread over both."""
    single = [(spec, p) for spec, p in data["peers"].items()
              if spec.startswith("mtls-proxy") and single_worker(p) and p.get("summary", {}).get("full_cpu")]
    multi = [(spec, p) for spec, p in data["peers"].items()
             if not single_worker(p) and p.get("summary", {}).get("full_cpu")]
    if not multi:
        return ""
    base_by_kind = {spec.split(":")[0]: p for spec, p in data["peers"].items()
                    if single_worker(p) and ":" not in spec}
    rows = []
    lines = []
    for spec, peer in [*single, *multi]:
        s = peer["summary"]
        n = peer.get("workers", 1)
        for key, label in (("full", "full"), ("resumed", "resumed")):
            runs = [r for r in peer.get("runs", {}).get(key, []) if r.get("kept") and r.get("ok")]
            if not runs or s.get(f"{key}_cpu") is None:
                continue
            busy = median([r["proxy_busy"] for r in runs])
            spread = _spread(runs)
            capacity = n * 1000 / s[f"{key}_cpu"]
            rows.append([spec, str(n), label, f"{s[f'{key}_cpu']:.3f} ms", f"{s[f'{key}_rate']:.0f}",
                         f"{busy:.2f}", f"{capacity:.0f}", spread])
    for spec, peer in multi:
        kind = spec.split(":")[0]
        one = base_by_kind.get(kind)
        if not one:
            continue
        n = peer.get("workers", 1)
        for key, label in (("full", "full handshakes"), ("resumed", "resumed handshakes")):
            c1, cn = one["summary"].get(f"{key}_cpu"), peer["summary"].get(f"{key}_cpu")
            r1, rn = one["summary"].get(f"{key}_rate"), peer["summary"].get(f"{key}_rate")
            if not (c1 and cn and r1 and rn):
                continue
            lines.append(
                f"- **{spec}**, {label}: {cn:.3f} CPU-ms per handshake against {c1:.3f} ms with one worker "
                f"({cn / c1:.2f}×). So {n} workers, each on a core of its own, take {n * c1 / cn:.2f}× the "
                f"handshakes of one worker ({n * 1000 / cn:.0f}/s against {1000 / c1:.0f}/s, CPU-bound). Measured "
                f"here, where the load generator shares CPU 0 with a worker, the rate went from {r1:.0f}/s to "
                f"{rn:.0f}/s ({rn / r1:.2f}×).")
    out = [
        "Issue 5 asks to show that two workers take about twice the handshakes of one when the load generator is "
        "not the limit. On this 2-core machine a peer on both cores shares CPU 0 with the `s_time` clients and the "
        "backend, so its rate is bounded by the load generator, not by the proxy. What shows the scaling is the CPU "
        "per handshake (the whole process tree's CPU: the supervisor, the admin process and the workers), and how "
        "it spreads over the workers: if one handshake costs the same CPU with two workers as with one, and both "
        "workers do the work, then two cores give twice the handshakes. The capacity column is that: workers × "
        "1000 / CPU-ms per handshake.\n",
        table(["peer", "workers", "handshakes", "CPU per handshake", "handshakes/s measured",
               "cores busy (proxy CPU)", "handshakes/s with every worker on a full core", "CPU by process"], rows,
              align="lrlrrrrl"),
        "",
        *lines,
    ]
    return "\n".join(out) + "\n"


def _spread(runs: list[dict[str, Any]]) -> str:
    """The CPU of each process of the tree, as shares, over the kept runs (busiest first)."""
    totals: dict[str, float] = {}
    for run in runs:
        for name, seconds in (run.get("per_process_cpu_s") or {}).items():
            totals[name] = totals.get(name, 0.0) + seconds
    whole = sum(totals.values())
    if len(totals) < 2 or not whole:
        return "one process"
    shares = sorted((v / whole for v in totals.values()), reverse=True)
    return " / ".join(f"{s:.0%}" for s in shares)


def memory_breakdown_section(b: dict[str, Any] | None) -> str:
    if not b:
        return ""
    if "error" in b:
        return f"No breakdown: {b['error']}\n"
    rows = [
        ["RSS", f"{b['rss_kb']:.1f} KB", "the process's resident memory (untraced phase)"],
        ["C heap in use (malloc)", _cell(b.get("malloc_kb"), "{:.1f}", "KB"),
         "glibc `mallinfo2`: OpenSSL, cffi buffers, Python's blocks over 512 bytes (untraced phase)"],
        ["… of which C allocations that are not Python's", _cell(b.get("native_kb"), "{:.1f}", "KB"),
         "malloc's figure less Python's large blocks: OpenSSL's SSL objects and buffers, socket wrappers"],
        ["Python allocations (tracemalloc)", f"{b['python_kb']:.1f} KB",
         f"{b['python_blocks']:.0f} blocks; {b['python_small_kb']:.1f} KB in pymalloc's small blocks, "
         f"{b['python_large_kb']:.1f} KB in blocks over 512 bytes"],
        ["the rest", _cell(b.get("other_kb"), "{:.1f}", "KB"),
         "RSS less malloc's in-use bytes less pymalloc's small blocks: allocator free lists, partly used pages"],
        ["objects tracked by the garbage collector", f"{b['gc_objects']:.0f}", ""],
    ]
    out = [
        f"{b['count']:,} idle mTLS connections through a separate mtls-proxy (same config), per connection:\n",
        table(["", "per connection", ""], rows, align="lrl"),
        "\nPython allocations per connection by where they were made (innermost frame):\n",
        table(["KB", "component"], [[f"{v:.2f}", k] for k, v in b["by_component"]], align="rl"),
        "\nBy the innermost frame in mtls-proxy's own code (which of its code paths holds the memory):\n",
        table(["KB", "frame"], [[f"{v:.2f}", f"`{k}`"] for k, v in b["by_proxy_frame"]], align="rl"),
        "\nBy allocation site:\n",
        table(["KB", "line"], [[f"{v:.2f}", f"`{k}`"] for k, v in b["by_line"]], align="rl"),
        "\nObjects the garbage collector tracks, per connection, by type:\n",
        table(["objects", "type"], [[f"{v:.1f}", f"`{k}`"] for k, v in b["gc_types"]], align="rl"),
    ]
    return "\n".join(out) + "\n"


def targets_table(data: dict[str, Any]) -> str:
    rows = [list(t) for t in targets(data)]
    return table(["peer", "target (issue 5)", "limit", "measured", "verdict", "against Traefik (same run)"], rows,
                 align="lllrll")


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


def label(spec: str) -> str:
    """A row's name in the tables: its spec without the ``tests=`` option (which runs it takes part in shows as
    the cells it has)."""
    return ":".join(part for part in spec.split(":") if not part.startswith("tests="))


def http2_section(data: dict[str, Any]) -> str:
    s = data["settings"]
    rows = http2_table(data)
    if not rows:
        why = data.get("h2_unavailable") or "no peer with the HTTP/2 listener took part"
        return f"not measured: {why}\n"
    c, m = s.get("h2_connections", 8), s.get("h2_streams", 32)
    return "\n".join([
        f"`h2load -c{c} -m{m}` ({c} connections, {m} concurrent streams on each, {c * m} requests in flight), "
        f"{s['wrk_seconds']} s, on each peer's HTTP/2 port, which requires a client certificate; ALPN chooses h2 "
        "(h2load offers nothing else). **h2load has no option for a client certificate**, so "
        "`bench/h2load_cert.c`, loaded into it with `LD_PRELOAD`, gives every TLS context h2load makes the "
        "client's certificate and key; nothing else of h2load changes, and the checks below prove it presents "
        "them. HTTP/2 in front and HTTP/1.1 behind for every peer (the benchmark's backend speaks no h2c): nginx "
        "`listen ... ssl http2` (nginx 1.22's form of `http2 on`) with the same `proxy_set_header` lines and "
        "upstream `keepalive` pool as the HTTP/1.1 row; Traefik the same HTTP router with `passTLSClientCert` and "
        "its pool of upstream connections (both pools raised above the requests in flight); mtls-proxy "
        "`tls.alpn: [h2, http/1.1]` with `backend.http_version: \"1.1\"`, where every stream is an HTTP/1.1 "
        "request on a backend connection of its own (no pool; the last column counts the connections). Every "
        "request carries a verified identity, so the backend counts the requests that arrive with the peer's "
        "certificate header (XFCC; Traefik's `X-Forwarded-Tls-Client-Cert-Info`); a run in which one lacks it "
        "fails. The mean request time is h2load's (from a stream's request to the end of its response; h2load "
        "gives no percentiles); with this many requests in flight it is mostly queueing. The HTTP/1.1 column is "
        "the same peer's wrk row above, whose requests are anonymous (no certificate header to build): "
        "for mtls-proxy it is the smaller job.\n",
        rows,
        "\nIssue 14's goal: HTTP/2 CPU per request no worse than the HTTP/1.1 identity mode's, and the ratio to "
        "nginx.\n",
        http2_goal(data) or "no single-worker mtls-proxy row measured HTTP/2\n",
    ])


def render(data: dict[str, Any], *, with_profiles: bool = True) -> str:
    s = data["settings"]
    data = {**data, "peers": {label(spec): peer for spec, peer in data["peers"].items()}}
    out = [
        "## CPU per unit of work on the proxy's core (the headline; lower is better; ratio to nginx)\n",
        f"Median of {s['reps']} run(s) each. Full handshake = a new TLS 1.3 connection with the client certificate "
        "and one small HTTP/1.0 request through to the backend (`openssl s_time -new -www /`); resumed = the same "
        "with `-reuse`. Bulk = one connection, "
        f"{s['bulk_bytes'] / 2**20:.0f} MiB each way. wrk = {s['wrk_connections']} kept-alive connections on the "
        "optional-client-auth port (wrk cannot present a client certificate, so these connections carry none). "
        "HTTP identity mode = the same wrk load through the peer as an HTTP reverse proxy that adds the client's "
        "identity headers to every request (nginx's `http {}` module; see the section below). HTTP/2 identity "
        f"mode = the same job with HTTP/2 in front: `h2load -c{s.get('h2_connections', 8)} "
        f"-m{s.get('h2_streams', 32)}` with the client certificate (see its section). A multi-worker row "
        "spans both cores (see \"Worker processes\"); its ratios are CPU per unit too.\n",
        cpu_table(data),
        "\nThe same, plus the kernel's softirq time on the proxy's core (loopback TCP work the proxy's sends cause, "
        "which this kernel charges to no process; see the conditions):\n",
        cpu_table(data, "_cpu_si"),
        "\n† at least one kept run had more foreign CPU than the limit (see the conditions): read with care.\n"
        if any(disturbed(p, key) for p in data["peers"].values() for key, *_ in CPU_UNITS)
        else "",
        "\n## Rates (on a shared 2-core machine these depend on the load generator too; see the conditions)\n",
        rate_table(data),
        "\n## HTTP identity mode (wrk, kept-alive connections)\n",
        "mtls-proxy with `backend.protocol: http` and `identity_headers: {X-Client-Subject: subject, "
        "X-Client-Verify: verify}`, against nginx's `http {}` module doing the same job: `ssl_verify_client "
        "optional` with the same client CA, `proxy_pass` to the same backend with `proxy_http_version 1.1` and an "
        "upstream `keepalive` pool, and `proxy_set_header` of `X-Forwarded-Client-Cert` (verified clients only), "
        "`X-Client-Subject $ssl_client_s_dn`, `X-Client-Verify $ssl_client_verify`, `X-Forwarded-For` and "
        "`X-Forwarded-Proto`. "
        f"`wrk -t1 -c{s['wrk_connections']}`, {s['wrk_seconds']} s, on the optional-client-auth port: **wrk cannot "
        "present a client certificate**, so every request is anonymous (`X-Client-Verify: NONE`, no XFCC, no "
        "subject); the checks below show the verified-client headers. nginx keeps a pool of kept-alive upstream "
        "connections; mtls-proxy keeps one backend connection per client connection (no pool). With kept-alive "
        "clients the pool saves little CPU (it would with short client connections); the last column shows it: "
        "the backend connections each peer opened during the run (nginx reuses the pool it opened in an earlier "
        "run). The backend counts the requests that arrive with `X-Client-Verify`; a run where any request lacks "
        "it fails. Traefik does the job its own way: an HTTP router with the `passTLSClientCert` middleware "
        "(`info`: the subject's DN and the SANs, URL-encoded, in `X-Forwarded-Tls-Client-Cert-Info`, the closest "
        "to XFCC's `Hash=...;Subject=...`), its own X-Forwarded headers and `aliasHeadersStrategy: delete`, and a "
        "pool of upstream connections; it has no `X-Client-Subject` or `X-Client-Verify`, so its requests are "
        "counted by `X-Forwarded-For`.\n",
        http_table(data) or "not measured (no peer with the HTTP identity-mode listeners, or no wrk)\n",
        "\nWhat the backend received (`GET /echo`, which answers with the request head) from a client with the "
        "good certificate on the mandatory-auth port, and from an anonymous client on the optional port that "
        "forged every identity header the peer sets (`X-Client-Verify: SUCCESS`, `X-Client-Subject: CN=forged`, "
        "`X-Forwarded-Client-Cert: Hash=forged;Subject=\"CN=forged\"`, `x-forwarded-for: 192.0.2.66`; to Traefik "
        "the same value in `X-Forwarded-Tls-Client-Cert-Info` instead of the first three):\n",
        http_headers_table(data),
        "\n## HTTP/2 identity mode (h2load with the client certificate, kept-alive, many streams per connection)\n",
        http2_section(data),
        "\n## Worker processes\n",
        workers_section(data) or "no multi-worker row in this run\n",
        "\n## One connection at a time (median of "
        f"{s['latency_conns']} sequential connections, Python `ssl` client)\n",
        "Without TCP_NODELAY a client's first request waits in Nagle's algorithm until the server acknowledges the "
        "client's last handshake flight; a server that sends its session tickets at once acknowledges it "
        "immediately, a silent one lets the 40 ms delayed-ACK timer run.\n",
        latency_table(data),
        paced_section(data),
        "\n## Memory\n",
        "Idle RSS: after start, before any load. Peak under load: VmHWM after the load runs, before the idle "
        "connections. Per idle connection: (RSS with N idle mTLS connections open through to the backend − RSS "
        "before) / N. RSS is summed over the peer's processes (nginx: master + worker).\n",
        memory_table(data),
        "\n### What an idle TLS connection costs mtls-proxy\n" if data.get("memory_breakdown") else "",
        memory_breakdown_section(data.get("memory_breakdown")),
        "\n## Targets of issue 5\n",
        targets_table(data),
        "\n## Checks before measuring\n",
        checks_table(data),
        "\nThe HTTP identity-mode listeners (`GET /echo`; a refusal is a TLS alert or, from nginx, its own "
        "400 page; either way no request may reach the backend):\n" if http_checks_table(data) else "",
        http_checks_table(data),
        "\nThe HTTP/2 listeners (`nghttp`, from the same package as h2load, speaks only h2 and sends `GET /echo` "
        "with and without a certificate; then h2load itself sends one request with the certificate):\n"
        if http2_checks_table(data) else "",
        http2_checks_table(data),
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
