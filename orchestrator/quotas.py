"""Per-tenant quotas, checked at submit before anything is stored.

Three quotas, each off while its column on ``tenants`` is NULL:

- **in flight** (``max_inflight``, per tier): submissions of the tenant that are deferred,
  queued or running. Counted in the database, the source of truth, with one query on the index
  ``(tenant, tier, state, parent_id)`` that stops counting at the limit, so its cost is bounded
  by the limit and not by the tenant's history. A Redis counter would save that query but would
  have to be decremented on every path by which a job ends (workers, cancel, deadline, the
  reconciler, a lost worker), and one crash between the database commit and the decrement
  leaves it wrong for good. A bulk job counts once (its parent), not once per chunk. Concurrent
  submits of one tenant can each see room for one more job, so the limit can be overshot by the
  number of submits racing in the same instant.
- **rate** (``rate_per_s`` with ``burst``): the generic cell rate algorithm (GCRA, the token
  bucket as one timestamp; as in ATM networks, redis-cell and Stripe's limiter), one Lua script
  in Redis on Redis's clock. Rate R with burst B: from idle, B submissions are accepted at once,
  then one every 1/R seconds, exactly (0.3/s is 3 per 10 s, not a whole-second window's 1 per
  4 s). B defaults to ``ceil(R)``. A refusal says when the next submit would be accepted. A
  submit refused by any check does not use up the rate.
- **monthly budget** (``monthly_budget``): the sum of ``jobs.cost`` of the tenant's submissions
  created this calendar month (UTC) refuses new work once it reaches the budget. The sum is
  cached in Redis for ``SPEND_CACHE_S`` so a busy tenant does not re-sum its month on every
  submit. Costs are written when jobs end (``orchestrator.costs``); a job still queued or
  running has no cost yet and adds nothing until it ends, so a tenant can overshoot its budget
  by the work in flight when it is reached. A bulk job's cost is read from its parent row, into
  which each chunk's cost is added as the chunk ends (as their CPU seconds are).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import redis
from sqlalchemy import Engine, and_, bindparam, func, select, update

from orchestrator.costs.report import exact_sum, money_from_sum
from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, jobs, tenants
from orchestrator.db.store import _insert_ignore, utcnow
from orchestrator.errors import InvalidOption, QuotaExceeded, ServiceUnavailable
from orchestrator.tiers import TIER_ORDER, Tier

log = logging.getLogger(__name__)

#: Seconds a tenant's month-to-date spend is reused before it is summed again.
SPEND_CACHE_S = 10
#: A tenant's GCRA state: its theoretical arrival time, in microseconds of Redis's clock.
RATE_KEY_PREFIX = "orch:gcra"

# KEYS[1]: the tenant's key. ARGV: emission interval (1/R) and burst tolerance ((B - 1) / R),
# both in microseconds; 1 to spend a submission, 0 only to look. Returns {1, 0} when the submit
# is admitted, else {0, microseconds until it would be}.
_GCRA = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
-- Under one rule the stored time is at most one interval past a full burst; further ahead, it
-- was set under an older, slower rule (1/day raised to 100/s), whose wait is not kept: the new
-- rule starts as if its burst had just been used up.
if tat > now + tolerance + interval then tat = now + tolerance end
local allowed_at = tat - tolerance
if now < allowed_at then return {0, allowed_at - now} end
if ARGV[3] == '1' then
  local next_tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%d', next_tat),
             'PX', math.max(math.ceil((next_tat - now) / 1000), 1))
end
return {1, 0}
"""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: For ``TenantStore.set``: leave this quota as it is (None clears it).
KEEP: Final = _Keep()


@dataclass(frozen=True)
class TenantQuotas:
    """A tenant's weight and quotas; None (or a tier missing from ``max_inflight``) is off."""

    name: str
    weight: int = 1
    max_inflight: dict[str, int] = field(default_factory=dict)
    rate_per_s: float | None = None
    burst: int | None = None
    monthly_budget: Decimal | None = None

    @property
    def limited(self) -> bool:
        return bool(self.max_inflight) or self.rate_per_s is not None \
            or self.monthly_budget is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "weight": self.weight, "max_inflight": dict(self.max_inflight),
            "rate_per_s": self.rate_per_s, "burst": self.burst,
            "monthly_budget": None if self.monthly_budget is None else str(self.monthly_budget),
        }


_DAY_US: Final = 86_400 * 1_000_000


