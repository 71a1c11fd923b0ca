"""Per-tenant quotas: in flight per tier, rate, monthly budget; and the tenants CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update

from orchestrator import Client
from orchestrator.db.models import jobs
from orchestrator.errors import InvalidOption, InvalidPayload, QuotaExceeded
from orchestrator.quotas import RateRule, TenantStore, month_start, next_month_start
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _waiting(r: redis.Redis) -> int:
    """Every queued message and buffered job: all Redis lists."""
    return sum(int(r.llen(k)) for k in r.keys("*") if r.type(k) == b"list")


def _rows(client: Client) -> int:
    with client.services.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def _refused(client: Client, r: redis.Redis, submit: Callable[[], object]) -> QuotaExceeded:
    rows, waiting = _rows(client), _waiting(r)
    with pytest.raises(QuotaExceeded) as info:
        submit()
    assert (_rows(client), _waiting(r)) == (rows, waiting), "a refused submit left something"
    return info.value


def _tenants(client: Client) -> TenantStore:
    return TenantStore(client.services.engine, client.services.redis)


def test_max_inflight_counts_queued_and_running_submissions_per_tier(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", max_inflight={"interactive": 2})
    first = client.submit("echo", {"n": 1}, tenant="acme")
    client.submit("upper", {"texts": ["x"]}, tier="interactive", tenant="acme")  # buffered
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 3}, tenant="acme"))
    assert (refusal.quota, refusal.tier, refusal.limit, refusal.current) == (
        "max_inflight", "interactive", 2, 2)
    assert refusal.retry_after is None  # it frees up when the tenant's own jobs end
    assert "over its max_inflight quota in the interactive tier" in str(refusal)
    client.submit("echo", {"n": 3}, tenant="acme", tier="nearline")  # other tiers are free
    client.submit("echo", {"n": 3}, tenant="globex")  # other tenants are free
    client.cancel(first.id)  # an ended job no longer counts
    client.submit("echo", {"n": 4}, tenant="acme")


def test_a_bulk_job_counts_once_against_max_inflight_whatever_its_chunks(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", max_inflight={"offline": 1})
    bulk = client.submit_bulk("upper", [str(i) for i in range(10)], chunk_size=2, tenant="acme")
    assert len(client.chunks(bulk.id)) == 5
    assert _tenants(client).inflight("acme", "offline") == 1
    refusal = _refused(client, redis_client, lambda: client.submit_bulk(
        "upper", ["a", "b"], chunk_size=2, tenant="acme"))
    assert refusal.quota == "max_inflight"


def test_rate_limit_refuses_past_the_burst_and_says_when_to_retry(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", rate_per_s=1.0, burst=3)  # 3 at once, then one a second
    for i in range(3):
        client.submit("echo", {"n": i}, tenant="acme")
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 3}, tenant="acme"))
    assert (refusal.quota, refusal.limit) == ("rate", 1.0)
    assert refusal.retry_after is not None and 0 < refusal.retry_after <= 1
    assert "1/s, burst 3" in str(refusal)
    client.submit("echo", {"n": 3}, tenant="globex")  # per tenant


def test_a_refused_submit_does_not_use_up_the_rate(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", rate_per_s=1.0, burst=2, max_inflight={"offline": 0})
    for _ in range(3):
        with pytest.raises(QuotaExceeded, match="max_inflight"):
            client.submit("echo", {}, tenant="acme", tier="offline")
    client.submit("echo", {}, tenant="acme")
    client.submit("echo", {}, tenant="acme")


def test_a_bulk_submit_refused_for_a_bad_item_does_not_use_up_the_rate(
    client: Client
) -> None:
    _tenants(client).set("acme", rate_per_s=0.1)  # one submission per 10 s
    with pytest.raises(InvalidPayload):
        client.submit_bulk("upper", ["fine", 5], tenant="acme")  # the rate was spent first
    bulk = client.submit_bulk("upper", ["fine"], tenant="acme")
    assert bulk.created
    with pytest.raises(QuotaExceeded, match="rate"):  # that one did spend it
        client.submit("echo", {}, tenant="acme")


def test_a_fractional_rate_is_kept_exactly(client: Client, redis_client: redis.Redis) -> None:
    # 0.3/s is one submission every 3.33 s (a window of whole seconds made it one per 4 s).
    _tenants(client).set("acme", rate_per_s=0.3)
    client.submit("echo", {"n": 0}, tenant="acme")
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 1}, tenant="acme"))
    assert refusal.retry_after is not None and 3.0 < refusal.retry_after <= 3.334


def test_after_the_burst_submissions_are_admitted_at_the_rate_and_no_faster(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", rate_per_s=2.0, burst=2)
    client.submit("echo", {"n": 0}, tenant="acme")
    client.submit("echo", {"n": 1}, tenant="acme")
    for n in (2, 3):  # each waits out the refusal's retry_after, then the next is refused
        refusal = _refused(client, redis_client,
                           lambda n=n: client.submit("echo", {"n": n}, tenant="acme"))
        assert refusal.retry_after is not None and 0 < refusal.retry_after <= 0.5
        time.sleep(refusal.retry_after)
        client.submit("echo", {"n": n}, tenant="acme")


def test_a_rate_raised_since_the_last_submit_does_not_keep_the_old_wait(
    client: Client, redis_client: redis.Redis
) -> None:
    _tenants(client).set("acme", rate_per_s=1 / 86_400)  # one a day
    client.submit("echo", {"n": 0}, tenant="acme")
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 1}, tenant="acme"))
    assert refusal.retry_after is not None and refusal.retry_after > 86_000
    _tenants(client).set("acme", rate_per_s=2, burst=1)
    client.submit("echo", {"n": 1}, tenant="acme")  # as if the new burst had just been used:
    refusal = _refused(client, redis_client,  # the next one an interval of the new rule later
                       lambda: client.submit("echo", {"n": 2}, tenant="acme"))
    assert refusal.retry_after is not None and refusal.retry_after <= 0.5
    time.sleep(refusal.retry_after)
    client.submit("echo", {"n": 2}, tenant="acme")


@pytest.mark.parametrize(("rate", "burst", "interval_us", "tolerance_us"), [
    (1.0, 3, 1_000_000, 2_000_000), (0.3, None, 3_333_333, 0), (2.5, None, 400_000, 800_000),
    (100.0, 1, 10_000, 0), (1e6, None, 1, 999_999),
    (1 / 86_400, 2**31 - 1, 86_400_000_000, 366 * 86_400_000_000),  # capped at a year
])
def test_a_rate_and_burst_become_the_gcra_interval_and_tolerance(
    rate: float, burst: int | None, interval_us: int, tolerance_us: int
) -> None:
    rule = RateRule.of(rate, burst)
    assert (rule.interval_us, rule.tolerance_us) == (interval_us, tolerance_us)


def test_monthly_budget_refuses_once_this_months_cost_reaches_it(
    client: Client, redis_client: redis.Redis
) -> None:
    a = client.submit("echo", {"n": 1}, tenant="acme")
    b = client.submit("echo", {"n": 2}, tenant="acme")
    client.submit("echo", {"n": 3}, tenant="acme")  # no cost yet: adds nothing
    with client.services.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == a.id).values(cost=Decimal("0.6")))
        conn.execute(update(jobs).where(jobs.c.id == b.id).values(cost=Decimal("0.4")))
    _tenants(client).set("acme", monthly_budget=Decimal("1.00"))
    assert _tenants(client).spend("acme") == Decimal("1.0")
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 4}, tenant="acme"))
    assert (refusal.quota, refusal.limit, refusal.current) == (
        "monthly_budget", Decimal("1.00"), Decimal("1.0"))
    now = datetime.now(UTC)
    assert refusal.retry_after is not None
    assert 0 < refusal.retry_after <= (next_month_start(now) - now).total_seconds() + 1


def test_a_budget_never_trips_while_costs_are_not_filled_in(client: Client) -> None:
    _tenants(client).set("acme", monthly_budget=Decimal("0.01"))
    handles = [client.submit("echo", {"n": i}, tenant="acme") for i in range(5)]
    assert all(h.created for h in handles)
    assert _tenants(client).spend("acme") == 0


def test_month_boundaries_are_utc_calendar_months() -> None:
    now = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert month_start(now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_month_start(now) == datetime(2027, 1, 1, tzinfo=UTC)


def test_quota_values_are_validated(client: Client) -> None:
    store = _tenants(client)
    with pytest.raises(InvalidOption, match="unknown tier"):
        store.set("acme", max_inflight={"urgent": 1})
    with pytest.raises(InvalidOption, match="burst needs a rate"):
        store.set("acme", burst=3)
    for rate in (0, -1, 1e-6, 2e6, float("nan"), float("inf")):
        with pytest.raises(InvalidOption, match="rate must be"):
            store.set("acme", rate_per_s=rate)
    with pytest.raises(InvalidOption, match="budget"):
        store.set("acme", monthly_budget=Decimal("-1"))
    # Past what the columns hold: a raw DataError on PostgreSQL, stored as given on SQLite.
    with pytest.raises(InvalidOption, match="budget"):
        store.set("acme", monthly_budget=Decimal("1e12"))
    with pytest.raises(InvalidOption, match="burst"):
        store.set("acme", rate_per_s=1, burst=3_000_000_000)
    with pytest.raises(InvalidOption, match="weight"):
        store.set("acme", weight=3_000_000_000)
    assert store.get("acme") is None  # nothing half-set


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    full_env.update(env, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=full_env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_tenants_cli_sets_and_lists_quotas_that_submit_then_enforces(client: Client) -> None:
    env = client.settings.to_env()
    done = _cli("tenants", "set", "acme", "--weight", "3", "--max-inflight", "interactive=2",
                "--max-inflight", "offline=10", "--rate", "50", "--burst", "100",
                "--budget", "12.5", env=env)
    assert done.returncode == 0, done.stderr
    assert "tenant acme: weight 3" in done.stdout
    client.submit("echo", {"n": 1}, tenant="acme")
    client.submit("echo", {"n": 2}, tenant="acme")
    with pytest.raises(QuotaExceeded, match="max_inflight"):
        client.submit("echo", {"n": 3}, tenant="acme")
    assert client.services.store.tenant_weight("acme") == 3  # fair sharing reads it too
    listed = _cli("tenants", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    [acme] = json.loads(listed.stdout)
    assert acme == {
        "name": "acme", "weight": 3, "max_inflight": {"interactive": 2, "offline": 10},
        "rate_per_s": 50.0, "burst": 100, "monthly_budget": "12.50000000",
        "inflight": {"interactive": 2, "nearline": 0, "offline": 0}, "spent_this_month": "0",
    }
    cleared = _cli("tenants", "set", "acme", "--rate", "none", "--max-inflight",
                   "interactive=none", "--budget", "none", env=env)
    assert cleared.returncode == 0, cleared.stderr
    client.submit("echo", {"n": 3}, tenant="acme")
    human = _cli("tenants", "list", env=env)
    assert "acme" in human.stdout and "3/-" in human.stdout and "0/10" in human.stdout
    bad = _cli("tenants", "set", "acme", "--max-inflight", "urgent=3", env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "error: unknown tier 'urgent'; choose from interactive, nearline, offline")


def test_a_quota_change_reaches_a_running_client_at_its_next_submit(
    client: Client, settings: Settings
) -> None:
    with Client.from_settings(settings) as other:  # e.g. `orchestrator tenants set` elsewhere
        client.submit("echo", {"n": 1}, tenant="acme")  # reads (and caches) no quota
        TenantStore(other.services.engine, other.services.redis).set(
            "acme", max_inflight={"interactive": 1})
        with pytest.raises(QuotaExceeded):
            client.submit("echo", {"n": 2}, tenant="acme")


def test_cli_errors_print_their_brackets(client: Client) -> None:
    shown = _cli("windows", "show", "weekend", env=client.settings.to_env())
    assert shown.returncode != 0
    # rich read "[windows]" as markup and dropped it from the message.
    assert "config file's [windows] section" in " ".join(shown.stderr.split())
