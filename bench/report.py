"""Runs the scenarios in alternating rounds (ours, each peer, ours, each peer, ...) and reduces
them to medians with min-max, ratios and the issue's targets."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from pgdispatch.bench import calls as bench_calls
from pgdispatch.bench import dashboard as bench_dashboard
from pgdispatch.bench import job_costs, scale, scenarios
from pgdispatch.bench import leads as bench_leads
from pgdispatch.bench import limits as shared_limits
from pgdispatch.bench import processes as bench_processes
from pgdispatch.bench.leads import REFUSED as LEADS_REFUSED
from pgdispatch.bench.peers import PEERS
from pgdispatch.bench.scenarios import BARE_CLIENT, OURS, Result


def expand_peers(names: Iterable[str]) -> list[str]:
    """`pgqueuer` means both of its drivers; `none` means no peer."""
    chosen: list[str] = []
    for name in names:
        if name == "none":
            continue
        chosen += [p for p in PEERS if p == name or p.startswith(f"{name}-")] or [name]
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {', '.join(unknown)}; known: pgqueuer, procrastinate")
    return chosen


def installed_peers() -> list[str]:
    wanted = {"pgqueuer-psycopg": "pgqueuer", "pgqueuer-asyncpg": "asyncpg", "procrastinate": "procrastinate"}
    return [p for p in PEERS if importlib.util.find_spec(wanted[p]) is not None]


def run(server_url: str, *, chosen: list[str], peers: list[str], rounds: int, jobs: int, requests: int,
        emit: Callable[[Result], None]) -> list[Result]:
    plan: dict[str, tuple[list[str], Callable[[str], list[Result]]]] = {
        "drain": ([OURS, *peers], lambda s: [scenarios.drain(server_url, s, jobs=jobs, processes=p)
                                             for p in (1, 2)]),
        "deliver": ([BARE_CLIENT, OURS, *peers],
                    lambda s: [scenarios.deliver(server_url, s, requests=requests)]),
        "latency": ([OURS, *peers], lambda s: [scenarios.latency(server_url, s)]),
        "latency-backlog": ([OURS], lambda s: [scenarios.latency_beside_backlog(server_url)]),
        "backlog": ([OURS], lambda s: scenarios.backlog(server_url)),
        "poll": ([OURS], lambda s: scale.poll(server_url)),
        "review": ([OURS], lambda s: scale.review(server_url)),
        "memory": ([OURS], lambda s: [scenarios.memory(server_url)]),
        "enqueue": ([OURS], lambda s: scenarios.enqueue(server_url)),
        "limits": ([OURS], lambda s: shared_limits.limits(server_url)),
        "limits-pools": ([OURS], lambda s: shared_limits.pools(server_url)),
        "processes": ([OURS], lambda s: bench_processes.processes(server_url)),
        "leads": ([OURS], lambda s: bench_leads.leads(server_url)),
        "calls": ([OURS], lambda s: bench_calls.calls(server_url)),
        "dashboard": ([OURS], lambda s: bench_dashboard.dashboard(server_url)),
        "cost": ([OURS], lambda s: job_costs.costs(server_url)),
        "sweep": ([OURS], lambda s: scenarios.sweep(server_url)),
    }
    results: list[Result] = []
    for round_ in range(1, rounds + 1):
        for name in chosen:
            systems, measure = plan[name]
            for system in systems:
                try:
                    measured = measure(system)
                except Exception as e:  # a peer failing a scenario is a result, not a crash
                    measured = [{"scenario": name, "system": system, "error": str(e)[:300]}]
                for result in measured:
                    result["round"] = round_
                    results.append(result)
                    emit(result)
    return results


# -- reduction --------------------------------------------------------------------------------------

def reduce(results: list[Result]) -> list[dict[str, Any]]:
    """One row per (scenario, system): median and min-max over rounds, ratio of ours to it."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r["scenario"], r["system"]), []).append(r)
    rows = []
    for (scenario, system), group in groups.items():
        ok = [r for r in group if "error" not in r]
        row: dict[str, Any] = {"scenario": scenario, "system": system, "rounds": len(group)}
        if not ok:
            row["error"] = group[0]["error"]
        elif "insert_to_start_ms" in ok[0]:
            for key in ("insert_to_start_ms", "insert_to_done_ms"):
                row[key] = {stat: _median([r[key][stat] for r in ok if r[key]])
                            for stat in ("p50", "p99", "max")}
            row["unit"] = "ms"
        else:
            values = [r["value"] for r in ok]
            row.update(unit=ok[0]["unit"], median=_median(values), min=min(values), max=max(values))
            for key in COSTS:
                measured = [r[key] for r in ok if r.get(key) is not None]
                if measured:
                    row[key] = {"median": _median(measured), "min": min(measured), "max": max(measured)}
        rows.append(row)
    for row in rows:
        ours = next((r for r in rows if r["scenario"] == row["scenario"] and r["system"] == OURS), None)
        if ours and "median" in row and "median" in ours and row["system"] != OURS and row["median"]:
            row["ours_to_this"] = round(ours["median"] / row["median"], 2)
    return rows


