"""The report of ``bench/overhead.py``: medians, ratios, CPU budget, and the Markdown table."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.5
MODES = ("drain", "e2e")


def machine_info() -> dict[str, Any]:
    versions = {pkg: metadata.version(pkg) for pkg in
                ("celery", "kombu", "redis", "sqlalchemy", "psycopg", "billiard")}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rounds[0]:
        out[name] = {}
        for mode in MODES:
            keys = [k for k in rounds[0][name][mode] if k.endswith("_rate")]
            out[name][mode] = {k: statistics.median(r[name][mode][k] for r in rounds)
                               for k in keys}
            out[name][mode]["cpu_ms_per_job"] = {
                k: round(statistics.median(r[name][mode]["cpu_ms_per_job"][k] for r in rounds), 4)
                for k in rounds[0][name][mode]["cpu_ms_per_job"]
            }
    return out


def ratios(med: dict[str, Any]) -> dict[str, float]:
    ours, base = med["orchestrator"], med["celery"]
    return {
        "e2e": round(ours["e2e"]["e2e_rate"] / base["e2e"]["e2e_rate"], 3),
        "drain": round(ours["drain"]["drain_rate"] / base["drain"]["drain_rate"], 3),
        "submit": round(ours["drain"]["submit_rate"] / base["drain"]["submit_rate"], 3),
    }


CPU_PARTS = ("worker", "postgres", "redis", "submitter")


def cpu_budget(med: dict[str, Any], cores: int) -> dict[str, Any]:
    """CPU ms per job in the e2e window, summed over processes, and the rate it allows."""
    out: dict[str, Any] = {}
    for name, by_mode in med.items():
        cpu = by_mode["e2e"]["cpu_ms_per_job"]
        total = sum(cpu[k] for k in CPU_PARTS)
        out[name] = {"total_ms_per_job": round(total, 3),
                     "cpu_bound_ceiling_per_s": round(1000 * cores / total, 1)}
    ours = med["orchestrator"]["e2e"]["cpu_ms_per_job"]
    base = med["celery"]["e2e"]["cpu_ms_per_job"]
    out["orchestrator_extra_ms_per_job"] = {k: round(ours[k] - base[k], 3) for k in CPU_PARTS}
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def markdown(report: dict[str, Any]) -> str:
    """The short human version of the JSON report."""
    med, machine, cfg = report["medians"], report["machine"], report["config"]
    lines = [
        "# Overhead against vanilla Celery", "",
        f"{machine['date']}, {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, Celery {machine['versions']['celery']}. Medians of "
        f"{cfg['rounds']} rounds of {cfg['jobs']} jobs, concurrency {cfg['concurrency']}. "
        f"Command: `{report['command']}`.", "",
    ]
    rows = []
    for name, by_mode in med.items():
        cpu = by_mode["e2e"]["cpu_ms_per_job"]
        rows.append([name, by_mode["drain"]["submit_rate"], by_mode["drain"]["drain_rate"],
                     by_mode["e2e"]["e2e_rate"], cpu["worker"], cpu["postgres"], cpu["redis"],
                     cpu["submitter"], cpu.get("other", "?"), cpu["machine_busy_pct"]])
    lines += _table(["side", "submit/s", "drain/s", "e2e/s", "worker ms/job", "postgres ms/job",
                     "redis ms/job", "submitter ms/job", "other ms/job", "busy %"], rows)
    spread = "; ".join(
        f"{name} {', '.join(str(r[name]['e2e']['e2e_rate']) for r in report['rounds'])}"
        for name in med)
    before = [r[name][mode].get("busy_pct_before", 0.0) for r in report["rounds"]
              for name in med for mode in MODES]
    lines += ["", f"e2e/s per round: {spread}. CPUs busy with other work just before a "
              f"measurement: at most {max(before)}% (the machine is shared; the `other` column "
              "is other work during the e2e window).", ""]
    ratio = report["ratio_to_celery"]
    verdict = "meets" if ratio["e2e"] >= report["target_ratio"] else "misses"
    lines += [f"Orchestrator / Celery: e2e **{ratio['e2e']}** ({verdict} the "
              f"{report['target_ratio']} target), drain {ratio['drain']}, submit "
              f"{ratio['submit']}. CPU columns: CPU time per job during the e2e window "
              "(submitter = this process, running `submit`).", ""]
    budget = report["cpu_budget"]
    extra = ", ".join(f"{k} +{v} ms" for k, v in budget["orchestrator_extra_ms_per_job"].items())
    lines += [f"CPU per job, all processes: orchestrator "
              f"{budget['orchestrator']['total_ms_per_job']} ms, celery "
              f"{budget['celery']['total_ms_per_job']} ms (extra: {extra}). On "
              f"{machine['cpu_count']} cores that caps the orchestrator at "
              f"{budget['orchestrator']['cpu_bound_ceiling_per_s']} jobs/s.", ""]
    parts = report["breakdown"]
    lines += [f"## Worker-side path in-process ({parts['jobs']} jobs, one process, no Celery: "
              f"{parts['in_process_rate_one_process']} jobs/s)", ""]
    lines += _table(["step", "µs/job", "calls/job"], [
        [label, v["us_per_job"], v["calls_per_job"]]
        for label, v in parts["execute_us_per_job"].items()])
    lines += ["", "Under cProfile (inflated), cumulative µs per job:", ""]
    lines += _table(["function", "calls/job", "cum µs/job"], [
        [r["function"], r["calls_per_job"], r["cum_us_per_job"]]
        for r in parts["profile"]["watched_by_cumulative"]])
    lines += ["", "## Submit path in-process", ""]
    lines += _table(["step", "µs/job", "calls/job"], [
        [label, v["us_per_job"], v["calls_per_job"]]
        for label, v in parts["submit_us_per_job"].items()])
    lines += ["", "## claim + finish (one successful job), by implementation and engine", ""]
    lines += _table(["variant", "wall median µs", "client CPU µs"], [
        [k, v["wall_median_us"], v["client_cpu_us"]]
        for k, v in parts["claim_finish_by_variant"].items()])
    lines += ["", *_table(["round trip", "µs"],
                          [[k, v] for k, v in parts["round_trip_median_us"].items()])]
    return "\n".join(lines) + "\n"
