"""Micro-batching against the model's own speed: drain, open loop and bulk on the real worker.

    .venv/bin/python bench/batching.py --model-dir DIR          # ~10 min on 2 cores
    .venv/bin/python bench/batching.py --model-dir DIR --quick  # ~3 min

One run, on PostgreSQL (a throwaway ``orch_bench_<random>`` database) and Redis (``--redis-db``,
flushed), with all-MiniLM-L6-v2 int8 sentences of exactly 32 tokens:

0. ``raw``: two processes, one onnxruntime thread each, ``EmbeddingModel.embed`` on batches of
   B texts; sentences/s of both together, median of the rounds. This is the ceiling.
1. ``drain``: ``--drain-jobs`` single-text ``embed`` jobs are submitted with the worker stopped,
   then one worker (2 processes, ``ORCH_MODEL_THREADS=1``, ``ORCH_MODEL_BATCH=B``, the tier's
   default ``max_batch_size``: 64 jobs per batch for nearline, run as model calls of B) drains
   them; rate from the first claim to the last finish. ``--drain-rounds`` times (3), each
   between its own raw measurements; the round with the median ratio is reported.
2. ``open``: single-text jobs on the interactive tier arrive as a Poisson process at fractions
   of the raw rate; percentiles of time-in-queue (``queue_seconds``: enqueue to claim) and of
   end-to-end latency (``finished_at - created_at``), and the mean batch fill.
3. ``bulk``: ``submit_bulk`` of ``--bulk-items`` texts on the offline tier; rate from the first
   chunk's start to the parent's end, and the peak RSS (``VmHWM``) of every worker process.

During each window the CPU time of the worker's processes, of this database's PostgreSQL
backends, of Redis and of this process is sampled, and what the rest of the machine used.
Results go to ``bench/results/batching.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import redis
from sqlalchemy import Engine, create_engine, delete, func, select, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(ROOT))

from bench.overhead import server_info, throwaway_database, wait_for_quiet  # noqa: E402
from bench.raw_onnx import TOKENS, sentences  # noqa: E402
from bench.report import machine_info  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.db.engine import normalize_url  # noqa: E402
from orchestrator.db.models import JobState, jobs  # noqa: E402
from orchestrator.errors import Overloaded  # noqa: E402
from orchestrator.local import LocalWorker  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.tiers import DEFAULT_POLICIES, Tier  # noqa: E402
from workers.models.embedding import (  # noqa: E402
    DEFAULT_EMBEDDING_MODEL,
    EmbeddingModel,
    embedding_files,
)

MODEL = DEFAULT_EMBEDDING_MODEL
TARGETS = {"drain_ratio": 0.85, "bulk_ratio": 0.90, "queue_p99_slack_ms": 10.0}
STEPS = ("drain", "open", "bulk")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLEAN_OTHERS_PCT = 10.0  # a raw round is clean when other processes used at most this much


# --- CPU and memory of the processes involved ------------------------------------------------


def _machine() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine (all cores) since boot."""
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(cpu) - cpu[3] - cpu[4]) / CLK_TCK, sum(cpu) / CLK_TCK


def _stat_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _backends(database: str) -> list[int]:
    """PIDs of the PostgreSQL backends serving ``database`` (not other benches' ones)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"postgres:") and f" {database} ".encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@dataclass
class CpuMeter:
    """CPU seconds by party, so a window's cost per item can be split between them."""

    worker: LocalWorker
    redis: redis.Redis
    database: str

    def snapshot(self) -> dict[str, float]:
        busy, total = _machine()
        info = self.redis.info("cpu")
        return {
            "worker_main": _stat_cpu(self.worker.proc.pid),
            "worker_pool": sum(_stat_cpu(pid) for pid in self.worker.children()),
            "postgres": sum(_stat_cpu(pid) for pid in _backends(self.database)),
            "redis": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            "bench": time.process_time(),
            "machine_busy": busy, "machine_total": total,
        }

    @staticmethod
    def per_item(before: dict[str, float], after: dict[str, float], items: int
                 ) -> dict[str, float]:
        """CPU ms per item by party, the machine's busy %, and the % used by everyone else."""
        d = {k: after[k] - before[k] for k in before}
        parties = ("worker_main", "worker_pool", "postgres", "redis", "bench")
        out = {f"{k}_ms": round(1000 * d[k] / max(items, 1), 3) for k in parties}
        total = max(d["machine_total"], 1e-9)
        out["machine_busy_pct"] = round(100 * d["machine_busy"] / total, 1)
        others = 100 * (d["machine_busy"] - sum(d[k] for k in parties)) / total
        out["others_pct"] = round(max(others, 0.0), 1)  # sampling jitter can go below 0
        return out


class RssSampler(threading.Thread):
    """Samples VmHWM and VmRSS of a worker's main and pool processes until stopped."""

    def __init__(self, worker: LocalWorker, every_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.worker, self.every_s = worker, every_s
        self.peaks: dict[int, dict[str, Any]] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for pid, role in [(self.worker.proc.pid, "main"),
                          *((c, "pool") for c in self.worker.children())]:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in lines
                  if ln.startswith(("VmHWM", "VmRSS"))}
            peak = self.peaks.setdefault(pid, {"role": role, "vm_hwm_mb": 0.0, "vm_rss_mb": 0.0})
            peak["vm_hwm_mb"] = max(peak["vm_hwm_mb"], round(kb.get("VmHWM", 0) / 1024, 1))
            peak["vm_rss_mb"] = max(peak["vm_rss_mb"], round(kb.get("VmRSS", 0) / 1024, 1))

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.sample()

    def stop(self) -> dict[str, Any]:
        self.sample()
        self._stop_event.set()
        self.join()
        return {"per_process": {str(pid): v for pid, v in self.peaks.items()},
                "max_vm_hwm_mb": max((v["vm_hwm_mb"] for v in self.peaks.values()), default=0),
                "sum_vm_hwm_mb": round(sum(v["vm_hwm_mb"] for v in self.peaks.values()), 1)}


