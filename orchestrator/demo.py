"""``orchestrator demo``: the whole system on the embedded default, in well under a minute.

It brings up the private Redis and the SQLite file (or uses ORCH_* URLs if set), migrates,
starts a reserved interactive worker and a shared strict-order worker, streams a mixed workload
across three tiers and three tenants (an offline backlog first, then steady interactive and
nearline arrivals), waits with a progress display, prints what happened, and shuts down.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.client import Client, JobHandle
from orchestrator.db.models import JobState
from orchestrator.db.store import JobView
from orchestrator.errors import InvalidPayload
from orchestrator.local import LocalWorker
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

TENANTS = ("acme", "globex", "initech")


@dataclass(frozen=True)
class Planned:
    kind: str
    payload: dict[str, object]
    tier: str
    tenant: str
    key: str | None = None


def plan_workload(rng: random.Random, run: str) -> tuple[list[Planned], list[Planned]]:
    """An offline backlog submitted first, then a stream of interactive and nearline work.

    Idempotency keys carry ``run`` so a second demo on the same database submits anew.
    """
    backlog = [
        Planned("burn", {"ms": 150}, "offline", rng.choice(TENANTS), key=f"{run}-nightly-{i}")
        for i in range(16)
    ]
    stream: list[Planned] = []
    for i in range(120):
        tenant = TENANTS[i % 3]
        if i % 4 == 3:
            payload: dict[str, object] = {"ms": 25}
            if i % 20 == 3:
                payload["fail_attempts"] = 1  # a transient failure, retried with backoff
            stream.append(Planned("burn", payload, "nearline", tenant))
        elif i % 2:
            stream.append(Planned("burn", {"ms": 4}, "interactive", tenant))
        else:
            stream.append(Planned("echo", {"query": f"q{i}"}, "interactive", tenant,
                                  key=f"{run}-req-{i}"))
    stream.append(Planned("burn", {"ms": 1, "fail_permanently": True}, "nearline", "globex"))
    return backlog, stream


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_demo(settings: Settings | None = None, *, console: Console | None = None,
             seed: int = 7) -> int:
    """Run the demo; return the process exit code (0 when every job ended as expected)."""
    console = console or Console()
    settings = settings or Settings.from_env()
    rng = random.Random(seed)
    where = ("embedded: SQLite + private Redis under " + str(settings.state_dir)
             if settings.database_url is None and settings.broker_url is None else
             "configured ORCH_DATABASE_URL / ORCH_BROKER_URL")
    console.print(f"[bold]orchestrator demo[/bold] ({where})")
    started = time.monotonic()
    with Client.from_settings(settings) as client:
        logs = Path(tempfile.mkdtemp(prefix="orchestrator-demo-"))
        workers = [
            LocalWorker(settings, tiers="interactive", concurrency=1,
                        name="demo-interactive@local", log=logs / "interactive.log"),
            LocalWorker(settings, tiers="interactive,nearline,offline", concurrency=1,
                        name="demo-shared@local", log=logs / "shared.log"),
        ]
        try:
            for worker in workers:
                worker.wait_ready()
            console.print(f"workers ready: {', '.join(w.name for w in workers)} "
                          f"(logs in {logs})")
            handles, duplicates_ok, refused = _submit_and_follow(client, rng, console)
            jobs = client.wait(handles, timeout=120)
        finally:
            for worker in workers:
                worker.stop()
    elapsed = time.monotonic() - started
    _print_summary(console, jobs, duplicates_ok, refused, elapsed)
    expected_failed = 1
    ok = (duplicates_ok and refused
          and sum(j.state == JobState.FAILED for j in jobs) == expected_failed
          and sum(j.state == JobState.SUCCEEDED for j in jobs) == len(jobs) - expected_failed)
    console.print("[green]demo finished: every job ended as expected[/green]" if ok
                  else "[red]demo finished with unexpected job states[/red]")
    return 0 if ok else 1


def _submit_and_follow(client: Client, rng: random.Random, console: Console
                       ) -> tuple[list[JobHandle], bool, bool]:
    backlog, stream = plan_workload(rng, uuid.uuid4().hex[:8])
    handles: list[JobHandle] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        submitted = progress.add_task("submitted", total=len(backlog) + len(stream))
        finished = progress.add_task("finished ", total=len(backlog) + len(stream))

        def refresh() -> None:
            views = client.services.store.get_many([h.id for h in handles])
            progress.update(finished, completed=sum(v.terminal for v in views.values()))

        for item in backlog:
            handles.append(client.submit(item.kind, item.payload, tier=item.tier,
                                         tenant=item.tenant, idempotency_key=item.key))
            progress.advance(submitted)
        for n, item in enumerate(stream):
            handles.append(client.submit(item.kind, item.payload, tier=item.tier,
                                         tenant=item.tenant, idempotency_key=item.key))
            progress.advance(submitted)
            time.sleep(rng.expovariate(40.0))  # about 40 arrivals a second
            if n % 10 == 0:
                refresh()
        # Idempotency: resubmitting the same keys returns the same jobs, nothing new runs.
        again = [client.submit(item.kind, item.payload, tier=item.tier, tenant=item.tenant,
                               idempotency_key=item.key) for item in backlog[:5]]
        duplicates_ok = [h.id for h in again] == [h.id for h in handles[:5]] and not any(
            h.created for h in again)
        # Bad input is refused at the edge, with a typed error and nothing stored.
        try:
            client.submit("burn", {"ms": "a while"})
            refused = False
        except InvalidPayload:
            refused = True
        while not progress.finished:
            refresh()
            if all(t.completed >= (t.total or 0) for t in progress.tasks):
                break
            time.sleep(0.2)
    return handles, duplicates_ok, refused


def _print_summary(console: Console, jobs: list[JobView], duplicates_ok: bool, refused: bool,
                   elapsed: float) -> None:
    by_tier: dict[str, list[JobView]] = defaultdict(list)
    for job in jobs:
        by_tier[job.tier].append(job)
    table = Table(title="jobs per tier", header_style="bold")
    for column in ("tier", "jobs", "ok", "failed", "dead", "retried", "wait p50 ms",
                   "wait p95 ms", "cpu s"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier in TIER_ORDER:
        group = by_tier.get(tier.value, [])
        states = Counter(j.state for j in group)
        waits = [1000 * (j.queue_seconds or 0.0) for j in group]
        table.add_row(
            tier.value, str(len(group)), str(states[JobState.SUCCEEDED]),
            str(states[JobState.FAILED]), str(states[JobState.DEAD]),
            str(sum(j.attempts > 1 for j in group)),
            f"{_percentile(waits, 50):.1f}", f"{_percentile(waits, 95):.1f}",
            f"{sum(j.cpu_seconds for j in group):.2f}",
        )
    console.print(table)
    tenants = Table(title="jobs per tenant", header_style="bold")
    for column in ("tenant", "jobs", "cpu s"):
        tenants.add_column(column)
    for tenant in TENANTS:
        group = [j for j in jobs if j.tenant == tenant]
        tenants.add_row(tenant, str(len(group)), f"{sum(j.cpu_seconds for j in group):.2f}")
    console.print(tenants)
    console.print(
        f"total CPU seconds {sum(j.cpu_seconds for j in jobs):.2f} over {len(jobs)} jobs in "
        f"{elapsed:.1f}s; idempotent resubmits returned the same jobs: "
        f"{'yes' if duplicates_ok else 'NO'}; invalid payload refused at submit: "
        f"{'yes' if refused else 'NO'}"
    )
