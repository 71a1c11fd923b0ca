"""Cost reports, ``jobs show``'s breakdown, ``prices`` and ``top``, run as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from orchestrator import Client
from orchestrator.costs.report import GROUPS, cost_report, parse_since
from orchestrator.db.models import JobState, Outcome, attempts, jobs, utcnow, windows
from orchestrator.errors import InvalidOption, Overloaded
from orchestrator.settings import Settings
from orchestrator.tiers import Tier

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"key", "jobs", "items", "cpu_hours", "cost", "cost_per_job", "cost_per_1k_items",
            "queue_wait_p95_s", "retries", "preemptions"}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    full_env.update(env, PYTHONPATH=str(ROOT), COLUMNS="220")
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=full_env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _run(client: Client, job_id: str, tier: str, cpu: float, *, retry: bool = False,
         multiplier: str | None = None, items: int = 1) -> None:
    """One job through the real transitions: claim, (a retry), finish with measured CPU."""
    store = client.services.store
    leases = {t: 30.0 for t in Tier}
    if retry:
        claim = store.claim(job_id, "w", leases)
        assert claim is not None
        store.finish(claim, state=JobState.QUEUED, outcome=Outcome.RETRY, cpu_seconds=cpu / 3,
                     wall_seconds=cpu / 3, error="TransientError: once")
    claim = store.claim(job_id, "w", leases)
    assert claim is not None
    if multiplier is not None:
        with client.services.engine.begin() as conn:
            conn.execute(update(attempts).where(
                (attempts.c.job_id == job_id) & (attempts.c.number == claim.attempt)
            ).values(price_multiplier=Decimal(multiplier), window="night"))
    store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED, cpu_seconds=cpu,
                 wall_seconds=cpu * 1.1, items=items)


def _workload(client: Client, n: int = 60) -> None:
    """Jobs of three tenants, kinds and tiers whose costs have 8 significant decimals."""
    rng = random.Random(6)
    for i in range(n):
        tenant = ("acme", "globex", "initech")[i % 3]
        tier = ("interactive", "nearline", "offline")[rng.randrange(3)]
        kind = "burn" if i % 2 else "echo"
        payload = {"ms": 1} if kind == "burn" else {"i": i, "model": "m1" if i % 4 else "m2"}
        handle = client.submit(kind, payload, tier=tier, tenant=tenant)
        with client.services.engine.begin() as conn:
            if i % 5 == 0:
                conn.execute(update(jobs).where(jobs.c.id == handle.id).values(window="night"))
        _run(client, handle.id, tier, rng.uniform(0.001, 40.0), retry=i % 7 == 0,
             multiplier="0.35" if i % 5 == 0 else None)
    # A bulk job counts once, with its chunks' costs.
    bulk = client.submit_bulk("upper", [f"x{i}" for i in range(30)], chunk_size=10,
                              tenant="acme")
    for chunk in client.chunks(bulk.id):
        _run(client, chunk.id, "offline", rng.uniform(0.5, 3.0), items=10)
    assert bulk.job().state == "succeeded"


def _job_costs(client: Client) -> list[tuple[str, str, str, Decimal]]:
    with client.services.engine.connect() as conn:
        return [(r.tenant, r.kind, r.tier, r.cost) for r in conn.execute(
            select(jobs.c.tenant, jobs.c.kind, jobs.c.tier, jobs.c.cost)
            .where(jobs.c.parent_id.is_(None)))]


def test_report_totals_are_exactly_the_sum_of_the_job_costs_for_every_grouping(
    client: Client,
) -> None:
    _workload(client)
    rows = _job_costs(client)
    assert all(cost is not None for *_, cost in rows)  # every finished job was charged
    expected = sum((cost for *_, cost in rows), Decimal(0))
    since = utcnow() - timedelta(hours=1)
    for by in GROUPS:
        report = cost_report(client.services.engine, by=by, since=since)
        assert report.total.cost == expected, by
        assert sum((r.cost for r in report.rows), Decimal(0)) == expected, by
        assert report.total.jobs == len(rows) == 61
    by_tenant = cost_report(client.services.engine, by="tenant", since=since)
    per_tenant: dict[str, Decimal] = defaultdict(Decimal)
    for tenant, _, _, cost in rows:
        per_tenant[tenant] += cost
    assert {r.key: r.cost for r in by_tenant.rows} == per_tenant
    assert by_tenant.total.retries == 9  # jobs 0, 7, ..., 56 retried once
    assert by_tenant.total.items == 60 + 30
    windowed = {r.key: r for r in cost_report(client.services.engine, by="window",
                                              since=since).rows}
    assert windowed["night"].jobs == 12 and windowed["-"].jobs == 49
    models = {r.key for r in cost_report(client.services.engine, by="model", since=since).rows}
    assert models == {"m1", "m2", "-"}
    only = cost_report(client.services.engine, by="kind", since=since, tenant="globex")
    assert only.total.cost == per_tenant["globex"]
    later = cost_report(client.services.engine, by="tenant", since=utcnow() + timedelta(1))
    assert later.rows == [] and later.total.cost == 0


def test_queue_wait_p95_is_the_nearest_rank_percentile(client: Client) -> None:
    ids = []
    for i in range(20):
        handle = client.submit("echo", {"i": i}, tenant="acme")
        _run(client, handle.id, "interactive", 0.01)
        ids.append(handle.id)
    with client.services.engine.begin() as conn:
        for i, job_id in enumerate(ids):
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(queue_seconds=i + 1.0))
    report = cost_report(client.services.engine, since=utcnow() - timedelta(hours=1))
    assert report.rows[0].queue_wait_p95_s == 19.0  # rank ceil(0.95 x 20) = 19
    assert report.total.queue_wait_p95_s == 19.0


def test_since_accepts_spans_and_dates_and_refuses_the_rest() -> None:
    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("2w", now) == now - timedelta(weeks=2)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(InvalidOption, match="--since 'yesterday'"):
        parse_since("yesterday", now)
    for span in ("800000d", "9999999999d"):  # raw OverflowError before
        with pytest.raises(InvalidOption, match="past the calendar"):
            parse_since(span, now)
    with pytest.raises(InvalidOption, match="future"):  # silently an empty report before
        parse_since("2027-01-01", now)


def test_costs_cli_json_csv_chart_and_html(client: Client, tmp_path: Path) -> None:
    _workload(client, n=12)
    env = client.settings.to_env()
    expected = sum((cost for *_, cost in _job_costs(client)), Decimal(0))
    done = _cli("costs", "--by", "kind", "--json", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"by", "since", "until", "tenant", "currency", "groups", "total"}
    assert data["by"] == "kind" and data["currency"] == "USD" and data["tenant"] is None
    assert datetime.fromisoformat(data["since"]) < datetime.fromisoformat(data["until"])
    for row in [*data["groups"], data["total"]]:
        assert set(row) == ROW_KEYS
        assert isinstance(row["jobs"], int) and isinstance(row["items"], int)
        assert isinstance(row["cpu_hours"], float) and isinstance(row["retries"], int)
        assert Decimal(row["cost"]).as_tuple().exponent == -8  # money as exact text
    assert {g["key"] for g in data["groups"]} == {"burn", "echo", "upper"}
    assert Decimal(data["total"]["cost"]) == expected
    assert sum(Decimal(g["cost"]) for g in data["groups"]) == expected
    table = _cli("costs", "--csv", "--since", "1d", env=env)
    assert table.returncode == 0, table.stderr
    lines = list(csv.DictReader(io.StringIO(table.stdout)))
    assert lines[-1]["tenant"] == "total" and Decimal(lines[-1]["cost"]) == expected
    page = tmp_path / "costs.html"
    human = _cli("costs", "--by", "tier", "--chart", "--html", str(page), env=env)
    assert human.returncode == 0, human.stderr
    assert "total" in human.stdout and "spend per day" in human.stdout
    html = page.read_text()
    assert "<svg" in html and f"{expected:f}" in html
    assert "src=" not in html and "<link" not in html  # self-contained
    bad = _cli("costs", "--by", "colour", env=env)
    assert bad.returncode == 1 and "error: --by 'colour'" in bad.stderr
    bad = _cli("costs", "--since", "soon", env=env)
    assert bad.returncode == 1 and "error: --since 'soon'" in bad.stderr


def test_jobs_show_explains_a_jobs_cost_attempt_by_attempt(client: Client) -> None:
    handle = client.submit("burn", {"ms": 1}, tier="offline", tenant="acme")
    _run(client, handle.id, "offline", 36.0, retry=True, multiplier="0.5")
    env = client.settings.to_env()
    shown = _cli("jobs", "show", handle.id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    breakdown = json.loads(shown.stdout)["cost_breakdown"]
    # retry: 12 CPU-s at 0.03/h = 0.0001; then 36 CPU-s at 0.03/h x 0.5 = 0.00015
    assert [(a["outcome"], a["multiplier"], a["cost"]) for a in breakdown["attempts"]] == [
        ("retry", None, "0.00010000"), ("succeeded", "0.5000", "0.00015000")]
    assert breakdown["cost"] == "0.00025000" and breakdown["item_charge"] == "0E-8"
    assert breakdown["cpu_hour_price"] == "0.03"
    human = _cli("jobs", "show", handle.id, env=env)
    assert "cost (USD): 0.00025000" in human.stdout and "night" in human.stdout


def test_prices_shows_the_table_and_refuses_a_bad_one_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text('[prices]\ncurrency = "EUR"\n[prices.cpu_hour]\noffline = "0.01"\n'
                      '[prices.models."all-MiniLM-L6-v2"]\nper_1k_items = "0.004"\n')
    # The command reads the config file only: no database, no broker.
    env = {"ORCH_STATE_DIR": str(tmp_path), "ORCH_CONFIG": str(config)}
    shown = _cli("prices", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "currency": "EUR",
        "cpu_hour": {"interactive": "0.12", "nearline": "0.06", "offline": "0.01"},
        "wall_hour": {"interactive": "0", "nearline": "0", "offline": "0"},
        "models": {"all-MiniLM-L6-v2": {"per_1k_items": "0.004"}},
    }
    assert "all-MiniLM-L6-v2" in _cli("prices", env=env).stdout
    config.write_text('[prices.cpu_hour]\noffline = "-2"\n')
    bad = _cli("prices", env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "error: prices.cpu_hour.offline: '-2' must be between 0 and 1000000")


def test_top_once_shows_every_tier_against_its_objective(
    client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    for i in range(3):
        client.submit("burn", {"ms": 1}, tier="offline", idempotency_key=f"t{i}")
    done = client.submit("echo", {"i": 1})
    _run(client, done.id, "interactive", 0.01)
    with client.services.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == done.id).values(queue_seconds=0.75))
        conn.execute(windows.insert().values(
            name="night", cron="0 1 * * *", duration_s=3600, timezone="UTC",
            price_multiplier=Decimal("0.4"), created_at=utcnow()))
    tight = Client.from_settings(settings.model_copy(update={"tiers": {
        **settings.tiers,
        Tier.OFFLINE: settings.tiers[Tier.OFFLINE].model_copy(update={"hard_backlog": 3}),
    }}))
    try:
        with pytest.raises(Overloaded):
            tight.submit("burn", {"ms": 1}, tier="offline")
    finally:
        tight.close()
    shown = _cli("top", "--once", env=client.settings.to_env())
    assert shown.returncode == 0, shown.stderr
    lines = [line.replace("┃", "│").strip() for line in shown.stdout.splitlines()]
    rows = [[cell.strip() for cell in line.strip("│").split("│")]
            for line in lines if line.count("│") > 2]
    by_tier = {row[0]: row for row in rows}
    assert set(by_tier) == {"tier", "interactive", "nearline", "offline"}
    header = by_tier["tier"]
    offline = dict(zip(header, by_tier["offline"], strict=True))
    assert offline["queued"] == "3" and offline["sheds"] == "1"
    interactive = dict(zip(header, by_tier["interactive"], strict=True))
    assert interactive["wait p95 (5m)"] == "750 ms" and interactive["objective"] == "500 ms"
    assert "next window night" in shown.stdout or "window night: open now" in shown.stdout