@dataclass(frozen=True)
class RateRule:
    """Rate R a second with burst B, as the GCRA enforces it (see the module docstring)."""

    rate_per_s: float
    burst: int

    @classmethod
    def of(cls, rate_per_s: float, burst: int | None) -> RateRule:
        return cls(rate_per_s, burst if burst is not None else max(math.ceil(rate_per_s), 1))

    @property
    def interval_us(self) -> int:
        """Microseconds between submissions at the rate (1 µs to a day)."""
        return min(max(round(1_000_000 / self.rate_per_s), 1), _DAY_US)

    @property
    def tolerance_us(self) -> int:
        """How far ahead of the rate a burst may run, in microseconds. At most a year, so the
        script's timestamps stay exact in Lua's doubles (below 2**53 µs, about 285 years)."""
        return min((self.burst - 1) * self.interval_us, 366 * _DAY_US)

    def describe(self) -> str:
        return f"{self.rate_per_s:g}/s, burst {self.burst}"


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 \
        else start.replace(month=start.month + 1)


def _row_to_quotas(row: Any) -> TenantQuotas:
    return TenantQuotas(
        name=row.name, weight=int(row.weight or 1),
        max_inflight={str(k): int(v) for k, v in (row.max_inflight or {}).items()},
        rate_per_s=row.rate_per_s, burst=row.burst, monthly_budget=row.monthly_budget,
    )


_TENANT_COLUMNS = (tenants.c.name, tenants.c.weight, tenants.c.max_inflight,
                   tenants.c.rate_per_s, tenants.c.burst, tenants.c.monthly_budget)


_GET_TENANT = select(*_TENANT_COLUMNS).where(tenants.c.name == bindparam("name"))


def _in_flight(tenant: str, tier: str) -> Any:
    return and_(jobs.c.tenant == tenant, jobs.c.tier == tier,
                jobs.c.state.in_(JobState.ACTIVE), jobs.c.parent_id.is_(None))


#: Redis counter bumped by every quota change made through ``TenantStore.set``: processes that
#: cache tenants' quotas (``Quotas``) re-read them when it moves.
VERSION_KEY = "orch:tenants:version"


class _Unread:
    """``Quotas.check``'s default: the caller did not read ``VERSION_KEY``."""


UNREAD = _Unread()
#: A cached quota is re-read after this long even if the version did not move (a change made
#: without Redis, or straight in the database, takes effect within it).
QUOTA_CACHE_S = 5.0


