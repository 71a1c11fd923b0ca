"""Where a job's time goes, measured in-process against PostgreSQL, without Celery.

Jobs are submitted with ``Client.submit`` (published too, to time that; the messages are then
dropped) and run one by one with ``Runtime.execute``, the code a pool process runs per message.
Every SQL statement, COMMIT, pre-ping and rollback is timed through SQLAlchemy events and
wrapped dialect methods, and the steps of both paths (create, admission, publish; claim,
finish, done signal) are timed around the calls. ``Runtime.execute`` also runs under cProfile.
Then one claim + finish is re-timed with the alternatives in ``store_variants`` and on engines
configured differently, to put numbers on the ways to make it cheaper.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, create_engine, event

from bench import store_variants
from orchestrator import client as client_module
from orchestrator.client import Client
from orchestrator.db.engine import normalize_url
from orchestrator.db.models import JobState
from orchestrator.db.store import JobStore, NewJob
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.runtime import Runtime

CPU_LABEL = "CPU time of this process"
_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM)\s+(\w+)", re.IGNORECASE)


def _label(statement: str) -> str:
    verb = statement.split(None, 1)[0].upper()
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1)}" if table else verb


class Timer:
    """Accumulates wall time by label; ``phase`` prefixes what the engine reports."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.phase = "setup"

    def add(self, label: str, seconds: float) -> None:
        self.totals[label] += seconds
        self.counts[label] += 1

    def wrap(self, label: str, fn: Callable[..., Any], *,
             phased: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(f"{self.phase}:{label}" if phased else label, time.perf_counter() - t0)
        return timed

    def instrument(self, engine: Engine) -> None:
        """Time every statement, COMMIT, ROLLBACK and pre-ping the engine issues."""
        starts: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            starts[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            t0 = starts.pop(id(cursor), None)
            if t0 is not None:
                self.add(f"{self.phase}:sql {_label(statement)}", time.perf_counter() - t0)

        dialect = engine.dialect
        for name in ("do_commit", "do_rollback", "do_ping"):
            setattr(dialect, name, self.wrap(name.removeprefix("do_"), getattr(dialect, name),
                                             phased=True))

    def per_job_us(self, prefix: str, n: int) -> dict[str, dict[str, Any]]:
        rows = {
            label.removeprefix(prefix): {
                "us_per_job": round(1e6 * total / n, 1),
                "calls_per_job": (round(self.counts[label] / n, 2)
                                  if not label.endswith(CPU_LABEL) else "-"),
            }
            for label, total in self.totals.items() if label.startswith(prefix)
        }
        return dict(sorted(rows.items(), key=lambda kv: -float(kv[1]["us_per_job"])))


def _new_job(i: int) -> NewJob:
    return NewJob(tenant="default", kind="echo", tier=Tier.INTERACTIVE.value, priority=0,
                  payload={"i": i}, max_attempts=3)


def _submit(services: Services, n: int, timer: Timer) -> list[str]:
    """``Client.submit`` of ``echo`` jobs, with its steps timed where this version has them."""
    client = Client(services)  # shares the instrumented engine; closed with ``services``
    targets = [(services.store, "create", "JobStore.create"),
               (client_module, "publish", "broker.publish"),
               (client, "_admit", "Client._admit (admission + quotas)")]
    targets = [t for t in targets if hasattr(t[0], t[1])]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for obj, name, label in targets:
        setattr(obj, name, timer.wrap(f"submit:{label}", getattr(obj, name)))
    submit = timer.wrap("submit:Client.submit", client.submit)
    timer.phase = "submit"
    cpu0 = time.process_time()
    try:
        ids = [submit("echo", {"i": i}).id for i in range(n)]
    finally:
        timer.add(f"submit:{CPU_LABEL}", time.process_time() - cpu0)
        for obj, name, original in originals:
            if obj is client_module:
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # back to the class's method
    return ids


def _hot_methods(store: JobStore) -> list[str]:
    """The store methods the runtime calls per job (the batch-aware ones when they exist)."""
    return [many if hasattr(store, many) else one
            for one, many in (("claim", "claim_many"), ("finish", "finish_many"))]


def _execute(services: Services, ids: list[str], timer: Timer) -> float:
    """Run every job through ``Runtime.execute``; return the wall seconds it took."""
    runtime = Runtime(services, worker="bench:in-process")
    targets: list[tuple[object, str, str]] = [
        (services.store, name, f"JobStore.{name}") for name in _hot_methods(services.store)]
    targets.append((services, "signal_done", "Services.signal_done"))
    for obj, name, label in targets:
        setattr(obj, name, timer.wrap(f"execute:{label}", getattr(obj, name)))
    execute = timer.wrap("execute:Runtime.execute", runtime.execute)
    timer.phase = "execute"
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        for job_id in ids:
            if execute(job_id) != JobState.SUCCEEDED:
                raise RuntimeError(f"job {job_id} did not succeed in-process")
    finally:
        timer.add(f"execute:{CPU_LABEL}", time.process_time() - cpu0)
        for obj, name, _label in targets:
            delattr(obj, name)  # back to the class's method
    return time.perf_counter() - t0


# Where ``execute`` goes: the project's own steps (matched by name in any module of
# ``orchestrator/`` or ``workers/``, which move between files) and a few library functions
# (matched by file and name). Those missing in this version are simply absent from the report.
OWN_STEPS = {"execute", "_run_claims", "_finish", "claim", "claim_many", "finish",
             "finish_many", "signal_done", "record_service", "call_kind", "validate",
             "__enter__", "__exit__"}
LIBRARY_STEPS = {
    ("base.py", "_do_ping_w_event"), ("coercions.py", "expect"),
    ("cache_key.py", "_generate_cache_key"), ("base.py", "_execute_context"),
    ("connection.py", "wait"), ("threading.py", "start"), ("threading.py", "join"),
}


def _watched(path: str, name: str) -> bool:
    if "/orchestrator/" in path or "/workers/" in path:
        return name in OWN_STEPS
    return (path.rsplit("/", 1)[-1], name) in LIBRARY_STEPS


def _profile(services: Services, n: int, top: int = 12) -> dict[str, list[dict[str, Any]]]:
    """cProfile ``Runtime.execute`` over ``n`` fresh jobs (times are inflated by the profiler)."""
    ids = [services.store.create(_new_job(i))[0] for i in range(n)]
    runtime = Runtime(services, worker="bench:profile")
    profiler = cProfile.Profile()
    profiler.enable()
    for job_id in ids:
        runtime.execute(job_id)
    profiler.disable()
    entries = pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]

    def row(key: tuple[str, int, str], value: tuple[Any, ...]) -> dict[str, Any]:
        path, line, name = key
        short = next((path[path.index(d) + 1:] for d in ("/orchestrator/", "/workers/")
                      if d in path), path.rsplit("/", 1)[-1])
        return {"function": f"{short}:{line}({name})",
                "calls_per_job": round(value[1] / n, 2),
                "own_us_per_job": round(1e6 * value[2] / n, 1),
                "cum_us_per_job": round(1e6 * value[3] / n, 1)}

    watched = [row(k, v) for k, v in entries if _watched(k[0], k[2])]
    return {
        "watched_by_cumulative": sorted(watched, key=lambda r: -r["cum_us_per_job"]),
        "top_by_own_time": [row(k, v) for k, v in
                            sorted(entries, key=lambda kv: -kv[1][2])[:top]],
    }


def _time_steps(step: store_variants.Step, ids: list[str]) -> dict[str, float]:
    samples = []
    cpu0 = time.process_time()
    for job_id in ids:
        t0 = time.perf_counter()
        step(job_id)
        samples.append(time.perf_counter() - t0)
    return {"wall_median_us": round(1e6 * statistics.median(samples), 1),
            "client_cpu_us": round(1e6 * (time.process_time() - cpu0) / len(ids), 1)}


VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("JobStore as shipped (pool_pre_ping, synchronous_commit=on)", "shipped",
     {"pool_pre_ping": True}),
    ("JobStore, no pool_pre_ping", "shipped", {"pool_pre_ping": False}),
    ("JobStore, synchronous_commit=off", "shipped",
     {"pool_pre_ping": True, "connect_args": {"options": "-c synchronous_commit=off"}}),
    ("prebuilt statements, pool_pre_ping", "prebuilt", {"pool_pre_ping": True}),
    ("prebuilt statements, no pool_pre_ping", "prebuilt", {"pool_pre_ping": False}),
    ("one CTE statement per transition, pool_pre_ping", "cte", {"pool_pre_ping": True}),
    ("one CTE statement per transition, no pool_pre_ping", "cte", {"pool_pre_ping": False}),
]


