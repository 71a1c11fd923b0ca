"""What the orchestrator costs per job against vanilla Celery, on the same Redis and cores.

    .venv/bin/python bench/overhead.py [--jobs 10000] [--rounds 3]

Each round measures, alternating the order of the sides:

* ``celery``: a plain Celery app and a no-op task (``bench/vanilla.py``), 2 prefork processes;
* ``celery-matched`` (only with ``--matched``): the same no-op task under the orchestrator's
  Celery settings (late ack, no prefetch, three priority queues), which separates the cost of
  the Celery configuration from the cost of the database;
* ``orchestrator``: ``echo`` jobs through ``Client.submit`` and an ``orchestrator worker``
  subprocess, every job durable in a throwaway PostgreSQL database;

each in two modes: ``drain`` (submit everything, then start the worker: pure drain rate) and
``e2e`` (worker ready first, then submit: first submit to last completion). During each window
the CPU time of the worker processes, PostgreSQL, Redis and this process is sampled, so the
per-job cost can be split between them. An in-process breakdown of the worker's per-job path
(``bench/breakdown.py``) follows. Results go to ``bench/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis import Redis
from sqlalchemy import Engine, create_engine, func, select, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(ROOT))

from bench import breakdown, vanilla  # noqa: E402
from bench.report import (  # noqa: E402
    MODES,
    TARGET_RATIO,
    cpu_budget,
    machine_info,
    markdown,
    medians,
    ratios,
)
from orchestrator.broker import publish  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.db.engine import normalize_url  # noqa: E402
from orchestrator.db.migrate import upgrade  # noqa: E402
from orchestrator.db.models import JobState, attempts, jobs  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.tiers import TIER_ORDER, Tier, TierPolicy  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes and CPU accounting ------------------------------------------------------------


class Worker:
    """A worker subprocess in its own process group, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for Celery's "ready." line (logged at INFO)."""
        deadline = time.monotonic() + timeout
        while "ready." not in self.log_path.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready after {timeout:g}s:\n{self.tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM the group (warm shutdown), SIGKILL it if it lingers."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            self.proc.wait()


def _proc_cpu(pgid: int | None) -> tuple[float, float]:
    """CPU seconds of the processes in group ``pgid`` and of all ``postgres`` processes."""
    group = postgres = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if pgid is not None and int(fields[2]) == pgid:
            group += cpu
        elif comm == "postgres":
            postgres += cpu
    return group, postgres


@dataclass(frozen=True)
class CpuSample:
    wall: float
    worker: float
    postgres: float
    redis: float
    submitter: float
    busy: float
    total: float
    done: int

    @classmethod
    def take(cls, worker: Worker | None, client: Redis, done: int) -> CpuSample:
        group, postgres = _proc_cpu(worker.proc.pid if worker else None)
        info = client.info("cpu")
        cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = cpu[3] + cpu[4]
        return cls(
            wall=time.monotonic(), worker=group, postgres=postgres,
            redis=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            submitter=time.process_time(), busy=(sum(cpu) - idle) / CLK_TCK,
            total=sum(cpu) / CLK_TCK, done=done,
        )

    def per_job_ms(self, later: CpuSample) -> dict[str, float]:
        """CPU milliseconds per job completed between the two samples, by process."""
        jobs_done = max(later.done - self.done, 1)
        out = {
            name: round(1000 * (getattr(later, name) - getattr(self, name)) / jobs_done, 4)
            for name in ("worker", "postgres", "redis", "submitter")
        }
        busy = later.busy - self.busy
        # Whatever else ran on the machine meanwhile (other processes, the kernel): a large
        # figure here means the window was disturbed and its rates are not to be trusted.
        out["other"] = round(1000 * busy / jobs_done - sum(out.values()), 4)
        out["machine_busy_pct"] = round(100 * busy / max(later.total - self.total, 1e-9), 1)
        out["jobs_in_window"] = jobs_done
        return out


# --- the three sides ---------------------------------------------------------------------------


@dataclass
class Bench:
    """Resources shared by every measurement of one run."""

    args: argparse.Namespace
    redis: redis.Redis
    broker_url: str
    engine: Engine
    settings: Settings
    client: Client
    log_dir: Path

    def worker_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return {**env, **extra}


class Side:
    """One system under test: how to reset it, submit to it, start its worker, and read it."""

    name = ""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def reset(self) -> None:
        self.bench.redis.flushdb()

    def submit_all(self, n: int) -> None:
        raise NotImplementedError

    def done(self) -> int:
        raise NotImplementedError

    def window(self) -> tuple[float, float]:
        """Epoch seconds of the first and the last completion."""
        raise NotImplementedError

    def start_worker(self, tag: str) -> Worker:
        raise NotImplementedError

    def verify(self, n: int) -> dict[str, Any]:
        return {}


class CelerySide(Side):
    def __init__(self, bench: Bench, *, matched: bool) -> None:
        super().__init__(bench)
        self.matched = matched
        self.name = "celery-matched" if matched else "celery"
        self.app = vanilla.make_app(bench.broker_url, matched=matched)

    def submit_all(self, n: int) -> None:
        if self.matched:  # exactly the orchestrator's publish, minus the database row
            for i in range(n):
                publish(self.app, str(i), Tier.INTERACTIVE, 0, time_limit=60)
        else:
            for i in range(n):
                self.app.send_task(vanilla.TASK_NAME, args=[i])

    def done(self) -> int:
        return int(self.bench.redis.get(vanilla.DONE_KEY) or 0)

    def window(self) -> tuple[float, float]:
        first, last = self.bench.redis.mget(vanilla.FIRST_KEY, vanilla.LAST_KEY)
        if first is None or last is None:
            raise RuntimeError("the vanilla workers recorded no finished task")
        return float(first), float(last)

    def start_worker(self, tag: str) -> Worker:
        argv = [sys.executable, "-m", "bench.vanilla", "--broker", self.bench.broker_url,
                "--concurrency", str(self.bench.args.concurrency)]
        if self.matched:
            argv.append("--matched")
        return Worker(argv, self.bench.worker_env({}),
                      self.bench.log_dir / f"{self.name}-{tag}.log")


class OrchestratorSide(Side):
    name = "orchestrator"

    def reset(self) -> None:
        super().reset()
        with self.bench.engine.begin() as conn:
            conn.execute(text("TRUNCATE attempts, job_events, jobs, tenants"))

    def submit_all(self, n: int) -> None:
        client = self.bench.client
        for i in range(n):
            client.submit("echo", {"i": i})  # echo's default tier is interactive

    def done(self) -> int:
        with self.bench.engine.connect() as conn:
            return int(conn.execute(
                select(func.count()).where(jobs.c.state == JobState.SUCCEEDED)
            ).scalar_one())

    def window(self) -> tuple[float, float]:
        with self.bench.engine.connect() as conn:
            first, last = conn.execute(
                select(func.min(jobs.c.finished_at), func.max(jobs.c.finished_at))
            ).one()
        return first.timestamp(), last.timestamp()

    def start_worker(self, tag: str) -> Worker:
        argv = [sys.executable, "-m", "orchestrator", "worker",
                "--tiers", "interactive,nearline,offline",
                "--concurrency", str(self.bench.args.concurrency), "--loglevel", "INFO"]
        return Worker(argv, self.bench.worker_env(self.bench.settings.to_env()),
                      self.bench.log_dir / f"{self.name}-{tag}.log")

    def verify(self, n: int) -> dict[str, Any]:
        with self.bench.engine.connect() as conn:
            states: dict[str, int] = dict(conn.execute(
                select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
            n_attempts = conn.execute(select(func.count()).select_from(attempts)).scalar_one()
        if states != {JobState.SUCCEEDED: n} or n_attempts != n:
            raise RuntimeError(f"unexpected end state: {states}, {n_attempts} attempts")
        return {"attempts": n_attempts}


# --- one measurement ---------------------------------------------------------------------------


STALL_S = 60.0
QUIET_BUSY_PCT = 25.0


def _busy_pct(seconds: float) -> float:
    def read() -> tuple[int, int]:
        cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(cpu) - cpu[3] - cpu[4], sum(cpu)
    busy0, total0 = read()
    time.sleep(seconds)
    busy1, total1 = read()
    return 100 * (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs nearly idle.

    Returns the last busy percentage seen; the machine is shared, so it goes in the figures.
    """
    deadline = time.monotonic() + max_wait_s
    busy = _busy_pct(1.0)
    while busy > QUIET_BUSY_PCT and time.monotonic() < deadline:
        busy = _busy_pct(2.0)
    return round(busy, 1)


class Stalled(RuntimeError):
    """Raised when no job completes for ``STALL_S``: the worker hangs or the messages are gone.

    On a shared machine the usual cause is another process flushing the benchmark's Redis DB.
    """


def _wait_until(done: Callable[[], int], n: int, worker: Worker) -> None:
    count, progressed = done(), time.monotonic()
    while count < n:
        worker.check_alive()
        time.sleep(0.1)
        now = done()
        if now > count:
            count, progressed = now, time.monotonic()
        elif time.monotonic() - progressed > STALL_S:
            raise Stalled(f"no job finished for {STALL_S:g}s ({count}/{n} done): messages "
                          f"lost (Redis DB flushed by someone else?) or worker stuck\n"
                          f"{worker.tail()}")


def measure(side: Side, mode: str, n: int, tag: str) -> dict[str, Any]:
    """Submit ``n`` jobs and drain them; rates in items per second."""
    side.reset()
    bench = side.bench
    worker = None
    try:
        if mode == "e2e":
            worker = side.start_worker(tag)
            worker.wait_ready()
        before = CpuSample.take(worker, bench.redis, 0)
        t0 = time.time()
        side.submit_all(n)
        submit_s = time.time() - t0
        if worker is None:
            worker = side.start_worker(tag)
            worker.wait_ready()
            before = CpuSample.take(worker, bench.redis, side.done())
        _wait_until(side.done, n, worker)
        after = CpuSample.take(worker, bench.redis, n)
    finally:
        if worker is not None:
            worker.stop()
    first, last = side.window()
    out: dict[str, Any] = {
        "submit_rate": round(n / submit_s, 1),
        "drain_rate": round((n - 1) / (last - first), 1),
        "cpu_ms_per_job": before.per_job_ms(after),
    }
    if mode == "e2e":
        out["e2e_rate"] = round(n / (last - t0), 1)
    out.update(side.verify(n))
    print(f"  {side.name:15} {mode:5} submit {out['submit_rate']:8.1f}/s  drain "
          f"{out['drain_rate']:8.1f}/s" + (f"  e2e {out['e2e_rate']:8.1f}/s" if mode == "e2e"
                                          else ""), flush=True)
    return out


# --- the run -----------------------------------------------------------------------------------


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped afterwards."""
    name = f"orch_bench_{secrets.token_hex(4)}"
    admin = create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = f"{server_url}/{name}"
        try:
            upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def admission_off() -> dict[str, str]:
    """Settings that switch off admission control's load shedding: the bench floods on purpose.

    The admission check itself still runs on every submit, so its cost is measured.
    """
    fields = [f for f in ("queue_wait_objective_s", "max_backlog", "hard_backlog")
              if f in TierPolicy.model_fields]
    return {f"ORCH_TIER_{tier.name}_{f.upper()}": "0" for tier in TIER_ORDER for f in fields}


def check_redis_db_unused(url: str) -> None:
    """Refuse a Redis DB that other clients use: a stray worker there would eat our messages.

    Raises:
        SystemExit: some client is connected to that DB.
    """
    client = redis.Redis.from_url(url)
    try:
        db = client.connection_pool.connection_kwargs.get("db", 0)
        me = str(client.client_id())
        others = [c for c in client.client_list()
                  if int(c.get("db", -1)) == db and str(c.get("id")) != me]
    finally:
        client.close()
    if others:
        raise SystemExit(f"Redis DB {db} has {len(others)} other client(s) (a worker left "
                         "running?); stop them or pick another --redis-db")


def server_info(engine: Engine, client: redis.Redis) -> dict[str, str]:
    with engine.connect() as conn:
        pg = {name: conn.execute(text(f"SHOW {name}")).scalar_one()
              for name in ("server_version", "synchronous_commit", "fsync")}
    return {"postgres": pg["server_version"], "synchronous_commit": pg["synchronous_commit"],
            "fsync": pg["fsync"], "redis": str(client.info("server")["redis_version"])}


def measure_retrying(side: Side, mode: str, n: int, tag: str, tries: int = 2
                     ) -> dict[str, Any]:
    """``measure``, once more if it stalled (a shared machine); the figures say how often."""
    for attempt in range(1, tries + 1):
        busy_before = wait_for_quiet(side.bench.args.quiet_wait)
        try:
            return {**measure(side, mode, n, tag), "tries": attempt,
                    "busy_pct_before": busy_before}
        except Stalled as e:
            if attempt == tries:
                raise
            print(f"  {side.name} {mode}: {str(e).splitlines()[0]}; measuring again", flush=True)
    raise AssertionError("unreachable")


def run_rounds(sides: list[Side], args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]  # alternate: the machine drifts
        figures: dict[str, dict[str, Any]] = {side.name: {} for side in sides}
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for mode in MODES:
            for side in order:
                figures[side.name][mode] = measure_retrying(side, mode, args.jobs,
                                                            f"r{r}-{mode}")
        rounds.append(figures)
    return rounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--redis-db", type=int, default=12, help="flushed before each run")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432",
                        help="server URL; a throwaway database is created and dropped")
    parser.add_argument("--breakdown-jobs", type=int, default=1000)
    parser.add_argument("--matched", action="store_true",
                        help="also run the no-op task under the orchestrator's Celery settings")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait for other processes to go quiet before each "
                        "measurement (the machine may be shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    broker_url = f"{args.redis}/{args.redis_db}"
    check_redis_db_unused(broker_url)
    # A SIGTERM unwinds like Ctrl-C: workers are stopped and the database is dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine_info()
    with throwaway_database(args.postgres) as db_url, \
            tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        settings = Settings.from_env({"ORCH_DATABASE_URL": db_url, "ORCH_BROKER_URL": broker_url,
                                      "ORCH_STATE_DIR": tmp, **admission_off()})
        engine = create_engine(normalize_url(db_url))
        bench = Bench(args=args, redis=redis.Redis.from_url(broker_url), broker_url=broker_url,
                      engine=engine, settings=settings, client=Client.from_settings(settings),
                      log_dir=Path(tmp))
        info["servers"] = server_info(engine, bench.redis)
        try:
            sides: list[Side] = [CelerySide(bench, matched=False), OrchestratorSide(bench)]
            if args.matched:
                sides.insert(1, CelerySide(bench, matched=True))
            rounds = run_rounds(sides, args)
            print("in-process breakdown of the worker's per-job path", flush=True)
            parts = breakdown.run(settings, bench.redis, args.breakdown_jobs,
                                  reset=OrchestratorSide(bench).reset)
        finally:
            bench.client.close()
            engine.dispose()
            bench.redis.flushdb()
            bench.redis.close()
    med = medians(rounds)
    info["loadavg_at_end"] = os.getloadavg()
    report = {
        "command": " ".join(["python bench/overhead.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": info,
        "config": {"jobs": args.jobs, "rounds": args.rounds, "concurrency": args.concurrency,
                   "sides": [s.name for s in sides], "modes": list(MODES)},
        "rounds": rounds, "medians": med, "ratio_to_celery": ratios(med),
        "cpu_budget": cpu_budget(med, os.cpu_count() or 1),
        "target_ratio": TARGET_RATIO, "breakdown": parts,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "overhead.md").write_text(markdown(report))
    print((args.out / "overhead.md").read_text())


if __name__ == "__main__":
    main()