# --- 0. raw onnxruntime ----------------------------------------------------------------------


def _raw_process(model_dir: str, batch: int, texts: list[str], rounds: int,
                 barrier: Any, out: Any) -> None:
    model = EmbeddingModel.from_dir(Path(model_dir), "int8", intra_op_threads=1)
    model.embed(texts[:batch])  # warm-up: first-run allocations
    spans = []
    for _ in range(rounds):
        barrier.wait()
        start, cpu, machine = time.perf_counter(), time.process_time(), _machine()
        for offset in range(0, len(texts) - batch + 1, batch):
            model.embed(texts[offset:offset + batch])
        # perf_counter is CLOCK_MONOTONIC: comparable across processes
        spans.append((start, time.perf_counter(), time.process_time() - cpu,
                      *machine, *_machine()))
    out.put(spans)


def raw_rate(model_dir: Path, batch: int, texts: list[str], rounds: int, procs: int = 2
             ) -> dict[str, Any]:
    """Sentences/s of ``procs`` single-threaded processes together, median of ``rounds``."""
    ctx = mp.get_context("spawn")  # no onnxruntime state crosses a fork
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_raw_process, args=(str(model_dir), batch, texts, rounds,
                                                      barrier, out)) for _ in range(procs)]
    for p in workers:
        p.start()
    spans = [out.get(timeout=600) for _ in workers]
    for p in workers:
        p.join()
    per_proc = (len(texts) // batch) * batch
    rates = [procs * per_proc / (max(s[r][1] for s in spans) - min(s[r][0] for s in spans))
             for r in range(rounds)]
    cpu_ms = 1000 * sum(s[r][2] for s in spans for r in range(rounds)) / (procs * per_proc * rounds)
    # What the rest of the machine used meanwhile, seen from the first process's round.
    others = []
    for r in range(rounds):
        _, _, _, busy0, total0, busy1, total1 = spans[0][r]
        ours = sum(s[r][2] for s in spans)
        others.append(100 * (busy1 - busy0 - ours) / max(total1 - total0, 1e-9))
    # The machine is shared: rounds another process disturbed do not count when others don't.
    clean = [r for r, o in zip(rates, others, strict=True) if o <= CLEAN_OTHERS_PCT]
    median = float(np.median(clean or rates))
    return {"batch": batch, "processes": procs, "intra_op_threads": 1,
            "sentences_per_s": round(median, 1), "clean_rounds": len(clean),
            "ms_per_batch_per_process": round(1000 * batch * procs / median, 2),
            "rounds": [round(r, 1) for r in rates],
            "cpu_ms_per_sentence": round(cpu_ms, 3),
            "others_pct": [round(max(o, 0.0), 1) for o in others]}


# --- the run's shared pieces -----------------------------------------------------------------


@dataclass
class Bench:
    """What every step of one run shares: settings, connections, sentences, model dir."""

    args: argparse.Namespace
    settings: Settings
    client: Client
    engine: Engine
    redis: redis.Redis
    database: str
    log_dir: Path
    texts: list[str]
    model_dir: Path
    raw_cpu_ms: float  # CPU per sentence of the raw run at B

    def cpu_bound(self, cpu: dict[str, float]) -> dict[str, float]:
        """The serving side's CPU per item against the raw run's: the ratio to raw that this
        cost allows on 2 otherwise idle cores (robust to what else the machine was doing)."""
        serving = sum(cpu[k] for k in ("worker_main_ms", "worker_pool_ms", "postgres_ms",
                                       "redis_ms"))
        return {"serving_cpu_ms_per_item": round(serving, 3),
                "raw_cpu_ms_per_item": self.raw_cpu_ms,
                "cpu_bound_ratio": round(self.raw_cpu_ms / max(serving, 1e-9), 3)}

    def quiet(self) -> float:
        """Wait for other processes to leave the CPUs (up to ``--quiet-wait``); busy % seen."""
        return wait_for_quiet(self.args.quiet_wait)

    def raw_now(self) -> float:
        """The raw rate at B right now: the machine's speed drifts, so throughput runs are
        bracketed by it."""
        return raw_rate(self.model_dir, self.args.batch, self.texts[:self.args.raw_sentences],
                        self.args.bracket_rounds)["sentences_per_s"]

    def ratios(self, rate: float, raw: float, before: float, after: float) -> dict[str, Any]:
        adjacent = (before + after) / 2
        return {"raw_before": before, "raw_after": after,
                "ratio_to_adjacent_raw": round(rate / adjacent, 3),
                "ratio_to_raw": round(rate / raw, 3)}

    def worker(self, tag: str) -> LocalWorker:
        return LocalWorker(self.settings, tiers="interactive,nearline,offline",
                           concurrency=self.args.concurrency, name=f"bench-{tag}@localhost",
                           log=self.log_dir / f"worker-{tag}.log").wait_ready(timeout=120)

    def submit_many(self, n: int, *, tier: str, tenant: str, threads: int) -> float:
        """Submit ``n`` single-text jobs from ``threads`` threads; return the seconds taken."""
        def part(k: int) -> None:
            for i in range(k, n, threads):
                self.client.submit("embed", {"texts": [self.texts[i % len(self.texts)]],
                                             "model": MODEL}, tier=tier, tenant=tenant)
        start = time.monotonic()
        _run_threads(part, threads)
        return time.monotonic() - start

    def ended(self, tenant: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(
                jobs.c.tenant == tenant, jobs.c.state.in_(JobState.TERMINAL))).scalar_one())

    def any_active(self, tenant: str) -> bool:
        """Whether a job of the tenant is still active: one probe of the partial index of
        active jobs, not a count over all of the tenant's rows (a count of 20,000 rows every
        half second took about 3% of a core from the run it measures, as PostgreSQL CPU)."""
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(
                jobs.c.tenant == tenant, jobs.c.state.in_(JobState.ACTIVE)).limit(1)).first() \
                is not None

    def wait_ended(self, tenant: str, n: int, worker: LocalWorker, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.any_active(tenant) or self.ended(tenant) < n:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{worker.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tenant}: {self.ended(tenant)}/{n} ended after "
                                   f"{timeout:g}s")
            time.sleep(0.5)

    def rows(self, tenant: str) -> dict[str, np.ndarray]:
        """Per job: state, queue seconds, end-to-end seconds, service seconds, batch."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(
                jobs.c.id, jobs.c.state, jobs.c.queue_seconds, jobs.c.created_at, jobs.c.started_at,
                jobs.c.finished_at, jobs.c.batch_id, jobs.c.batch_size, jobs.c.cpu_seconds,
            ).where(jobs.c.tenant == tenant)).all()
        return {
            "id": np.array([r.id for r in rows]),
            "state": np.array([r.state for r in rows]),
            "queue": np.array([r.queue_seconds or 0.0 for r in rows]),
            "e2e": np.array([(r.finished_at - r.created_at).total_seconds() for r in rows]),
            "service": np.array([(r.finished_at - r.started_at).total_seconds() for r in rows]),
            "started": np.array([r.started_at.timestamp() for r in rows]),
            "finished": np.array([r.finished_at.timestamp() for r in rows]),
            "batch_id": np.array([r.batch_id or "" for r in rows]),
            "batch_size": np.array([r.batch_size or 1 for r in rows]),
            "cpu": np.array([r.cpu_seconds for r in rows]),
        }

    def forget(self, tenant: str) -> None:
        """Delete a tenant's jobs (their attempts go with them) and vacuum: the next round
        finds the tables as the first did (with 2 KB results inline, 60,000 jobs outgrow
        PostgreSQL's default 128 MB of shared buffers)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(delete(jobs).where(jobs.c.tenant == tenant))
            conn.execute(text("VACUUM ANALYZE jobs"))
            conn.execute(text("VACUUM ANALYZE attempts"))

    def meter(self, worker: LocalWorker) -> CpuMeter:
        return CpuMeter(worker, self.redis, self.database)


def _run_threads(target: Callable[[int], None], n: int) -> None:
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            target(k)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _pcts(seconds: np.ndarray) -> dict[str, float]:
    p50, p95, p99 = (float(x) for x in np.percentile(seconds, [50, 95, 99])) \
        if len(seconds) else (0.0, 0.0, 0.0)
    return {"p50_ms": round(1000 * p50, 1), "p95_ms": round(1000 * p95, 1),
            "p99_ms": round(1000 * p99, 1),
            "max_ms": round(1000 * float(seconds.max()), 1) if len(seconds) else 0.0}


def _batches(rows: dict[str, np.ndarray]) -> dict[str, float]:
    _, first = np.unique(rows["batch_id"], return_index=True)
    sizes = rows["batch_size"][first]
    return {"batches": len(first), "mean_batch_size": round(float(sizes.mean()), 2),
            "mean_batch_size_per_job": round(float(rows["batch_size"].mean()), 2)}


def _past_cap(rows: dict[str, np.ndarray], delay_ms: float, slots: int) -> dict[str, Any]:
    """Per batch: its claim against its cap (the oldest job's enqueue + the delay), and how
    many slots were running other batches at that moment: says whether a late batch waited
    for a slot (all busy) or for its trigger to reach one (dispatch)."""
    ids, first = np.unique(rows["batch_id"], return_index=True)
    created = rows["started"] - rows["queue"]
    oldest = np.array([created[rows["batch_id"] == b].min() for b in ids])
    started, finished = rows["started"][first], rows["finished"][first]
    due = np.minimum(oldest + delay_ms / 1000, started)  # a full batch goes before its cap
    late = started - due
    busy = np.array([int(((started < d) & (finished > d)).sum()) for d in due])
    full = busy >= slots
    return {"claim_after_cap": _pcts(late),
            "batches_all_slots_busy_at_cap": round(float(full.mean()), 3),
            "claim_after_cap_slot_free": _pcts(late[~full]),
            "claim_after_cap_all_busy": _pcts(late[full])}


def _model_share(rows: dict[str, np.ndarray], cpu: dict[str, float]) -> dict[str, float]:
    """The kind's own CPU per job (tokenize + model, as the worker accounts it) against all
    the serving side spent per job: the rate this allows on an idle machine, as a fraction of
    the model's own, whatever else the machine was doing."""
    serving = sum(cpu[k] for k in ("worker_main_ms", "worker_pool_ms", "postgres_ms",
                                   "redis_ms"))
    kind_ms = 1000 * float(rows["cpu"].mean())
    return {"kind_cpu_ms_per_item": round(kind_ms, 3),
            "model_share_of_serving_cpu": round(kind_ms / max(serving, 1e-9), 3)}


def _states(rows: dict[str, np.ndarray]) -> dict[str, int]:
    names, counts = np.unique(rows["state"], return_counts=True)
    return {str(k): int(v) for k, v in zip(names, counts, strict=True)}


# --- 1. drain --------------------------------------------------------------------------------


def drain(bench: Bench, raw: float) -> dict[str, Any]:
    """``--drain-rounds`` drains, each between its own raw measurements; the report is the
    round with the median ratio (the lower one of the middle two for an even count), with
    every round's figures listed: the machine's speed drifts by several percent within
    minutes, more than the effects one wants to see."""
    rounds = []
    for r in range(bench.args.drain_rounds):
        if r:  # each round starts as the first did: no buffered state, no earlier rows
            bench.redis.flushdb()
            bench.forget(f"drain{r - 1}")
        rounds.append(drain_round(bench, raw, tenant=f"drain{r}"))
    bench.forget(f"drain{bench.args.drain_rounds - 1}")  # the next step starts as this did
    ranked = sorted(rounds, key=lambda d: d["ratio_to_adjacent_raw"])
    median = ranked[(len(ranked) - 1) // 2]
    return {**median, "round": rounds.index(median) + 1, "rounds": [
        {k: d[k] for k in ("items_per_s", "raw_before", "raw_after", "ratio_to_adjacent_raw",
                           "cpu_bound_ratio")} | {"busy_pct": d["cpu_ms_per_item"].get(
                               "machine_busy_pct")} for d in rounds]}


def drain_round(bench: Bench, raw: float, *, tenant: str) -> dict[str, Any]:
    args = bench.args
    n = args.drain_jobs
    submit_s = bench.submit_many(n, tier=args.drain_tier, tenant=tenant,
                                 threads=args.submit_threads)
    print(f"  drain: submitted {n} in {submit_s:.1f}s", flush=True)
    busy_before = bench.quiet()
    raw_before = bench.raw_now()
    worker = bench.worker("drain")
    ready = time.time()
    meter = bench.meter(worker)
    before = meter.snapshot()
    try:
        bench.wait_ended(tenant, n, worker, timeout=max(300.0, n / 20))
        ended = time.time()
        after = meter.snapshot()
    finally:
        worker.stop()
    raw_after = bench.raw_now()
    print(f"  drain: {n / (ended - ready):.1f} items/s from ready (seen by polling), raw "
          f"{raw_before} / {raw_after}/s around it", flush=True)
    rows = bench.rows(tenant)
    first_claim, last_finish = float(rows["started"].min()), float(rows["finished"].max())
    rate = n / (last_finish - first_claim)
    cpu = CpuMeter.per_item(before, after, n)
    return {
        "jobs": n, "tier": args.drain_tier, "submit_s": round(submit_s, 1),
        "busy_pct_before": busy_before,
        "submit_rate": round(n / submit_s, 1), "states": _states(rows),
        "ready_to_first_claim_s": round(first_claim - ready, 3),
        "window_s": round(last_finish - first_claim, 2),
        "items_per_s": round(rate, 1),
        "items_per_s_from_ready": round(n / (last_finish - ready), 1),
        **bench.ratios(rate, raw, raw_before, raw_after), **_batches(rows),
        "cpu_ms_per_item": cpu, **_model_share(rows, cpu), **bench.cpu_bound(cpu),
    }


# --- 2. open loop ----------------------------------------------------------------------------


def _arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 100)
    times = np.cumsum(gaps)
    return times[times < seconds]


def _poisson_submit(bench: Bench, times: np.ndarray, tenant: str, threads: int
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Submit one job at each arrival time (thread k takes arrivals k, k+threads, ...).

    Returns each submit's lateness against its schedule and its monotonic start (seconds, in
    arrival order), and the epoch time each admitted job's ``submit`` returned, by job id. A
    submit refused with ``Overloaded`` (admission control shedding load) is not retried.
    """
    late, actual = np.zeros(len(times)), np.zeros(len(times))
    returned: dict[str, float] = {}
    texts = bench.texts
    start = time.monotonic() + 0.05

    def part(k: int) -> None:
        if bench.args.client_nice:  # Linux: a thread's own nice value (who=0: this thread)
            os.setpriority(os.PRIO_PROCESS, 0, bench.args.client_nice)
        for i in range(k, len(times), threads):
            delay = start + times[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            actual[i] = time.monotonic()
            late[i] = actual[i] - start - times[i]
            try:
                handle = bench.client.submit("embed", {"texts": [texts[i % len(texts)]],
                                                       "model": MODEL},
                                             tier="interactive", tenant=tenant)
            except Overloaded:
                continue
            returned[handle.id] = time.time()
    _run_threads(part, threads)
    return late, actual, returned


def open_level(bench: Bench, worker: LocalWorker, fraction: float, raw: float, seed: int
               ) -> dict[str, Any]:
    args = bench.args
    tenant = f"load{round(100 * fraction)}"
    times = _arrivals(fraction * raw, args.load_seconds, seed)
    busy_before = bench.quiet()
    meter = bench.meter(worker)
    before = meter.snapshot()
    late, actual, returned = _poisson_submit(bench, times, tenant, args.submit_threads)
    n = len(returned)
    bench.wait_ended(tenant, n, worker, timeout=max(120.0, n / 50))
    after = meter.snapshot()
    rows = bench.rows(tenant)
    delay_ms = args.interactive_delay_ms
    queue, cpu = _pcts(rows["queue"]), CpuMeter.per_item(before, after, n)
    out = {
        "fraction_of_raw": fraction, "target_rate": round(fraction * raw, 1),
        "arrivals": len(times), "jobs": n, "rejected_overloaded": len(times) - n,
        "busy_pct_before": busy_before,
        "achieved_rate": round((len(times) - 1) / (actual.max() - actual.min()), 1),
        "admitted_rate": round(n / (actual.max() - actual.min()), 1),
        "submit_lateness": _pcts(late), "states": _states(rows),
        "time_in_queue": queue, "end_to_end": _pcts(rows["e2e"]),
        "claim_to_finish": _pcts(rows["service"]), **_batches(rows),
        **_split_queue(rows, returned),
        **_past_cap(rows, delay_ms, args.concurrency), "cpu_ms_per_item": cpu,
        **_model_share(rows, cpu), **bench.cpu_bound(cpu),
    }
    out["mean_batch_fill"] = round(out["mean_batch_size"] / args.interactive_batch, 3)
    out["queue_p99_target_ms"] = delay_ms + TARGETS["queue_p99_slack_ms"]
    out["queue_p99_met"] = bool(queue["p99_ms"] <= out["queue_p99_target_ms"])
    return out


def _split_queue(rows: dict[str, np.ndarray], returned: dict[str, float]) -> dict[str, Any]:
    """Time-in-queue in two parts: the enqueue stamp to ``submit`` returning (database write,
    buffer push, trigger publish), and from there to the claim (trigger delay, broker, pool)."""
    back = np.array([returned.get(i, np.nan) for i in rows["id"]])
    created = rows["started"] - rows["queue"]
    ok = ~np.isnan(back)
    return {"enqueue_to_submit_return": _pcts(back[ok] - created[ok]),
            "submit_return_to_claim": _pcts(rows["started"][ok] - back[ok])}


def open_loop(bench: Bench, raw: float) -> list[dict[str, Any]]:
    worker = bench.worker("open")
    try:
        bench.submit_many(64, tier="interactive", tenant="warmup", threads=1)
        bench.wait_ended("warmup", 64, worker, timeout=60)
        levels = []
        for k, fraction in enumerate(bench.args.loads):
            levels.append(open_level(bench, worker, fraction, raw, seed=k))
            lv = levels[-1]
            print(f"  open {fraction:.0%}: {lv['achieved_rate']}/s (target "
                  f"{lv['target_rate']}), queue p50/p99 {lv['time_in_queue']['p50_ms']}/"
                  f"{lv['time_in_queue']['p99_ms']} ms, e2e p99 {lv['end_to_end']['p99_ms']} "
                  f"ms, batch {lv['mean_batch_size']}, busy "
                  f"{lv['cpu_ms_per_item']['machine_busy_pct']}% (others "
                  f"{lv['cpu_ms_per_item']['others_pct']}%), enqueue->return p50 "
                  f"{lv['enqueue_to_submit_return']['p50_ms']} ms, return->claim p50/p99 "
                  f"{_three(lv['submit_return_to_claim'])} ms; claim after cap p50/p99 "
                  f"{_three(lv['claim_after_cap'])} ms (all slots busy at cap: "
                  f"{lv['batches_all_slots_busy_at_cap']:.0%}; slot free p99 "
                  f"{lv['claim_after_cap_slot_free']['p99_ms']} ms)", flush=True)
    finally:
        worker.stop()
    return levels


# --- 3. bulk ---------------------------------------------------------------------------------


def bulk(bench: Bench, raw: float) -> dict[str, Any]:
    args = bench.args
    busy_before = bench.quiet()
    raw_before = bench.raw_now()
    worker = bench.worker("bulk")
    sampler = RssSampler(worker)
    sampler.start()
    meter = bench.meter(worker)
    before = meter.snapshot()
    texts = bench.texts
    t0 = time.time()
    try:
        handle = bench.client.submit_bulk(
            "embed", (texts[i % len(texts)] for i in range(args.bulk_items)),
            params={"model": MODEL}, tier="offline", chunk_size=args.chunk_size)
        submit_s = time.time() - t0
        parent = _wait_parent(bench, handle.id, worker, timeout=max(600.0, args.bulk_items / 50))
        after = meter.snapshot()
        rss = sampler.stop()
    finally:
        worker.stop()
    raw_after = bench.raw_now()
    with bench.engine.connect() as conn:
        first_start = conn.execute(select(func.min(jobs.c.started_at))
                                   .where(jobs.c.parent_id == handle.id)).scalar_one()
    window = (parent.finished_at - first_start).total_seconds()
    rate = args.bulk_items / window
    cpu = CpuMeter.per_item(before, after, args.bulk_items)
    return {
        "items": args.bulk_items, "chunk_size": args.chunk_size, "state": parent.state,
        "busy_pct_before": busy_before,
        "items_done": parent.items_done, "submit_s": round(submit_s, 2),
        "submit_to_first_chunk_s": round(first_start.timestamp() - t0, 2),
        "window_s": round(window, 2), "items_per_s": round(rate, 1),
        **bench.ratios(rate, raw, raw_before, raw_after), "peak_rss": rss,
        "cpu_ms_per_item": cpu, **bench.cpu_bound(cpu),
    }


def _wait_parent(bench: Bench, job_id: str, worker: LocalWorker, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = bench.client.get(job_id)
        if job.terminal:
            return job
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"bulk job {job_id} is {job.state} ({job.items_done} items):\n"
                               f"{worker.output()[-3000:]}")
        time.sleep(0.2)


# --- report ----------------------------------------------------------------------------------


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "drain" in report:
        value = report["drain"]["ratio_to_adjacent_raw"]
        out["drain_ratio"] = {"target": TARGETS["drain_ratio"], "value": value,
                              "met": value >= TARGETS["drain_ratio"],
                              "cpu_bound_ratio": report["drain"]["cpu_bound_ratio"]}
    for level in report.get("open_loop", []):
        if level["fraction_of_raw"] <= 0.5:
            out[f"queue_p99_at_{round(100 * level['fraction_of_raw'])}pct"] = {
                "target_ms": level["queue_p99_target_ms"],
                "value_ms": level["time_in_queue"]["p99_ms"], "met": level["queue_p99_met"]}
    if "bulk" in report:
        value = report["bulk"]["ratio_to_adjacent_raw"]
        out["bulk_ratio"] = {"target": TARGETS["bulk_ratio"], "value": value,
                             "met": value >= TARGETS["bulk_ratio"],
                             "cpu_bound_ratio": report["bulk"]["cpu_bound_ratio"]}
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def _cpu_cells(cpu: dict[str, float]) -> list[Any]:
    return [cpu["worker_main_ms"], cpu["worker_pool_ms"], cpu["postgres_ms"], cpu["redis_ms"],
            cpu["bench_ms"], cpu["machine_busy_pct"], cpu["others_pct"]]


CPU_HEADER = ["main ms", "pool ms", "postgres ms", "redis ms", "bench ms", "busy %", "others %"]


def markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    lines = ["# Micro-batching against the model's own speed", "",
             f"{m['date']}, {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
             f"onnxruntime {m['versions']['onnxruntime']}, PostgreSQL "
             f"{m['servers']['postgres']}, Redis {m['servers']['redis']}. all-MiniLM-L6-v2 "
             f"int8, {TOKENS}-token sentences, B={cfg['batch']}, worker concurrency "
             f"{cfg['concurrency']} with 1 onnxruntime thread each. Command: "
             f"`{report['command']}`.", ""]
    lines += ["## Raw onnxruntime (2 processes x 1 thread, `EmbeddingModel.embed`)", ""]
    lines += _table(["batch", "sentences/s", "ms/batch/process", "CPU ms/sentence", "rounds",
                     "others % by round", "clean rounds"], [
        [r["batch"], r["sentences_per_s"], r["ms_per_batch_per_process"],
         r["cpu_ms_per_sentence"], r["rounds"], r["others_pct"], r["clean_rounds"]]
        for r in report["raw"]])
    lines += [f"sentences/s is the median of the rounds in which other processes used at most "
              f"{CLEAN_OTHERS_PCT:g}% of the machine (of all rounds when none was).", ""]
    if "drain" in report:
        lines += _md_drain(report["drain"], cfg)
    if "open_loop" in report:
        lines += _md_open(report["open_loop"], cfg)
    if "bulk" in report:
        lines += _md_bulk(report["bulk"])
    lines += ["## Targets", ""]
    lines += _table(["target", "threshold", "value", "met", "CPU-bound ratio"], [
        [name, v.get("target", v.get("target_ms")), v.get("value", v.get("value_ms")),
         "yes" if v["met"] else "**no**", v.get("cpu_bound_ratio", "")]
        for name, v in report["targets"].items()])
    lines += ["Ratios are to the raw rate at B measured right before and after the run "
              "(adjacent; the target uses it) and to the headline raw rate above. The CPU-bound "
              "ratio is the raw run's CPU per sentence over the serving side's CPU per item "
              "(worker, PostgreSQL, Redis): the ratio that cost allows on otherwise idle cores, "
              "whatever else the machine was doing. CPU columns are CPU ms per item in the "
              "window: the worker's main process, its pool, this database's PostgreSQL "
              "backends, Redis, this process; `others %` is the machine's CPU used by processes "
              "outside the run."]
    return "\n".join(lines) + "\n"


def _md_drain(d: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    lines = [f"## Drain ({d['jobs']} single-text jobs, {d['tier']} tier, max_batch "
             f"{cfg['drain_max_batch']}, model calls of {cfg['batch']})", ""]
    lines += _table(["items/s", *RATIO_HEADER, "items/s from ready", "mean batch", "batches",
                     "submit/s"],
                    [[d["items_per_s"], *_ratio_cells(d), d["items_per_s_from_ready"],
                      d["mean_batch_size"], d["batches"], d["submit_rate"]]])
    lines += _table(["kind CPU ms/item", "model share", "CPU-bound ratio", *CPU_HEADER],
                    [[d["kind_cpu_ms_per_item"], d["model_share_of_serving_cpu"],
                      d["cpu_bound_ratio"], *_cpu_cells(d["cpu_ms_per_item"])]])
    if len(d.get("rounds", [])) > 1:
        lines += [f"The tables show round {d['round']} of {len(d['rounds'])}, the one with the "
                  "median ratio; every round:", ""]
        lines += _table(["round", "items/s", "raw before / after", "ratio (adjacent raw)",
                         "CPU-bound ratio", "busy %"],
                        [[k + 1, r["items_per_s"], f"{r['raw_before']} / {r['raw_after']}",
                          r["ratio_to_adjacent_raw"], r["cpu_bound_ratio"], r["busy_pct"]]
                         for k, r in enumerate(d["rounds"])])
    return lines


def _md_open(levels: list[dict[str, Any]], cfg: dict[str, Any]) -> list[str]:
    lines = [f"## Open loop (interactive: max_batch {cfg['interactive_batch']}, "
             f"max_queue_delay {cfg['interactive_delay_ms']:g} ms; Poisson, "
             f"{cfg['load_seconds']:g} s a level)", ""]
    lines += _table(
        ["load", "target/s", "achieved/s", "admitted/s", "queue p50/p95/p99 ms",
         "e2e p50/p95/p99 ms", "enqueue→submit returns p50/p95/p99", "→claim p50/p95/p99",
         "mean batch", "fill", "submit late p99 ms", "busy %", "others %"],
        [[f"{lv['fraction_of_raw']:.0%}", lv["target_rate"], lv["achieved_rate"],
          lv["admitted_rate"], _three(lv["time_in_queue"]), _three(lv["end_to_end"]),
          _three(lv["enqueue_to_submit_return"]), _three(lv["submit_return_to_claim"]),
          lv["mean_batch_size"], lv["mean_batch_fill"], lv["submit_lateness"]["p99_ms"],
          lv["cpu_ms_per_item"]["machine_busy_pct"], lv["cpu_ms_per_item"]["others_pct"]]
         for lv in levels])
    return lines + _table(["load", "kind CPU ms/item", "model share", *CPU_HEADER], [
        [f"{lv['fraction_of_raw']:.0%}", lv["kind_cpu_ms_per_item"],
         lv["model_share_of_serving_cpu"], *_cpu_cells(lv["cpu_ms_per_item"])]
        for lv in levels])


def _md_bulk(b: dict[str, Any]) -> list[str]:
    lines = [f"## Bulk ({b['items']} texts, offline, chunks of {b['chunk_size']})", ""]
    lines += _table(["items/s", *RATIO_HEADER, "CPU-bound ratio", "peak RSS max MB",
                     "peak RSS sum MB"],
                    [[b["items_per_s"], *_ratio_cells(b), b["cpu_bound_ratio"],
                      b["peak_rss"]["max_vm_hwm_mb"], b["peak_rss"]["sum_vm_hwm_mb"]]])
    return lines + _table(CPU_HEADER, [_cpu_cells(b["cpu_ms_per_item"])])


RATIO_HEADER = ["raw before / after", "ratio (adjacent raw)", "ratio (headline raw)"]


def _ratio_cells(d: dict[str, Any]) -> list[Any]:
    return [f"{d['raw_before']} / {d['raw_after']}", d["ratio_to_adjacent_raw"],
            d["ratio_to_raw"]]


def _three(p: dict[str, float]) -> str:
    return f"{p['p50_ms']} / {p['p95_ms']} / {p['p99_ms']}"


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None,
                   help="holds all-MiniLM-L6-v2/ (default: ORCH_MODEL_DIR)")
    p.add_argument("--batch", type=int, default=16, help="B: model batch and drain max_batch")
    p.add_argument("--raw-batches", default="16,32", help="batch sizes for the raw ceiling")
    p.add_argument("--raw-rounds", type=int, default=5)
    p.add_argument("--raw-sentences", type=int, default=1024, help="per process per round")
    p.add_argument("--bracket-rounds", type=int, default=2,
                   help="raw rounds right before and after the drain and the bulk run")
    p.add_argument("--drain-jobs", type=int, default=20_000)
    p.add_argument("--drain-rounds", type=int, default=3,
                   help="drains, each between its own raw rounds; the median one is reported")
    p.add_argument("--drain-max-batch", type=int, default=None,
                   help="the drain tier's max_batch_size (default: the tier's own default, "
                        "64 for nearline; model calls are of B either way)")
    p.add_argument("--drain-tier", default="nearline", choices=["interactive", "nearline",
                                                                 "offline"])
    p.add_argument("--loads", default="0.25,0.5,0.9", help="fractions of the raw rate")
    p.add_argument("--load-seconds", type=float, default=25.0)
    p.add_argument("--interactive-batch", type=int, default=16)
    p.add_argument("--interactive-delay-ms", type=float, default=10.0)
    p.add_argument("--submit-threads", type=int, default=4)
    p.add_argument("--client-nice", type=int, default=0,
                   help="nice value of the open loop's submitting threads (e.g. 10: the load "
                        "generator yields the cores to the system under test, as if on "
                        "another host; it still pays for its own delays)")
    p.add_argument("--bulk-items", type=int, default=100_000)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="seconds to wait for other processes to go quiet before each step")
    p.add_argument("--only", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    p.add_argument("--quick", action="store_true",
                   help="2,000 drain jobs, 8 s a load level, 10,000 bulk items, 3 raw rounds")
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    p.add_argument("--redis-db", type=int, default=10, help="flushed before and after")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432",
                   help="server URL; a throwaway database is created and dropped")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--setting", action="append", default=[], metavar="ORCH_NAME=VALUE",
                   help="a worker setting for the run (repeatable), e.g. "
                        "ORCH_TIER_INTERACTIVE_DRAIN_BUDGET_S=3")
    p.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "orch-batching",
                   help="the workers' logs (kept)")
    args = p.parse_args(argv)
    if args.quick:
        args.drain_jobs, args.load_seconds = min(args.drain_jobs, 2000), min(args.load_seconds, 8)
        args.drain_rounds = 1
        args.bulk_items, args.raw_rounds = min(args.bulk_items, 10_000), min(args.raw_rounds, 3)
        args.raw_sentences, args.bracket_rounds = min(args.raw_sentences, 512), 1
    args.loads = [float(x) for x in args.loads.split(",") if x]
    args.drain_max_batch = args.drain_max_batch or \
        DEFAULT_POLICIES[Tier(args.drain_tier)].max_batch_size
    args.raw_batches = sorted({args.batch, *(int(x) for x in args.raw_batches.split(",") if x)})
    args.only = [s for s in args.only.split(",") if s]
    if bad := [s for s in args.setting if "=" not in s or not s.startswith("ORCH_")]:
        p.error(f"--setting takes ORCH_NAME=VALUE, got {bad}")
    if unknown := set(args.only) - set(STEPS):
        p.error(f"unknown step(s) {sorted(unknown)}; choose from {','.join(STEPS)}")
    return args


def bench_model_dir(source: Path, tmp: Path) -> Path:
    """A model dir holding only the embedding model (symlinked), so workers load only it."""
    graph, tokenizer = embedding_files(source, MODEL, "int8")
    if not (graph.is_file() and tokenizer.is_file()):
        sys.exit(f"{graph} or {tokenizer} is missing: run `orchestrator models export "
                 f"--model-dir {source}` first (or pass --model-dir)")
    target = tmp / "models"
    target.mkdir()
    (target / MODEL).symlink_to(graph.parent.resolve(), target_is_directory=True)
    return target


def worker_settings(args: argparse.Namespace, db_url: str, broker: str, tmp: Path,
                    model_dir: Path) -> Settings:
    return Settings.from_env({
        "ORCH_DATABASE_URL": db_url, "ORCH_BROKER_URL": broker, "ORCH_STATE_DIR": str(tmp),
        "ORCH_MODEL_DIR": str(model_dir), "ORCH_MODEL_THREADS": "1",
        "ORCH_MODEL_BATCH": str(args.batch), "ORCH_EMBED_VARIANT": "int8",
        f"ORCH_TIER_{args.drain_tier.upper()}_MAX_BATCH_SIZE": str(args.drain_max_batch),
        "ORCH_TIER_INTERACTIVE_MAX_BATCH_SIZE": str(args.interactive_batch),
        "ORCH_TIER_INTERACTIVE_MAX_QUEUE_DELAY_MS": str(args.interactive_delay_ms),
        **dict(item.split("=", 1) for item in args.setting),
    })


def _measure(bench: Bench, report: dict[str, Any], raw: float) -> None:
    steps: list[tuple[str, str, Callable[[Bench, float], Any]]] = [
        ("drain", "drain", drain), ("open", "open_loop", open_loop), ("bulk", "bulk", bulk)]
    for step, key, fn in steps:
        if step in bench.args.only:
            print(f"{step}", flush=True)
            report[key] = fn(bench, raw)
            bench.redis.flushdb()
            if isinstance(report[key], dict):
                brief = {k: v for k, v in report[key].items()
                         if k not in ("cpu_ms_per_item", "peak_rss")}
                print(f"  {json.dumps(brief)}", flush=True)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started = time.monotonic()
    info = machine_info()
    info["versions"].update({p: metadata.version(p)
                             for p in ("onnxruntime", "tokenizers", "numpy")})
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report: dict[str, Any] = {"command": command, "machine": info, "config": config}
    broker = f"{args.redis}/{args.redis_db}"
    with tempfile.TemporaryDirectory(prefix="orch-batching-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = bench_model_dir(args.model_dir or Settings.from_env().model_dir, tmp)
        texts = sentences(EmbeddingModel.from_dir(model_dir, "int8"), 1024)
        print("raw onnxruntime", flush=True)
        report["raw"] = []
        for batch in args.raw_batches:
            for _ in range(3):  # the headline needs most rounds undisturbed
                wait_for_quiet(args.quiet_wait)
                row = raw_rate(model_dir, batch, texts[:args.raw_sentences], args.raw_rounds)
                if 2 * row["clean_rounds"] > args.raw_rounds:
                    break
            report["raw"].append(row)
            print(f"  batch {batch}: {report['raw'][-1]['sentences_per_s']}/s", flush=True)
        at_b = next(r for r in report["raw"] if r["batch"] == args.batch)
        raw = at_b["sentences_per_s"]
        with throwaway_database(args.postgres) as db_url:
            settings = worker_settings(args, db_url, broker, tmp, model_dir)
            engine = create_engine(normalize_url(db_url))
            client = redis.Redis.from_url(broker)
            client.flushdb()
            bench = Bench(args=args, settings=settings, client=Client.from_settings(settings),
                          engine=engine, redis=client, database=db_url.rsplit("/", 1)[1],
                          log_dir=args.logs, texts=texts, model_dir=model_dir,
                          raw_cpu_ms=at_b["cpu_ms_per_sentence"])
            info["servers"] = server_info(engine, client)
            try:
                _measure(bench, report, raw)
            finally:
                bench.client.close()
                engine.dispose()
                client.flushdb()
                client.close()
    info["loadavg_at_end"] = os.getloadavg()
    report["targets"] = verdicts(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Stopped with SIGTERM, still stop the workers and drop the throwaway database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = " ".join([".venv/bin/python bench/batching.py",
                        *(sys.argv[1:] if argv is None else argv)])
    report = run(args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "batching.md").write_text(markdown(report))
    print((args.out / "batching.md").read_text())


if __name__ == "__main__":
    main()