def _variants(url: str, n: int, reset: Callable[[], None]) -> dict[str, dict[str, float]]:
    """claim + finish (as on success), per store implementation and engine configuration."""
    out = {}
    for name, builder, kwargs in VARIANTS:
        reset()
        engine = create_engine(normalize_url(url), **kwargs)
        try:
            store = JobStore(engine)
            ids = [store.create(_new_job(i))[0] for i in range(n)]
            out[name] = _time_steps(store_variants.BUILDERS[builder](engine), ids)
        finally:
            engine.dispose()
    return out


def _round_trip_us(url: str, n: int = 2000) -> dict[str, float]:
    """Median microseconds of a bare ``SELECT 1`` and of a one-row committed write."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bench_rt (x int)")
        out = {}
        for name, sql in (("SELECT 1 (autocommit)", "SELECT 1"),
                          ("INSERT + commit (fsync on)", "INSERT INTO bench_rt VALUES (1)")):
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                conn.execute(sql)
                samples.append(time.perf_counter() - t0)
            out[name] = round(1e6 * statistics.median(samples), 1)
    return out


def run(settings: Settings, client: redis.Redis, n: int, *,
        reset: Callable[[], None]) -> dict[str, Any]:
    """Measure the per-job path for ``n`` jobs; ``reset`` empties the tables and the broker."""
    reset()
    services = Services.open(settings)
    timer = Timer()
    try:
        timer.instrument(services.engine)
        ids = _submit(services, n, timer)
        client.flushdb()  # the messages were only published to time publishing
        wall = _execute(services, ids, timer)
        timer.phase = "profile"
        profile = _profile(services, max(n // 4, 1))
    finally:
        services.close()
    url = settings.resolved_database_url()
    return {
        "jobs": n,
        "in_process_rate_one_process": round(n / wall, 1),
        "submit_us_per_job": timer.per_job_us("submit:", n),
        "execute_us_per_job": timer.per_job_us("execute:", n),
        "profile": profile,
        "claim_finish_by_variant": _variants(url, max(n // 2, 1), reset),
        "round_trip_median_us": _round_trip_us(normalize_url(url)),
    }

