"""Cost per job: the price table, batch shares, window multipliers, resumed jobs, rounding."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from orchestrator import Client
from orchestrator.costs import Accountant, PriceTable, default_models, job_model, round_money
from orchestrator.db.models import JobState, Outcome, attempts, jobs
from orchestrator.errors import ConfigurationError, QuotaExceeded
from orchestrator.kinds import registry
from orchestrator.quotas import TenantStore
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.runtime import Runtime

#: Round numbers: one CPU-second costs 0.0001 interactive, 0.00005 nearline, 0.00001 offline.
PRICES = """
[prices]
currency = "EUR"
[prices.cpu_hour]
interactive = "0.36"
nearline = 0.18
offline = "0.036"
[prices.wall_hour]
offline = "0.0036"
[prices.models.m1]
per_1k_items = "2.5"
"""


@pytest.fixture
def priced(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "orchestrator.toml"
    path.write_text(PRICES + '\n[windows.night]\ncron = "0 1 * * *"\n')  # not ours: ignored
    return settings.model_copy(update={"config_file": path})


@pytest.fixture
def priced_client(priced: Settings) -> Iterator[Client]:
    c = Client.from_settings(priced)
    yield c
    c.close()


@pytest.fixture
def priced_runtime(priced: Settings) -> Iterator[Runtime]:
    rt = Runtime(Services.open(priced), worker="cost-test")
    yield rt
    rt.close()


def _attempt_rows(client: Client, job_id: str) -> list[tuple[int, str, Decimal | None]]:
    with client.services.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(attempts.c.number, attempts.c.outcome, attempts.c.cost)
            .where(attempts.c.job_id == job_id).order_by(attempts.c.number))]


def _set_multiplier(client: Client, job_id: str, number: int, value: str) -> None:
    """What the scheduler does for an attempt that runs inside an off-peak window."""
    with client.services.engine.begin() as conn:
        conn.execute(update(attempts).where(
            (attempts.c.job_id == job_id) & (attempts.c.number == number)
        ).values(price_multiplier=Decimal(value), window="night"))


# --- the price table -------------------------------------------------------------------------


def test_the_price_table_reads_decimals_and_falls_back_to_documented_defaults() -> None:
    import tomllib

    table = PriceTable.from_config(tomllib.loads(PRICES))
    assert table.currency == "EUR"
    assert table.cpu_hour[Tier.NEARLINE] == Decimal("0.18")  # a TOML float, read exactly
    assert table.wall_hour[Tier.OFFLINE] == Decimal("0.0036")
    assert table.wall_hour[Tier.INTERACTIVE] == 0
    assert table.models["m1"].per_1k_items == Decimal("2.5")
    default = PriceTable.from_config({})
    assert default == PriceTable()
    assert {t.value: str(p) for t, p in default.cpu_hour.items()} == {
        "interactive": "0.12", "nearline": "0.06", "offline": "0.03"}


@pytest.mark.parametrize(("config", "message"), [
    ({"prices": {"cpu_hour": {"urgent": "1"}}}, "prices.cpu_hour.urgent: unknown key"),
    ({"prices": {"cpu_hour": {"offline": "-1"}}}, "prices.cpu_hour.offline: '-1' must be"),
    ({"prices": {"cpu_hour": {"offline": "cheap"}}}, "prices.cpu_hour.offline: 'cheap' is not"),
    ({"prices": {"wall_hour": {"offline": True}}}, "prices.wall_hour.offline: True is not"),
    ({"prices": {"cpu_hour": {"offline": "inf"}}}, "prices.cpu_hour.offline"),
    ({"prices": {"models": {"m": {"per_1k_tokens": "1"}}}}, "prices.models.m.per_1k_tokens"),
    ({"prices": {"models": {"m": "1"}}}, "prices.models.m: must be a table"),
    ({"prices": {"cpu": {}}}, "prices.cpu: unknown key"),
    ({"prices": "cheap"}, "prices: must be a table"),
])
def test_a_bad_price_table_is_a_configuration_error_naming_the_key(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        PriceTable.from_config(config)


def test_a_bad_price_table_stops_a_process_at_start(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[prices.cpu_hour]\nofline = "0.1"\n')
    with pytest.raises(ConfigurationError, match=r"prices\.cpu_hour\.ofline: unknown key"):
        Services.open(settings.model_copy(update={"config_file": path}))


def test_money_is_rounded_once_half_to_even_to_the_column_scale() -> None:
    assert round_money(Decimal("0.000000005")) == Decimal("0.00000000")
    assert round_money(Decimal("0.000000015")) == Decimal("0.00000002")
    assert round_money(Decimal("0.0000000250001")) == Decimal("0.00000003")
    table = PriceTable(cpu_hour={t: Decimal("3.6") for t in Tier})  # 0.001 a CPU-second
    assert table.compute_charge("offline", 0.000005, None, None) == Decimal("0")
    assert table.compute_charge("offline", 0.000015, None, None) == Decimal("0.00000002")
    assert table.compute_charge("offline", 1.0, None, Decimal("0.5")) == Decimal("0.0005")
    assert table.compute_charge("offline", None, None, None) == 0  # a lost attempt
    # Seconds are read through their shortest spelling: 0.1 s is 0.1, not 0.1000000000000000055.
    assert table.compute_charge("offline", 0.1, None, None) == Decimal("0.0001")


def test_a_jobs_model_is_its_payloads_or_its_kinds_default() -> None:
    defaults = default_models(registry.load(Settings.from_env({}).all_imports()).specs())
    assert defaults["embed"] == "all-MiniLM-L6-v2" and "burn" not in defaults
    assert job_model("embed", {"texts": ["a"]}, defaults) == "all-MiniLM-L6-v2"
    assert job_model("embed", {"texts": ["a"], "model": "mine"}, defaults) == "mine"
    assert job_model("burn", {"ms": 1}, defaults) is None


# --- charging finished jobs ------------------------------------------------------------------


def test_a_finished_job_is_charged_its_cpu_and_wall_time_at_its_tiers_price(
    priced_client: Client,
) -> None:
    store = priced_client.services.store
    handle = priced_client.submit("burn", {"ms": 1}, tier="offline")
    claim = store.claim(handle.id, "w", {Tier.OFFLINE: 30})
    assert claim is not None
    assert store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED,
                        cpu_seconds=36.0, wall_seconds=360.0, items=1)
    # 36 CPU-s x 0.036/h = 0.00036; 360 wall-s x 0.0036/h = 0.00036
    assert handle.job().cost == Decimal("0.00072")
    assert _attempt_rows(priced_client, handle.id) == [(1, "succeeded", Decimal("0.00072"))]


def test_an_off_peak_attempt_is_charged_at_its_windows_multiplier(priced_client: Client) -> None:
    store = priced_client.services.store
    handle = priced_client.submit("burn", {"ms": 1}, tier="nearline")
    claim = store.claim(handle.id, "w", {Tier.NEARLINE: 30})
    assert claim is not None
    _set_multiplier(priced_client, handle.id, 1, "0.4")
    store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED,
                 cpu_seconds=10.0, wall_seconds=12.0, items=1)
    assert handle.job().cost == Decimal("0.0002")  # 10 s x 0.00005 x 0.4


def test_a_preempted_and_resumed_chunk_pays_each_slice_at_its_own_multiplier_and_no_more(
    priced_client: Client,
) -> None:
    store = priced_client.services.store
    bulk = priced_client.submit_bulk("upper", [f"t{i}" for i in range(30)], chunk_size=100,
                                     tenant="acme")
    [chunk] = priced_client.chunks(bulk.id)
    first = store.claim(chunk.id, "w", {Tier.OFFLINE: 30})
    assert first is not None
    _set_multiplier(priced_client, chunk.id, 1, "0.5")
    store.finish(first, state=JobState.QUEUED, outcome=Outcome.PREEMPTED, cpu_seconds=100.0,
                 wall_seconds=0.0, checkpoint=10)
    assert priced_client.get(chunk.id).cost is None  # not finished: not charged yet
    second = store.claim(chunk.id, "w", {Tier.OFFLINE: 30})
    assert second is not None and second.items_done == 10
    store.finish(second, state=JobState.QUEUED, outcome=Outcome.RETRY, cpu_seconds=20.0,
                 wall_seconds=0.0, error="TransientError: flaky")
    third = store.claim(chunk.id, "w", {Tier.OFFLINE: 30})
    assert third is not None
    store.finish(third, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED, cpu_seconds=50.0,
                 wall_seconds=0.0, items=30, result_ref="x")
    # 100 s x 0.00001 x 0.5 + 20 s x 0.00001 + 50 s x 0.00001
    assert _attempt_rows(priced_client, chunk.id) == [
        (1, "preempted", Decimal("0.0005")), (2, "retry", Decimal("0.0002")),
        (3, "succeeded", Decimal("0.0005"))]
    assert priced_client.get(chunk.id).cost == Decimal("0.0012")
    assert bulk.job().cost == Decimal("0.0012")  # the parent is the sum of its chunks


def test_items_are_charged_once_at_the_models_price(priced_client: Client) -> None:
    store = priced_client.services.store
    handle = priced_client.submit("echo", {"model": "m1"})
    claim = store.claim(handle.id, "w", {Tier.INTERACTIVE: 30})
    assert claim is not None
    store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED, cpu_seconds=1.0,
                 wall_seconds=1.0, items=3)
    assert handle.job().cost == Decimal("0.0001") + Decimal("0.0075")
    with priced_client.services.engine.connect() as conn:
        assert conn.execute(select(jobs.c.model).where(jobs.c.id == handle.id)).scalar() == "m1"


def test_a_batch_splits_its_cost_by_each_jobs_share_of_the_cpu(
    priced_client: Client, priced_runtime: Runtime
) -> None:
    # The test kind spends microseconds: price a CPU-second at 1,000 to see the shares.
    table = PriceTable(cpu_hour={t: Decimal(3_600_000) for t in Tier})
    priced_runtime.services.store.accountant = Accountant(table)
    short = priced_client.submit("upper", {"texts": ["ab"]})
    long = priced_client.submit("upper", {"texts": ["abcdefgh"]})
    priced_runtime.execute_batch("upper", "g", "nearline", "m1")
    for job in (short.job(), long.job()):
        assert job.cost == table.compute_charge("nearline", job.cpu_seconds, job.wall_seconds,
                                                None)
    s, ln = short.job(), long.job()
    assert s.cost is not None and ln.cost is not None and ln.cost > s.cost
    assert abs(ln.cost - 4 * s.cost) <= Decimal("0.00000004")  # 4x the tokens, 4x the cost


def test_real_preemption_charges_every_slice_once(
    priced: Settings, priced_client: Client
) -> None:
    tiers = dict(priced.tiers)
    tiers[Tier.OFFLINE] = tiers[Tier.OFFLINE].model_copy(update={"preempt_min_slice_s": 0.0})
    rt = Runtime(Services.open(priced.model_copy(update={"tiers": tiers})), worker="p")
    try:
        bulk = priced_client.submit_bulk("upper", [f"i{n}" for n in range(25)], chunk_size=100)
        [chunk] = priced_client.chunks(bulk.id)
        priced_client.submit("burn", {"ms": 1}, tier="nearline")
        assert [rt.execute(chunk.id) for _ in range(3)] == ["queued", "queued", "succeeded"]
    finally:
        rt.close()
    rows = _attempt_rows(priced_client, chunk.id)
    assert [r[1] for r in rows] == ["preempted", "preempted", "succeeded"]
    assert priced_client.get(chunk.id).cost == sum(r[2] or 0 for r in rows)
    assert bulk.job().cost == priced_client.get(chunk.id).cost


def test_a_cancelled_job_is_charged_for_the_attempts_that_ran(priced_client: Client) -> None:
    store = priced_client.services.store
    handle = priced_client.submit("burn", {"ms": 5}, tier="interactive")
    claim = store.claim(handle.id, "w", {Tier.INTERACTIVE: 30})
    assert claim is not None
    store.finish(claim, state=JobState.QUEUED, outcome=Outcome.RETRY, cpu_seconds=3.0,
                 wall_seconds=3.0, error="TransientError: later")
    assert handle.job().cost is None  # a retry waits: not finished
    assert handle.cancel()
    assert handle.job().cost == Decimal("0.0003")
    # Cancelled while running: charged when the running attempt's worker reports its end.
    running = priced_client.submit("burn", {"ms": 5}, tier="interactive")
    claim = store.claim(running.id, "w", {Tier.INTERACTIVE: 30})
    assert claim is not None and running.cancel()
    assert running.job().cost is None
    assert not store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED,
                            cpu_seconds=2.0, wall_seconds=2.0, items=1)
    assert running.job().cost == Decimal("0.0002")
    assert _attempt_rows(priced_client, running.id) == [(1, "cancelled", Decimal("0.0002"))]
    never = priced_client.submit("burn", {"ms": 5})
    assert never.cancel() and never.job().cost == 0


def test_monthly_budgets_trip_on_real_spend(
    priced_client: Client, priced_runtime: Runtime, redis_client: redis.Redis
) -> None:
    TenantStore(priced_client.services.engine, priced_client.services.redis).set(
        "acme", monthly_budget=Decimal("0.000001"))
    handle = priced_client.submit("burn", {"ms": 40}, tenant="acme", tier="interactive")
    assert priced_runtime.execute(handle.id) == "succeeded"
    cost = handle.job().cost
    assert cost is not None and cost >= Decimal("0.000003")  # 40 ms at 0.0001 a CPU-second
    assert TenantStore(priced_client.services.engine).spend("acme") == cost
    for key in redis_client.scan_iter("orch:spend:acme:*"):
        redis_client.delete(key)  # the spend cache's 10 s are up
    with pytest.raises(QuotaExceeded, match="monthly_budget"):
        priced_client.submit("burn", {"ms": 1}, tenant="acme")


def test_postgres_one_statement_finish_rounds_half_to_even_like_python(postgres_url: str) -> None:
    """The PostgreSQL finish prices in SQL; its rounding must be ``round_money``'s exactly."""
    from sqlalchemy import text as sql_text

    from orchestrator.db.engine import make_engine
    from orchestrator.db.transitions import _half_even

    values = ["0.000000005", "0.000000015", "0.000000025", "0.0000000250000001",
              "0.00000001499999", "1.234567885", "1.234567895", "0", "0.00072"]
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            for value in values:
                got = conn.execute(sql_text(
                    f"SELECT {_half_even('CAST(:x AS numeric)')}"), {"x": value}).scalar_one()
                assert Decimal(got) == round_money(Decimal(value)), value
    finally:
        engine.dispose()
