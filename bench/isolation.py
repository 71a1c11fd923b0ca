"""Does interactive work sit behind batch work? Queue waits under an offline flood, in one run.

    .venv/bin/python bench/isolation.py [--seconds 30] [--rate 20] [--model-dir DIR]

On these 2 cores, every slot busy with offline embedding (1,024 texts per task or chunk, in
model calls of 16, int8 all-MiniLM-L6-v2, one onnxruntime thread per process) while
interactive single-text embeddings arrive at a steady ``--rate`` per second:

* (a) vanilla Celery out of the box on the same Redis (one queue, prefetch 4, early ack);
* (b) tuned Celery: separate queues in fixed order, late ack, prefetch disabled;
* (c) this project with preemption off (``ORCH_PREEMPTION=0``);
* (d) this project with preemption on;

then offline throughput of (d)'s setup alone and with the interactive load (corrected for the
CPU the interactive jobs themselves used), and a two-tenant run: two equal-weight tenants each
with a backlogged bulk job; each one's share of the items done while both waited.
Interactive queue wait is publish-to-start for Celery and enqueue-to-claim (``queue_seconds``,
which includes the interactive tier's 10 ms batching window) for this project.
Writes bench/results/isolation.json and bench/results/isolation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.batching import CpuMeter  # noqa: E402
from bench.isolation_celery import WAITS_KEY, texts  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.db.engine import normalize_url  # noqa: E402
from orchestrator.db.migrate import upgrade  # noqa: E402
from orchestrator.local import LocalWorker  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PG = "postgresql://postgres@127.0.0.1:5432"
CHUNK = 1024


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1)}


def _steady(rate: float, seconds: float, fire: Callable[[int], None]) -> None:
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fire(i)


# --- plain Celery ----------------------------------------------------------------------------


def celery_run(flavour: str, args: argparse.Namespace, r: redis.Redis, tmp: Path,
               interactive: bool = True) -> dict[str, Any]:
    from bench.isolation_celery import tuned, vanilla

    app = vanilla if flavour == "vanilla" else tuned
    r.flushdb()
    env = {**os.environ, "BENCH_REDIS_URL": args.redis, "BENCH_MODEL_DIR": str(args.model_dir),
           "PYTHONPATH": str(ROOT)}
    queues = [] if flavour == "vanilla" else ["-Q", "interactive,offline"]
    log = tmp / f"celery-{flavour}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", f"bench.isolation_celery:{flavour}", "worker",
             "-c", "2", "-P", "prefork", "--loglevel", "INFO", "--without-gossip",
             "--without-mingle", "--without-heartbeat", *queues],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace"))
            time.sleep(0.1)
        offline = {} if flavour == "vanilla" else {"queue": "offline", "priority": 6}
        for i in range(args.flood):
            app.send_task("bench.offline_chunk", args=[CHUNK, i], **offline)
        time.sleep(args.warmup)
        online = {} if flavour == "vanilla" else {"queue": "interactive", "priority": 0}
        if interactive:
            _steady(args.rate, args.seconds, lambda i: app.send_task(
                "bench.interactive_one", args=[time.time()], **online))
        else:
            time.sleep(args.seconds)
        sent = int(args.rate * args.seconds) if interactive else 0
        deadline = time.monotonic() + 150  # let every interactive task start, however late
        while r.llen(WAITS_KEY) < sent and time.monotonic() < deadline:
            time.sleep(0.5)
        waits = [float(w) for w in r.lrange(WAITS_KEY, 0, -1)]
        return {"interactive_wait": _pcts(waits), "interactive_sent": sent,
                "interactive_started": len(waits)}
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        r.flushdb()


# --- this project ----------------------------------------------------------------------------


class Ours:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.db = f"orch_iso_{secrets.token_hex(4)}"
        self.admin = create_engine(normalize_url(f"{PG}/postgres"), isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        self.url = f"{PG}/{self.db}"
        upgrade(self.url)

    def settings(self, preemption: bool) -> Settings:
        return Settings.from_env({
            "ORCH_DATABASE_URL": self.url, "ORCH_BROKER_URL": self.args.redis,
            "ORCH_STATE_DIR": str(self.tmp / "state"), "ORCH_MODEL_DIR": str(self.args.model_dir),
            "ORCH_MODEL_THREADS": "1", "ORCH_MODEL_BATCH": "16", "ORCH_FAIR_WINDOW": "3",
            "ORCH_PREEMPTION": "1" if preemption else "0",
            # Admission control off, like the Celery baselines: every interactive job is
            # accepted and waits, so the waits compare like with like (it would shed instead).
            "ORCH_TIER_INTERACTIVE_QUEUE_WAIT_OBJECTIVE_S": "0",
            "ORCH_TIER_INTERACTIVE_HARD_BACKLOG": "0",
            "ORCH_TIER_OFFLINE_HARD_BACKLOG": "0",
        })

    def run(self, name: str, *, preemption: bool, rate: float, tenants: tuple[str, ...] = ("t",)
            ) -> dict[str, Any]:
        settings = self.settings(preemption)
        r = redis.Redis.from_url(self.args.redis)
        r.flushdb()
        worker = LocalWorker(settings, tiers="interactive,nearline,offline", concurrency=2,
                             name=f"{name}@bench", log=self.tmp / f"{name}.log")
        try:
            worker.wait_ready()
            meter = CpuMeter(worker, r, self.db)
            with Client.from_settings(settings) as client:
                return self._measure(client, rate, tenants, meter)
        finally:
            worker.kill()
            r.flushdb()

    def _measure(self, client: Client, rate: float, tenants: tuple[str, ...],
                 meter: CpuMeter) -> dict[str, Any]:
        n = self.args.flood * CHUNK
        parents = {t: client.submit_bulk("embed", iter(texts(n, seed=k)), tenant=t,
                                         chunk_size=CHUNK)
                   for k, t in enumerate(tenants)}
        time.sleep(self.args.warmup)
        handles = []
        cpu0 = meter.snapshot()
        t0 = datetime.now(UTC)
        if rate:
            _steady(rate, self.args.seconds, lambda i: handles.append(
                client.submit("embed", {"texts": texts(1, 5000 + i)}, tier="interactive")))
        else:
            time.sleep(self.args.seconds)
        t1 = datetime.now(UTC)
        cpu1 = meter.snapshot()
        for h in parents.values():
            h.cancel()  # queued chunks never start; running ones finish, their result dropped
        jobs = client.wait(handles, timeout=60) if handles else []
        done = {t: self._items_in_window(client, h.id, t0, t1) for t, h in parents.items()}
        elapsed = (t1 - t0).total_seconds()
        interactive_cpu = sum(j.cpu_seconds for j in jobs)
        # Slot time the interactive runs took, claim to finish: a batch's jobs share one run.
        runs = {(a.worker, a.started_at, a.finished_at) for j in jobs
                for a in client.attempts(j.id) if a.finished_at}
        interactive_slot_s = sum((end - start).total_seconds() for _, start, end in runs)
        preemptions = sum(c.preemptions for h in parents.values() for c in client.chunks(h.id))
        return {
            "interactive_wait": _pcts([j.queue_seconds or 0.0 for j in jobs]),
            "interactive_sent": len(handles),
            "interactive_succeeded": sum(j.state == "succeeded" for j in jobs),
            "offline_items_per_s": round(sum(done.values()) / elapsed, 1),
            "offline_items_by_tenant": {t: round(v) for t, v in done.items()},
            "interactive_cpu_share_of_slots": round(interactive_cpu / (elapsed * 2), 4),
            "interactive_slot_share": round(interactive_slot_s / (elapsed * 2), 4),
            "interactive_runs": len(runs),
            "preemptions": preemptions,
            "window_s": round(elapsed, 1),
            # CPU seconds per party in the window: the submitter (this process), PostgreSQL,
            # Redis, the worker's main process and its pool (offline and interactive work)
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in
                      ("bench", "postgres", "redis", "worker_main", "worker_pool",
                       "machine_busy", "machine_total")},
        }

    @staticmethod
    def _items_in_window(client: Client, parent: str, t0: datetime, t1: datetime) -> float:
        """Items a bulk job's chunks processed inside [t0, t1].

        Waits until no attempt of its chunks is still running, then spreads each chunk's
        processed items evenly over the wall time of its attempts and sums the part of every
        attempt that overlaps the window.
        """
        deadline = time.monotonic() + 120
        while True:
            runs = {c.id: (c, client.attempts(c.id)) for c in client.chunks(parent)}
            if not any(a.outcome == "running" for _, tries in runs.values() for a in tries):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"chunks of {parent} still running after the window")
            time.sleep(0.5)
        total = 0.0
        for chunk, tries in runs.values():
            spans = [(a.started_at, a.finished_at) for a in tries if a.finished_at]
            if not spans:
                continue
            ran_to_end = tries[-1].outcome in ("succeeded", "cancelled")
            processed = (chunk.items_total or 0) if ran_to_end else chunk.items_done
            wall = sum((b - a).total_seconds() for a, b in spans) or 1e-9
            overlap = sum(max(0.0, (min(b, t1) - max(a, t0)).total_seconds()) for a, b in spans)
            total += processed * overlap / wall
        return total

    def close(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n"), {"n": self.db})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}"'))
        self.admin.dispose()


# --- report ----------------------------------------------------------------------------------


def verdicts(fig: dict[str, Any]) -> dict[str, Any]:
    p99 = {k: fig[k]["interactive_wait"].get("p99_ms") for k in
           ("a_vanilla_celery", "b_tuned_celery", "c_ours_no_preemption", "d_ours_preemption")}
    alone = fig["offline_alone"]["offline_items_per_s"]
    loaded = fig["d_ours_preemption"]
    corrected = loaded["offline_items_per_s"] / max(
        1e-9, 1 - loaded["interactive_cpu_share_of_slots"])
    slot_corrected = loaded["offline_items_per_s"] / max(
        1e-9, 1 - loaded.get("interactive_slot_share", 0.0))
    # Everything the interactive load cost the machine: its runs' slot time, the submitter's
    # CPU, and what PostgreSQL, Redis and the worker's main process used beyond the run alone.
    outside = ("bench", "postgres", "redis", "worker_main")
    base = fig["offline_alone"].get("cpu_s", {})
    extra = sum(max(loaded.get("cpu_s", {}).get(k, 0.0) - base.get(k, 0.0), 0.0)
                for k in outside)
    window = loaded["window_s"] * 2
    interactive_share = loaded.get("interactive_slot_share", 0.0) + extra / window
    full_corrected = loaded["offline_items_per_s"] / max(1e-9, 1 - interactive_share)
    shares = fig["fairness"]["offline_items_by_tenant"]
    total = sum(shares.values()) or 1
    share = {t: round(v / total, 3) for t, v in shares.items()}
    d = p99["d_ours_preemption"] or float("inf")
    return {
        "p99_ms": p99,
        "p99_target_100ms_met": d <= 100,
        "vs_vanilla": round((p99["a_vanilla_celery"] or 0) / d, 1),
        "vs_tuned": round((p99["b_tuned_celery"] or 0) / d, 1),
        "offline_with_load_over_alone": round(loaded["offline_items_per_s"] / alone, 3),
        "offline_with_load_over_alone_cpu_corrected": round(corrected / alone, 3),
        "offline_with_load_over_alone_slot_corrected": round(slot_corrected / alone, 3),
        "interactive_share_of_machine": round(interactive_share, 4),
        "offline_with_load_over_alone_all_corrected": round(full_corrected / alone, 3),
        # The target's figure: slot time is what the interactive runs took from offline work
        # (the all-corrected one also removes PostgreSQL's and the client's CPU, which may
        # overlap the runs' own waits: an upper bound)
        "offline_target_0_9_met": slot_corrected / alone >= 0.9,
        "fair_shares": share,
        "fair_target_met": all(0.4 <= v <= 0.6 for v in share.values()),
    }


def markdown(report: dict[str, Any]) -> str:
    fig, v = report["figures"], report["verdicts"]
    rows = [("(a) vanilla Celery", "a_vanilla_celery"), ("(b) tuned Celery", "b_tuned_celery"),
            ("(c) orchestrator, preemption off", "c_ours_no_preemption"),
            ("(d) orchestrator, preemption on", "d_ours_preemption")]
    lines = ["# Isolation under an offline flood", "", f"`{report['command']}` on "
             f"{report['date']} ({report['machine']['cpus']} CPUs)", "",
             "| setup | interactive jobs | p50 ms | p95 ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|"]
    for label, key in rows:
        w = fig[key]["interactive_wait"]
        lines.append(f"| {label} | {w.get('n', 0)} | {w.get('p50_ms')} | {w.get('p95_ms')} | "
                     f"{w.get('p99_ms')} | {w.get('max_ms')} |")
    lines += ["", f"p99 with preemption: {v['p99_ms']['d_ours_preemption']} ms "
              f"(target <= 100: {'met' if v['p99_target_100ms_met'] else 'NOT met'}); "
              f"{v['vs_vanilla']}x better than vanilla Celery, {v['vs_tuned']}x better than "
              "tuned Celery.", "",
              f"Offline throughput: alone {fig['offline_alone']['offline_items_per_s']} items/s; "
              f"with interactive load {fig['d_ours_preemption']['offline_items_per_s']} items/s "
              f"({v['offline_with_load_over_alone']:.3f} of alone; "
              f"{v['offline_with_load_over_alone_cpu_corrected']:.3f} after removing the "
              f"{fig['d_ours_preemption']['interactive_cpu_share_of_slots']:.1%} of slot time "
              f"the interactive jobs' model calls used; "
              f"**{v['offline_with_load_over_alone_slot_corrected']:.3f}** after removing the "
              f"{fig['d_ours_preemption']['interactive_slot_share']:.1%} of slot time their "
              f"{fig['d_ours_preemption']['interactive_runs']} runs took, claim to finish "
              f"(target >= 0.9: {'met' if v['offline_target_0_9_met'] else 'NOT met'}); "
              f"{v['offline_with_load_over_alone_all_corrected']:.3f} if the submitting "
              "client's CPU and what PostgreSQL, Redis and the worker's main process used "
              "beyond the offline-alone run are removed as well ("
              f"{v['interactive_share_of_machine']:.1%} of the machine in all: an upper "
              "bound, as those overlap the runs' own waits); "
              f"{fig['d_ours_preemption']['preemptions']} full preemptions of chunks).", "",
              f"Two equal tenants, both backlogged: shares of items done {v['fair_shares']} "
              f"(target 50% +/- 10%: {'met' if v['fair_target_met'] else 'NOT met'}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=20.0, help="interactive jobs per second")
    parser.add_argument("--flood", type=int, default=40, help="offline tasks/chunks per tenant")
    parser.add_argument("--fair-warmup", type=float, default=20.0)
    parser.add_argument("--fair-seconds", type=float, default=45.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--only", default="a,b,c,d,alone,fair",
                        help="subset of the runs (a partial run writes to --out only)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("ORCH_MODEL_DIR", "/tmp/models-check")))
    args = parser.parse_args()
    if not (args.model_dir / "all-MiniLM-L6-v2" / "model-int8.onnx").exists():
        sys.exit(f"no all-MiniLM-L6-v2 in {args.model_dir}: run `orchestrator models export`")
    tmp = Path(tempfile.mkdtemp(prefix="orch-isolation-"))
    r = redis.Redis.from_url(args.redis)
    fig: dict[str, Any] = {}
    ours = Ours(args, tmp)
    try:
        only = set(args.only.split(","))
        if "a" in only:
            fig["a_vanilla_celery"] = celery_run("vanilla", args, r, tmp)
        if "b" in only:
            fig["b_tuned_celery"] = celery_run("tuned", args, r, tmp)
        if "c" in only:
            fig["c_ours_no_preemption"] = ours.run("nopreempt", preemption=False,
                                                   rate=args.rate)
        if "d" in only:
            fig["d_ours_preemption"] = ours.run("preempt", preemption=True, rate=args.rate)
        if "alone" in only:
            fig["offline_alone"] = ours.run("alone", preemption=True, rate=0)
        if "fair" in only:
            # Fair shares are a steady-state property: the first tenant's head start (it filled
            # the window before the second arrived) is left out of the measured window.
            args.warmup, args.seconds = args.fair_warmup, args.fair_seconds
            fig["fairness"] = ours.run("fair", preemption=True, rate=0,
                                       tenants=("alpha", "beta"))
    finally:
        ours.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "command": "python bench/isolation.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "figures": fig,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if len(fig) < 6:  # a partial run: the figures, no verdicts
        (args.out / "isolation-partial.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(fig, indent=2))
        return
    report["verdicts"] = verdicts(fig)
    (args.out / "isolation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "isolation.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    threading.excepthook = lambda a: print("thread failed:", a.exc_value, file=sys.stderr)
    main()