class TenantStore:
    """Tenants' quotas and what they use, in the database.

    With ``client``, each change also bumps ``VERSION_KEY`` so that submitting processes see it
    at their next submit; without Redis (or when it does not answer) they see it within
    ``QUOTA_CACHE_S``.
    """

    def __init__(self, engine: Engine, client: redis.Redis | None = None) -> None:
        self.engine = engine
        self.redis = client

    def get(self, name: str) -> TenantQuotas | None:
        with reading(self.engine) as conn:
            row = conn.execute(_GET_TENANT, {"name": name}).first()
        return _row_to_quotas(row) if row else None

    def all(self) -> list[TenantQuotas]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(*_TENANT_COLUMNS).order_by(tenants.c.name)).all()
        return [_row_to_quotas(row) for row in rows]

    def set(
        self,
        name: str,
        *,
        weight: int | _Keep = KEEP,
        max_inflight: Mapping[str, int | None] | None = None,
        rate_per_s: float | _Keep | None = KEEP,
        burst: int | _Keep | None = KEEP,
        monthly_budget: Decimal | _Keep | None = KEEP,
    ) -> TenantQuotas:
        """Create the tenant if needed and change the given quotas; None clears one.

        ``max_inflight`` maps tiers to their new limit (None removes that tier's limit).

        Raises:
            InvalidOption: a value is out of range or a tier is unknown.
        """
        current = self.get(name) or TenantQuotas(name=name)
        caps = dict(current.max_inflight)
        for tier, limit in (max_inflight or {}).items():
            if tier not in {t.value for t in TIER_ORDER}:
                raise InvalidOption(
                    f"unknown tier {tier!r}; choose from interactive, nearline, offline")
            if limit is None:
                caps.pop(tier, None)
            elif limit < 0:
                raise InvalidOption(f"max in-flight for {tier} must be 0 or more")
            else:
                caps[tier] = int(limit)
        new = TenantQuotas(
            name=name,
            weight=current.weight if isinstance(weight, _Keep) else weight,
            max_inflight=caps,
            rate_per_s=current.rate_per_s if isinstance(rate_per_s, _Keep) else rate_per_s,
            burst=current.burst if isinstance(burst, _Keep) else burst,
            monthly_budget=current.monthly_budget if isinstance(monthly_budget, _Keep)
            else monthly_budget,
        )
        _validate(new)
        with self.engine.begin() as conn:
            _insert_ignore(conn, tenants, {"name": name, "weight": 1, "created_at": utcnow()})
            conn.execute(update(tenants).where(tenants.c.name == name).values(
                weight=new.weight, max_inflight=new.max_inflight or None,
                rate_per_s=new.rate_per_s, burst=new.burst, monthly_budget=new.monthly_budget,
            ))
        if self.redis is not None:
            try:
                self.redis.incr(VERSION_KEY)
            except redis.RedisError:
                log.info("tenant %s: quotas changed, Redis did not answer; running clients "
                         "apply them within %gs", name, QUOTA_CACHE_S)
        return new

    def inflight(self, tenant: str, tier: Tier | str, *, cap: int | None = None) -> int:
        """The tenant's deferred, queued or running submissions in ``tier`` (at most ``cap``)."""
        inner = select(jobs.c.tenant).where(_in_flight(tenant, Tier(tier).value))
        if cap is not None:
            inner = inner.limit(cap)
        with reading(self.engine) as conn:
            return int(conn.execute(
                select(func.count()).select_from(inner.subquery())).scalar_one())

    def inflight_by_tier(self) -> dict[str, dict[str, int]]:
        """Tenant -> tier -> in-flight submissions, for every tenant with any."""
        query = (select(jobs.c.tenant, jobs.c.tier, func.count())
                 .where(and_(jobs.c.state.in_(JobState.ACTIVE), jobs.c.parent_id.is_(None)))
                 .group_by(jobs.c.tenant, jobs.c.tier))
        out: dict[str, dict[str, int]] = {}
        with reading(self.engine) as conn:
            for tenant, tier, count in conn.execute(query):
                out.setdefault(tenant, {})[tier] = int(count)
        return out

    def spend(self, tenant: str, *, now: datetime | None = None) -> Decimal:
        """The cost of the tenant's submissions created this calendar month (UTC)."""
        since = month_start(now or utcnow())
        dialect = self.engine.dialect.name
        query = select(exact_sum(jobs.c.cost, dialect)).where(and_(
            jobs.c.tenant == tenant, jobs.c.created_at >= since, jobs.c.parent_id.is_(None)))
        with reading(self.engine) as conn:
            total = conn.execute(query).scalar_one()
        return money_from_sum(total, dialect).normalize()


#: the largest weight or burst (a 32-bit integer in the database)
MAX_INT: Final = 2**31 - 1
#: the slowest and fastest rates (a submission a day; a microsecond apart, the GCRA's unit)
MIN_RATE: Final = 1 / 86_400
MAX_RATE: Final = 1e6
#: budgets are stored as NUMERIC(18, 8): below this
MAX_BUDGET: Final = Decimal("1e10")


def _validate(q: TenantQuotas) -> None:
    if not 1 <= q.weight <= MAX_INT:
        raise InvalidOption(f"weight must be from 1 to {MAX_INT}")
    if q.rate_per_s is not None and not (MIN_RATE <= q.rate_per_s <= MAX_RATE):
        raise InvalidOption(f"rate must be a number of submissions per second from {MIN_RATE:g}"
                            f" (one a day) to {MAX_RATE:g}")
    if q.burst is not None and not 1 <= q.burst <= MAX_INT:
        raise InvalidOption(f"burst must be from 1 to {MAX_INT}")
    if q.burst is not None and q.rate_per_s is None:
        raise InvalidOption("burst needs a rate (set --rate too)")
    if q.monthly_budget is not None and not (q.monthly_budget.is_finite()
                                             and 0 <= q.monthly_budget < MAX_BUDGET):
        raise InvalidOption(f"budget must be 0 or more and below {MAX_BUDGET:,.0f}")