# What a job costs (bench/cost.py), reduced like the rates.
COSTS = {"worker_cpu_us": "worker CPU µs", "pg_cpu_us": "PostgreSQL CPU µs", "wal_bytes": "WAL bytes",
         "rows_written": "rows written", "round_trips": "round trips"}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (target, measured, met?); None when a figure is missing."""
    def value(scenario: str, system: str) -> float | None:
        row = next((r for r in rows if r["scenario"] == scenario and r["system"] == system), None)
        return row.get("median") if row else None

    checks: list[tuple[str, str, bool | None]] = []

    def ratio(label: str, a: float | None, b: float | None, at_least: float) -> None:
        if a is None or b is None or not b:
            checks.append((label, "not measured", None))
        else:
            checks.append((label, f"{a / b:.2f}×", a / b >= at_least))

    ours_drain = value("drain, 1 process", OURS)
    ratio("drain, 1 process ≥ 2× pgqueuer (psycopg)", ours_drain,
          value("drain, 1 process", "pgqueuer-psycopg"), 2)
    ratio("drain, 1 process ahead of pgqueuer (asyncpg)", ours_drain,
          value("drain, 1 process", "pgqueuer-asyncpg"), 1)
    ours_deliver = value("deliver", OURS)
    ratio("deliver ≥ 70% of the bare client", ours_deliver, value("deliver", BARE_CLIENT), 0.7)
    peer_best = max((v for p in PEERS if (v := value("deliver", p)) is not None), default=None)
    ratio("deliver ≥ 2× the best peer", ours_deliver, peer_best, 2)
    latency = next((r for r in rows if r["scenario"] == "latency" and r["system"] == OURS), None)
    if latency and "insert_to_start_ms" in latency:
        p50, p99 = latency["insert_to_start_ms"]["p50"], latency["insert_to_start_ms"]["p99"]
        checks.append(("latency insert→start p50 ≤ 2 ms", f"{p50} ms", p50 <= 2))
        checks.append(("latency insert→start p99 ≤ 10 ms", f"{p99} ms", p99 <= 10))
    backlog = [r for r in rows if r["scenario"].startswith("backlog") and "median" in r]
    if len(backlog) == 3:
        small, large, history = (r["median"] for r in backlog)
        ratio("backlog: 1M-row rate ≥ 0.8× the 10k-row rate", large, small, 0.8)
        ratio("backlog: 5M history rows, no measurable effect (≥ 0.9×)", history, small, 0.9)
    rate = next((r for r in rows if r["scenario"].startswith("limits: rate 200/s") and "median" in r), None)
    if rate:
        checks.append(("limits: delivered rate within 10% of 200/s across 2 processes",
                       f"{rate['median']} req/s", abs(rate["median"] - 200) <= 20))
    cap = next((r for r in rows if r["scenario"].startswith("limits: cap") and "median" in r), None)
    if cap:
        checks.append(("limits: a cap of 5 never exceeded at the sink", f"{cap['max']} at most",
                       cap["max"] <= 5))
    breaker = next((r for r in rows if r["scenario"].startswith("limits: breaker") and "median" in r), None)
    if breaker:
        checks.append(("limits: a breaker opened in one process stops the other within 1 s",
                       f"{breaker['max']} s at worst", breaker["max"] <= 1))
    for row in rows:
        if row["scenario"].endswith(": put back per delivery") and "median" in row:
            checks.append((f"{row['scenario'].split(':')[1].strip()}: at most one put-back per delivery",
                           f"{row['max']} at worst", row["max"] <= 1))
    if value("processes: 5-step no-op", OURS) is not None:
        ratio("processes: steps/s ≥ 1/3 of the no-op drain rate (same run)",
              value("processes: 5-step no-op", OURS), value("processes: no-op drain, same run", OURS), 1 / 3)
    refused = next((r for r in rows if r["scenario"] == LEADS_REFUSED and "median" in r), None)
    if refused:
        checks.append(("leads: no vendor limit tripped by a bulk resend",
                       f"{refused['max']} refusals at most", refused["max"] == 0))
    seen = next((r for r in rows
                 if r["scenario"].startswith("calls: a committed config change") and "median" in r), None)
    if seen:
        checks.append(("calls: a config change seen by every process within 100 ms",
                       f"{seen['max']} ms at worst", seen["max"] < 100))
    lost = [r for r in rows if r["scenario"].startswith("calls ") and r["scenario"].endswith(": lost")
            and "median" in r]
    if lost:
        checks.append(("calls: no call event lost", f"{max(r['max'] for r in lost)} requests at most",
                       all(r["max"] == 0 for r in lost)))
    pages = [r for r in rows if r["scenario"].startswith("dashboard: ") and r["scenario"].endswith(", p95")
             and "median" in r]
    if pages:
        worst = max(pages, key=lambda r: r["max"])
        checks.append(("dashboard: every page p95 < 150 ms at 1M jobs / 10M history",
                       f"{worst['max']} ms at most ({worst['scenario'][11:-5]})", worst["max"] < 150))
    memory = next((r for r in rows if r["scenario"].startswith("memory") and "median" in r), None)
    if memory:
        checks.append(("memory ≤ 100 MB per worker process at 256 in flight", f"{memory['median']} MB",
                       memory["median"] <= 100))
    return checks


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | system | median | min–max | pgdispatch ÷ this |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            cells = ["failed: " + row["error"].replace("|", "/"), "", ""]
        elif "median" in row:
            number = {"MB": "{}", "ms": "{:,.3f}", "released / delivered": "{:.2f}",
                      "updates / request": "{:.3f}"}.get(row["unit"], "{:,.0f}")
            cells = [f"{number.format(row['median'])} {row['unit']}",
                     f"{number.format(row['min'])}–{number.format(row['max'])}",
                     f"{row['ours_to_this']}×" if "ours_to_this" in row else ""]
        else:
            s, d = row["insert_to_start_ms"], row["insert_to_done_ms"]
            cells = [f"start p50 {s['p50']} / p99 {s['p99']} ms; done p50 {d['p50']} / p99 {d['p99']} ms",
                     f"start max {s['max']} ms", ""]
        lines.append(f"| {row['scenario']} | {row['system']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def targets_markdown(checks: list[tuple[str, str, bool | None]]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for label, measured, met in checks:
        lines.append(f"| {label} | {measured} | {'—' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines)


def cost_markdown(rows: list[dict[str, Any]]) -> str:
    """Per job, beside the rate: medians, and the range over rounds when they differ."""
    def cell(stats: dict[str, float] | None) -> str:
        if stats is None:
            return "—"
        number = "{:,.0f}" if stats["median"] >= 100 else "{:,.2f}" if stats["median"] < 10 else "{:,.1f}"
        if stats["min"] == stats["max"]:
            return number.format(stats["median"])
        low, high = number.format(stats["min"]), number.format(stats["max"])
        return f"{number.format(stats['median'])} ({low}–{high})"

    costed = [r for r in rows if any(key in r for key in COSTS)]
    labels = " | ".join(f"{label} / job" for label in COSTS.values())
    lines = [f"| scenario | system | rate | {labels} |",
             "|---|---|---|" + "---|" * len(COSTS)]
    for row in costed:
        lines.append(f"| {row['scenario']} | {row['system']} | {row['median']:,.0f} {row['unit']} | "
                     + " | ".join(cell(row.get(key)) for key in COSTS) + " |")
    return "\n".join(lines)


def sizing_markdown(rows: list[dict[str, Any]]) -> str:
    """From the cost scenario: what one PostgreSQL core sustains per job type (its backends' CPU
    only), and the worker cores a host needs per 1,000 jobs/s."""
    lines = ["| job type | jobs/s per PostgreSQL core | worker cores per 1,000 jobs/s "
             "| WAL per 1,000 jobs/s |", "|---|---|---|---|"]
    for row in rows:
        if not row["scenario"].startswith("cost: ") or "worker_cpu_us" not in row:
            continue
        pg, worker, wal = row.get("pg_cpu_us"), row["worker_cpu_us"], row.get("wal_bytes")
        per_core = f"{1e6 / pg['median']:,.0f}" if pg and pg["median"] else "—"
        lines.append(f"| {row['scenario'][6:]} | {per_core} | {worker['median'] / 1000:.2f} | "
                     + (f"{wal['median'] * 1000 / 2**20:.1f} MiB/s" if wal else "—") + " |")
    return "\n".join(lines)
