"""The three QoS tiers and the policy attached to each.

A tier is both a Celery queue and a band of message priorities. On the Redis transport kombu
keeps one list per (queue, priority step) and BRPOPs them ordered *by priority step first, then
by queue order*; a message published without a priority lands in step 0, the best one. So every
message we publish carries its tier's priority explicitly, and the tier's priorities increase
(get worse) from interactive to offline: step order and queue order then agree, and a free slot
always takes interactive before nearline before offline.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Tier(StrEnum):
    """A quality-of-service tier; its value is also its Celery queue name."""

    INTERACTIVE = "interactive"
    NEARLINE = "nearline"
    OFFLINE = "offline"

    @property
    def rank(self) -> int:
        """0 for the most urgent tier."""
        return TIER_ORDER.index(self)


TIER_ORDER: tuple[Tier, ...] = (Tier.INTERACTIVE, Tier.NEARLINE, Tier.OFFLINE)

#: kombu's Redis priority steps: lower is served first. Each tier owns one step, and the step
#: just before it holds its preempted work resuming (the front of the tier, behind every tier
#: above it).
PRIORITY_STEPS: list[int] = list(range(10))


class TierPolicy(BaseModel):
    """What a tier promises and how its work is run.

    ``time_limit_s`` is the hard limit of one execution; ``lease_s`` is how long a claim on a
    job stays valid without a heartbeat (renewed every third of it while the job runs).

    Admission control (``orchestrator.admission``), each check off at 0: a submit is refused
    with ``Overloaded`` when the estimated queue wait (backlog x measured seconds per job /
    live worker slots) exceeds ``queue_wait_objective_s``, when the backlog has reached
    ``max_backlog`` (the load-shedding bound), or when it has reached ``hard_backlog`` (the cap
    that protects Redis, applied even when no worker is registered to estimate from).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    priority: int = Field(ge=0, le=9)
    time_limit_s: float = Field(gt=0)
    lease_s: float = Field(gt=0)
    max_attempts: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    max_batch_size: int = Field(default=1, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    preempt_min_slice_s: float = Field(default=1.0, ge=0)
    #: a bulk chunk of this tier looks for higher-tier work between mini-batches, and sizes
    #: them from the kind's measured wall time per item to take about this long each (at
    #: most the kind's segment size): the longest a higher tier waits for a chunk to look up,
    #: on a fast machine or a slow one. 0: always the segment size
    preempt_check_ms: float = Field(default=60.0, ge=0)
    #: how long one batch trigger's task keeps taking its buffer's batches before it hands
    #: its slot back to Celery: what a plain job of the tier can wait behind a draining slot,
    #: against one broker round trip and task start per budget
    drain_budget_s: float = Field(default=1.0, gt=0)
    queue_wait_objective_s: float = Field(default=0.0, ge=0)
    max_backlog: int = Field(default=0, ge=0)
    hard_backlog: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _hard_cap_above_shedding(self) -> TierPolicy:
        if self.hard_backlog and self.max_backlog > self.hard_backlog:
            raise ValueError(
                f"max_backlog ({self.max_backlog}) must not exceed hard_backlog "
                f"({self.hard_backlog}): the hard cap is the last line")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s:g}) must not be below backoff_base_s "
                f"({self.backoff_base_s:g})")
        if self.drain_budget_s >= self.time_limit_s:
            raise ValueError(
                f"drain_budget_s ({self.drain_budget_s:g}) must be below time_limit_s "
                f"({self.time_limit_s:g}): a draining task would hit its time limit")
        return self

    @property
    def resume_priority(self) -> int:
        """The step preempted work of this tier goes back to: the front of the tier."""
        return max(self.priority - 1, 0)



DEFAULT_POLICIES: dict[Tier, TierPolicy] = {
    Tier.INTERACTIVE: TierPolicy(
        priority=0, time_limit_s=60, lease_s=30, max_attempts=3,
        backoff_base_s=0.2, backoff_max_s=5, max_batch_size=16, max_queue_delay_ms=10,
        queue_wait_objective_s=0.5, hard_backlog=10_000,
    ),
    Tier.NEARLINE: TierPolicy(
        priority=3, time_limit_s=900, lease_s=60, max_attempts=5,
        backoff_base_s=2, backoff_max_s=120, max_batch_size=64, max_queue_delay_ms=500,
        preempt_min_slice_s=0.25, drain_budget_s=3.0, max_backlog=100_000,
    ),
    Tier.OFFLINE: TierPolicy(
        priority=6, time_limit_s=7200, lease_s=120, max_attempts=8,
        backoff_base_s=10, backoff_max_s=900, max_batch_size=256, max_queue_delay_ms=5000,
        preempt_min_slice_s=0.5, drain_budget_s=3.0, hard_backlog=5_000_000,
    ),
}


def parse_tiers(text: str) -> list[Tier]:
    """Parse a comma-separated tier list, keeping its order.

    Raises:
        ValueError: a name is not a tier or appears twice.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no tier given; choose from interactive, nearline, offline")
    tiers: list[Tier] = []
    for name in names:
        try:
            tier = Tier(name)
        except ValueError:
            raise ValueError(
                f"unknown tier {name!r}; choose from interactive, nearline, offline"
            ) from None
        if tier in tiers:
            raise ValueError(f"tier {name!r} given twice")
        tiers.append(tier)
    return tiers