def parse_budget(text: str) -> Decimal:
    """Raises: InvalidOption."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidOption(f"budget {text!r} is not a number") from None
    if not value.is_finite():
        raise InvalidOption(f"budget {text!r} is not a number")
    return value


class Quotas:
    """Checks a tenant's quotas for one more submit."""

    def __init__(self, engine: Engine, client: redis.Redis) -> None:
        self.tenants = TenantStore(engine, client)
        self.redis = client
        #: tenant -> (quotas, version they were read at, monotonic time read)
        self._cache: dict[str, tuple[TenantQuotas | None, bytes | str | None, float]] = {}
        self._gcra = client.register_script(_GCRA)

    def _quotas(self, tenant: str, version: bytes | _Unread | None = UNREAD
                ) -> TenantQuotas | None:
        """The tenant's quotas: cached while the version key stands still (one Redis GET
        instead of a database read per submit, none when the caller read ``version`` already),
        re-read when it moves or every few seconds."""
        seen: bytes | str | None
        if isinstance(version, _Unread):
            try:
                seen = self.redis.get(VERSION_KEY)
            except redis.RedisError:
                return self.tenants.get(tenant)  # no version to trust: read through
        else:
            seen = version
        now = time.monotonic()
        hit = self._cache.get(tenant)
        if hit is not None and hit[1] == seen and now - hit[2] < QUOTA_CACHE_S:
            return hit[0]
        quotas = self.tenants.get(tenant)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[tenant] = (quotas, seen, now)
        return quotas

    def check(self, tenant: str, tier: Tier, *, version: bytes | _Unread | None = UNREAD,
              spend_rate: bool = True) -> None:
        """Admit one more submit of ``tenant`` to ``tier`` or refuse it.

        The rate is checked last, so a submit refused by another quota does not use it up.
        ``version``: ``VERSION_KEY``'s value, when the caller has just read it.
        ``spend_rate=False``: only look whether the rate has room (a bulk submit spends it
        with ``spend_rate`` once its items are all in and valid).

        Raises:
            QuotaExceeded: names the quota that refused it.
            ServiceUnavailable: Redis does not answer the rate check.
        """
        quotas = self._quotas(tenant, version)
        if quotas is None or not quotas.limited:
            return
        limit = quotas.max_inflight.get(tier.value)
        if limit is not None:
            count = self.tenants.inflight(tenant, tier, cap=limit)
            if count >= limit:
                raise QuotaExceeded(tenant, quota="max_inflight", limit=limit, current=count,
                                    tier=tier.value, retry_after=None)
        if quotas.monthly_budget is not None:
            self._check_budget(tenant, quotas.monthly_budget)
        if quotas.rate_per_s is not None:
            self._check_rate(tenant, quotas.rate_per_s, quotas.burst, spend=spend_rate)

    def spend_rate(self, tenant: str) -> None:
        """Use one submission of the tenant's rate (see ``check``).

        Raises:
            QuotaExceeded: the rate has no room (other submits took it meanwhile).
            ServiceUnavailable: Redis does not answer.
        """
        quotas = self._quotas(tenant)
        if quotas is not None and quotas.rate_per_s is not None:
            self._check_rate(tenant, quotas.rate_per_s, quotas.burst)

    def _check_budget(self, tenant: str, budget: Decimal) -> None:
        now = utcnow()
        spent = self._spend(tenant, now)
        if spent >= budget:
            raise QuotaExceeded(
                tenant, quota="monthly_budget", limit=budget, current=spent,
                retry_after=round((next_month_start(now) - now).total_seconds(), 3),
                detail=f"spent {spent} of {budget} this month")

    def _spend(self, tenant: str, now: datetime) -> Decimal:
        key = f"orch:spend:{tenant}:{now:%Y-%m}"
        try:
            cached = self.redis.get(key)
        except redis.RedisError:
            cached = None
        if cached is not None:
            return Decimal(cached.decode() if isinstance(cached, bytes) else str(cached))
        spent = self.tenants.spend(tenant, now=now)
        with contextlib.suppress(redis.RedisError):  # the cache only saves a query
            self.redis.set(key, str(spent), ex=SPEND_CACHE_S)
        return spent

    def _check_rate(self, tenant: str, rate: float, burst: int | None, *,
                    spend: bool = True) -> None:
        rule = RateRule.of(rate, burst)
        try:
            admitted, wait_us = self._gcra(
                keys=[f"{RATE_KEY_PREFIX}:{tenant}"],
                args=[rule.interval_us, rule.tolerance_us, 1 if spend else 0])
        except redis.RedisError as e:
            raise ServiceUnavailable(f"Redis does not answer the rate check: {e}") from e
        if admitted:
            return
        raise QuotaExceeded(
            tenant, quota="rate", limit=rate,
            retry_after=max(math.ceil(int(wait_us) / 1000), 1) / 1000,  # never too early
            detail=rule.describe())
