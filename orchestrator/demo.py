"""``orchestrator demo``: the whole system on the embedded default, in well under a minute.

It brings up the private Redis and the SQLite file (or uses ORCH_* URLs if set), migrates,
starts a reserved interactive worker and a shared strict-order worker, streams a mixed workload
across three tiers and three tenants (an offline backlog first, then steady interactive and
nearline arrivals), waits with a progress display, then defers an ``index`` job to a one-off
off-peak window a few seconds away that an in-process scheduler opens (and an interactive
``search`` queries the index it built), prints what happened and what it cost, and shuts down.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.client import Client, JobHandle
from orchestrator.db.models import JobState
from orchestrator.db.store import JobView, utcnow
from orchestrator.errors import InvalidPayload, Overloaded
from orchestrator.local import LocalWorker
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

TENANTS = ("acme", "globex", "initech")
#: the words of the demo's texts (and of the tiny model's vocabulary, when it builds one)
DEMO_WORDS = ("orchestrator", "queue", "tier", "batch", "embedding", "window", "tenant", "cost")


@dataclass(frozen=True)
class Planned:
    kind: str
    payload: dict[str, object]
    tier: str
    tenant: str
    key: str | None = None


def prepare_models(settings: Settings, console: Console) -> str | None:
    """The embedding model the demo uses: the exported MiniLM if there, else a tiny one.

    Also makes sure the synthetic scoring pair exists. Returns None (and the demo skips model
    work) when neither can be had: building needs ``onnx`` (``pip install '.[dev]'``).
    """
    real = settings.model_dir / "all-MiniLM-L6-v2" / f"model-{settings.embed_variant}.onnx"
    try:
        from workers.models.builders import build_scoring_models, build_tiny_embedding_model
    except ImportError:
        console.print("onnx is not installed: skipping model work (pip install '.[dev]')")
        return None
    scoring = settings.model_dir / "scoring-synthetic"
    if not (scoring / "model-large.onnx").exists():
        build_scoring_models(scoring)
    if real.exists():
        return "all-MiniLM-L6-v2"
    tiny = settings.model_dir / "demo-tiny"
    tokenizer = tiny / "tokenizer.json"
    # Its vocabulary holds the demo's words (one built before did not: every demo text was
    # unknown words, one vector for all, and the search found nothing to tell apart).
    if not (tiny / f"model-{settings.embed_variant}.onnx").exists() or \
            not tokenizer.exists() or f'"{DEMO_WORDS[0]}"' not in tokenizer.read_text():
        from workers.models.builders import DEFAULT_VOCAB

        tiny.mkdir(parents=True, exist_ok=True)
        model_path, tokenizer_path = build_tiny_embedding_model(
            tiny / "build", vocab=[*DEFAULT_VOCAB, *DEMO_WORDS, "request"])
        model_path.replace(tiny / f"model-{settings.embed_variant}.onnx")
        tokenizer_path.replace(tiny / "tokenizer.json")
    console.print("using a tiny demo embedding model (`orchestrator models export` makes "
                  "all-MiniLM-L6-v2)")
    return "demo-tiny"


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


def plan_model_work(model: str, run: str) -> list[Planned]:
    """Single-text embeddings (interactive and nearline) and small scoring jobs, interleaved."""
    words = DEMO_WORDS
    out = []
    for i in range(60):
        text = f"{words[i % 8]} {words[(i * 3) % 8]} request {i}"
        tier = "interactive" if i % 3 else "nearline"
        out.append(Planned("embed", {"texts": [text], "model": model}, tier, TENANTS[i % 3],
                           key=f"{run}-embed-{i}"))
        if i % 6 == 0:
            rows = [[((i + j) % 7) / 7.0 - 0.5 for j in range(16)] for _ in range(4)]
            out.append(Planned("score", {"rows": rows}, "nearline", TENANTS[i % 3]))
    return out


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
        # Before the workers start: each announces the models its model dir holds, and a submit
        # naming one that no live worker holds is refused.
        model = prepare_models(settings, console)
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
            handles, duplicates_ok, refused = _submit_and_follow(client, rng, console, model)
            jobs = client.wait(handles, timeout=120)
            window_jobs = _window_step(client, settings, console, jobs, model)
        finally:
            for worker in workers:
                worker.stop()
    elapsed = time.monotonic() - started
    jobs = jobs + window_jobs
    _print_summary(console, jobs, duplicates_ok, refused, elapsed)
    expected_failed = 1
    ok = (duplicates_ok and refused and bool(window_jobs)
          and all(j.state == JobState.SUCCEEDED for j in window_jobs)
          and sum(j.state == JobState.FAILED for j in jobs) == expected_failed
          and sum(j.state == JobState.SUCCEEDED for j in jobs) == len(jobs) - expected_failed)
    console.print("[green]demo finished: every job ended as expected[/green]" if ok
                  else "[red]demo finished with unexpected job states[/red]")
    return 0 if ok else 1


def _window_step(client: Client, settings: Settings, console: Console, jobs: list[JobView],
                 model: str | None) -> list[JobView]:
    """Off-peak windows: a job waits ``deferred`` for a window that opens a few seconds from
    now, the scheduler releases it when it opens, and it is charged at the window's price.

    With a model, the deferred job indexes the demo's embeddings (``index``) and an interactive
    ``search`` then queries that index; without one, it is an offline ``burn``.
    """
    from orchestrator.retrieval import submit_index, submit_search
    from orchestrator.scheduler.process import SchedulerProcess
    from orchestrator.window_catalog import WindowCatalog
    from orchestrator.windows import WindowSpec

    run = uuid.uuid4().hex[:8]
    name = f"demo-{run}"
    opens = utcnow() + timedelta(seconds=3)
    WindowCatalog(client.services.engine, settings).add(WindowSpec.build(
        name, starts_at=opens, ends_at=opens + timedelta(minutes=2), tiers=["offline"],
        price_multiplier="0.5"))
    scheduler = SchedulerProcess(settings, holder=f"demo:{run}")
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True,
                              name="demo-scheduler")
    thread.start()
    try:
        embedded = [j.id for j in jobs if j.kind == "embed" and j.state == JobState.SUCCEEDED]
        if model is not None and embedded:
            deferred = submit_index(client, run, embedded, window=name, tenant="initech")
        else:
            deferred = client.submit("burn", {"ms": 200}, tier="offline", tenant="initech",
                                     window=name)
        waiting = client.get(deferred.id)
        chunks = client.chunks(deferred.id) or [waiting]
        console.print(f"window {name} opens at {opens:%H:%M:%S} UTC (price x0.5): "
                      f"{waiting.kind} job {deferred.id} waits, "
                      f"{', '.join(sorted({c.state for c in chunks}))}")
        [done] = client.wait([deferred], timeout=60)
        started = [c.started_at for c in client.chunks(deferred.id) or [done] if c.started_at]
        delay = (min(started) - opens).total_seconds() if started else float("nan")
        console.print(f"  released by the scheduler {delay:.2f}s after the window opened; "
                      f"{done.state}, cost {done.cost or 0:f}")
        if model is not None and embedded and done.state == JobState.SUCCEEDED:
            search = submit_search(client, run, queries=["tenant cost request"], k=3,
                                   tenant="acme")
            hits = search.result(timeout=30)["hits"][0]
            console.print(f"  interactive search on index {run}: top {len(hits)} of "
                          f"{len(embedded)} vectors, best score {hits[0]['score']:.3f}")
            return [done, client.get(search.id)]
        return [done]
    finally:
        stop.set()
        thread.join(timeout=30)


def _submit(client: Client, item: Planned, attempts: int = 50) -> JobHandle:
    """Submit as a well-behaved caller does: when shed, wait ``retry_after`` and try again."""
    for _ in range(attempts - 1):
        try:
            return client.submit(item.kind, item.payload, tier=item.tier, tenant=item.tenant,
                                 idempotency_key=item.key)
        except Overloaded as e:
            time.sleep(e.retry_after)
    return client.submit(item.kind, item.payload, tier=item.tier, tenant=item.tenant,
                         idempotency_key=item.key)


def _submit_and_follow(client: Client, rng: random.Random, console: Console,
                       model: str | None) -> tuple[list[JobHandle], bool, bool]:
    run = uuid.uuid4().hex[:8]
    backlog, stream = plan_workload(rng, run)
    if model is not None:
        extra = plan_model_work(model, run)
        mixed = [item for pair in zip(stream, extra, strict=False) for item in pair]
        stream = mixed + stream[len(extra):] + extra[len(stream):]
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
            handles.append(_submit(client, item))
            progress.advance(submitted)
        if model is not None:
            # A bulk scoring job: 6,000 rows streamed into chunks that run offline.
            rows = ([((i * 7 + j) % 11) / 11.0 - 0.5 for j in range(16)] for i in range(6000))
            handles.append(client.submit_bulk("score", rows, chunk_size=1000, tenant="initech",
                                              idempotency_key=f"{run}-bulk-score"))
            for task in (submitted, finished):
                progress.update(task, total=(progress.tasks[task].total or 0) + 1)
            progress.advance(submitted)
        for n, item in enumerate(stream):
            handles.append(_submit(client, item))
            progress.advance(submitted)
            time.sleep(rng.expovariate(40.0))  # about 40 arrivals a second
            if n % 10 == 0:
                refresh()
        # Idempotency: resubmitting the same keys returns the same jobs, nothing new runs.
        again = [_submit(client, item) for item in backlog[:5]]
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


def _cost(jobs: list[JobView]) -> Decimal:
    return sum((j.cost or Decimal(0) for j in jobs), Decimal(0))


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
    for column in ("tenant", "jobs", "cpu s", "cost"):
        tenants.add_column(column)
    for tenant in TENANTS:
        group = [j for j in jobs if j.tenant == tenant]
        tenants.add_row(tenant, str(len(group)), f"{sum(j.cpu_seconds for j in group):.2f}",
                        f"{_cost(group):f}")
    console.print(tenants)
    batched = [j for j in jobs if j.kind in ("embed", "score") and j.batch_size]
    if batched:
        kinds = Table(title="micro-batching (model kinds)", header_style="bold")
        for column in ("kind", "jobs", "model calls", "mean batch", "largest"):
            kinds.add_column(column)
        for name in sorted({j.kind for j in batched}):
            group = [j for j in batched if j.kind == name]
            calls = {j.batch_id for j in group}
            kinds.add_row(name, str(len(group)), str(len(calls)),
                          f"{len(group) / len(calls):.1f}",
                          str(max(j.batch_size or 0 for j in group)))
        console.print(kinds)
    for job in jobs:
        if job.items_total is not None and job.parent_id is None:
            console.print(f"bulk {job.kind} job {job.id}: {job.items_done}/{job.items_total} "
                          f"items, {job.cpu_seconds:.2f} CPU s, results in {job.result_ref}")
    console.print(f"cost of this run: {_cost(jobs):f} (every job charged when it ended; "
                  "`orchestrator costs --by tenant` or `--by kind` for the full report, "
                  "`orchestrator jobs show ID` for one job's)")
    console.print(
        f"total CPU seconds {sum(j.cpu_seconds for j in jobs):.2f} over {len(jobs)} jobs in "
        f"{elapsed:.1f}s; idempotent resubmits returned the same jobs: "
        f"{'yes' if duplicates_ok else 'NO'}; invalid payload refused at submit: "
        f"{'yes' if refused else 'NO'}"
    )
