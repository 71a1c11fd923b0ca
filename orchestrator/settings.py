"""One typed settings object, built from the environment and passed down.

Nothing here connects to anything. The embedded default applies to each URL on its own: with
no ``ORCH_DATABASE_URL`` the database is a SQLite file under the state dir, and with no
``ORCH_BROKER_URL`` the broker is a private Redis on a socket in the state dir.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import ConfigurationError
from orchestrator.tiers import DEFAULT_POLICIES, TIER_ORDER, Tier, TierPolicy

BUILTIN_IMPORTS: tuple[str, ...] = (
    "workers.kinds.basic", "workers.kinds.inference", "workers.kinds.retrieval")
EMBEDDED_SOCKET = "redis.sock"


def _default_state_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "orchestrator"


class Settings(BaseModel):
    """Configuration of one deployment: where its database and broker live, and tier policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    database_url: str | None = None
    broker_url: str | None = None
    imports: tuple[str, ...] = ()
    state_dir: Path
    model_dir: Path
    tiers: dict[Tier, TierPolicy] = Field(default_factory=lambda: dict(DEFAULT_POLICIES))
    visibility_timeout_s: float = Field(default=4 * 3600, gt=0)
    unacked_restore_s: float = Field(default=10, gt=0)
    #: Seconds between a task's soft time limit (the kind is interrupted, the attempt fails as
    #: transient) and its hard one (the pool process is killed).
    hard_limit_grace_s: float = Field(default=30, ge=0)
    result_wait_poll_s: float = Field(default=5.0, gt=0)
    model_threads: int = Field(default=1, ge=1, le=64)
    model_batch: int = Field(default=16, ge=1, le=4096)
    embed_variant: str = Field(default="int8", pattern=r"^(int8|int8-rows|fp32)$")
    fair_window: int = Field(default=4, ge=1, le=10_000)
    preemption: bool = True
    #: A draining slot of a tier that does not linger takes and claims its next due batch
    #: while the current one's model runs (handed back if higher-tier work arrives).
    claim_ahead: bool = True
    #: The deployment's TOML file (``[windows.NAME]``, ``[prices]``); ``ORCH_CONFIG``, else
    #: ``orchestrator.toml`` in the state dir when it exists.
    config_file: Path | None = None
    #: How often the scheduler looks at windows (opens, closes, releases deferred jobs).
    scheduler_tick_s: float = Field(default=0.5, gt=0, le=60)
    #: How long a scheduler's lease lasts without renewal (renewed every third of it).
    scheduler_lease_s: float = Field(default=15.0, gt=0)
    #: How often the scheduler's reconciler looks for jobs whose broker message is gone.
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    #: A queued job is only checked once it has been due this long (a submit in flight has
    #: stored its row but not yet published), and an expired lease only this long after expiry.
    reconcile_grace_s: float = Field(default=5.0, ge=0)
    #: A bulk submission whose stream has staged no chunk for this long (its client died while
    #: reading the items) is given up by the reconciler: the parent fails, its staged chunks go.
    bulk_stream_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _tier_steps_in_order(self) -> Settings:
        previous = -1
        for tier in TIER_ORDER:
            policy = self.tiers[tier]
            if policy.priority <= previous or (tier.rank and policy.resume_priority <= previous):
                raise ValueError(
                    f"{tier.value} priority {policy.priority} must be above the tier before it "
                    f"({previous}) with a free step between (for its preempted work)")
            previous = policy.priority
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_tasks(self) -> Settings:
        # The hard limit kills a task this long after its soft limit (orchestrator.broker).
        grace = self.hard_limit_grace_s
        longest = max(policy.time_limit_s for policy in self.tiers.values()) + grace
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s:g}) must be longer than the "
                f"longest tier time limit plus its {grace:g}s grace ({longest:g}s), "
                "or Redis redelivers running tasks"
            )
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``ORCH_*`` variables.

        Tier policy fields are overridden one by one as ``ORCH_TIER_<TIER>_<FIELD>``, e.g.
        ``ORCH_TIER_INTERACTIVE_LEASE_S=10``.

        Raises:
            ConfigurationError: a variable is malformed or settings contradict each other.
        """
        env = os.environ if env is None else env
        known = {
            "ORCH_DATABASE_URL", "ORCH_BROKER_URL", "ORCH_IMPORTS", "ORCH_STATE_DIR",
            "ORCH_MODEL_DIR", "ORCH_VISIBILITY_TIMEOUT_S", "ORCH_UNACKED_RESTORE_S",
            "ORCH_HARD_LIMIT_GRACE_S",
            "ORCH_RESULT_WAIT_POLL_S", "ORCH_MODEL_THREADS", "ORCH_MODEL_BATCH",
            "ORCH_EMBED_VARIANT", "ORCH_FAIR_WINDOW", "ORCH_PREEMPTION", "ORCH_CONFIG",
            "ORCH_SCHEDULER_TICK_S", "ORCH_SCHEDULER_LEASE_S", "ORCH_RECONCILE_INTERVAL_S",
            "ORCH_RECONCILE_GRACE_S", "ORCH_BULK_STREAM_TIMEOUT_S", "ORCH_CLAIM_AHEAD",
        }
        tier_fields = set(TierPolicy.model_fields)
        overrides: dict[Tier, dict[str, str]] = {tier: {} for tier in TIER_ORDER}
        for name, value in env.items():
            if not name.startswith("ORCH_") or name in known:
                continue
            parsed = _parse_tier_var(name, tier_fields)
            if parsed is None:
                raise ConfigurationError(f"unknown setting {name}; see the README's table")
            overrides[parsed[0]][parsed[1]] = value
        state_dir = Path(env.get("ORCH_STATE_DIR") or _default_state_dir(env)).expanduser()
        raw: dict[str, object] = {
            "database_url": env.get("ORCH_DATABASE_URL") or None,
            "broker_url": env.get("ORCH_BROKER_URL") or None,
            "imports": tuple(
                m.strip() for m in env.get("ORCH_IMPORTS", "").split(",") if m.strip()),
            "state_dir": state_dir,
            "model_dir": Path(env.get("ORCH_MODEL_DIR") or state_dir / "models").expanduser(),
        }
        if env.get("ORCH_CONFIG"):
            raw["config_file"] = Path(env["ORCH_CONFIG"]).expanduser()
        elif (state_dir / "orchestrator.toml").is_file():
            raw["config_file"] = state_dir / "orchestrator.toml"
        for key, var in (
            ("visibility_timeout_s", "ORCH_VISIBILITY_TIMEOUT_S"),
            ("unacked_restore_s", "ORCH_UNACKED_RESTORE_S"),
            ("hard_limit_grace_s", "ORCH_HARD_LIMIT_GRACE_S"),
            ("result_wait_poll_s", "ORCH_RESULT_WAIT_POLL_S"),
            ("model_threads", "ORCH_MODEL_THREADS"),
            ("model_batch", "ORCH_MODEL_BATCH"),
            ("embed_variant", "ORCH_EMBED_VARIANT"),
            ("fair_window", "ORCH_FAIR_WINDOW"),
            ("preemption", "ORCH_PREEMPTION"),
            ("claim_ahead", "ORCH_CLAIM_AHEAD"),
            ("scheduler_tick_s", "ORCH_SCHEDULER_TICK_S"),
            ("scheduler_lease_s", "ORCH_SCHEDULER_LEASE_S"),
            ("reconcile_interval_s", "ORCH_RECONCILE_INTERVAL_S"),
            ("reconcile_grace_s", "ORCH_RECONCILE_GRACE_S"),
            ("bulk_stream_timeout_s", "ORCH_BULK_STREAM_TIMEOUT_S"),
        ):
            if env.get(var):
                raw[key] = env[var]
        try:
            raw["tiers"] = {
                tier: DEFAULT_POLICIES[tier].model_validate(
                    _fit_drain_budget({**DEFAULT_POLICIES[tier].model_dump(), **fields}, fields)
                )
                for tier, fields in overrides.items()
            }
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigurationError(f"invalid settings: {e}") from e

    # --- derived -----------------------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        """True when the private Redis under the state dir is the broker."""
        return self.broker_url is None

    @property
    def embedded_socket(self) -> Path:
        return self.state_dir / EMBEDDED_SOCKET

    def resolved_database_url(self) -> str:
        """The database URL, or the embedded SQLite file under the state dir."""
        return self.database_url or f"sqlite:///{self.state_dir / 'orchestrator.db'}"

    def resolved_broker_url(self) -> str:
        """The broker URL in kombu's spelling, or the embedded Redis socket."""
        return self.broker_url or f"redis+socket://{self.embedded_socket}"

    def redis_url(self) -> str:
        """The broker's Redis in redis-py's spelling (used for signals and counters)."""
        url = self.resolved_broker_url()
        if url.startswith("redis+socket://"):
            return "unix://" + url.removeprefix("redis+socket://")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(f"the broker must be Redis; got {url!r}")
        return url

    def all_imports(self) -> tuple[str, ...]:
        """Modules that declare job kinds: the built-ins, then ``ORCH_IMPORTS``."""
        return tuple(dict.fromkeys((*BUILTIN_IMPORTS, *self.imports)))

    def config(self) -> dict[str, Any]:
        """The parsed config file (empty without one); each section is validated by its owner.

        Raises:
            ConfigurationError: the file is missing or is not valid TOML.
        """
        if self.config_file is None:
            return {}
        try:
            with open(self.config_file, "rb") as f:
                return tomllib.load(f)
        except OSError as e:
            raise ConfigurationError(f"cannot read config file {self.config_file}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"config file {self.config_file} is not TOML: {e}") from e

    def policy(self, tier: Tier) -> TierPolicy:
        return self.tiers[tier]

    def to_env(self) -> dict[str, str]:
        """The environment that rebuilds these settings in a child process."""
        env = {
            "ORCH_STATE_DIR": str(self.state_dir),
            "ORCH_MODEL_DIR": str(self.model_dir),
            "ORCH_VISIBILITY_TIMEOUT_S": repr(self.visibility_timeout_s),
            "ORCH_UNACKED_RESTORE_S": repr(self.unacked_restore_s),
            "ORCH_HARD_LIMIT_GRACE_S": repr(self.hard_limit_grace_s),
            "ORCH_RESULT_WAIT_POLL_S": repr(self.result_wait_poll_s),
            "ORCH_MODEL_THREADS": str(self.model_threads),
            "ORCH_MODEL_BATCH": str(self.model_batch),
            "ORCH_EMBED_VARIANT": self.embed_variant,
            "ORCH_FAIR_WINDOW": str(self.fair_window),
            "ORCH_PREEMPTION": "1" if self.preemption else "0",
            "ORCH_CLAIM_AHEAD": "1" if self.claim_ahead else "0",
            "ORCH_SCHEDULER_TICK_S": repr(self.scheduler_tick_s),
            "ORCH_SCHEDULER_LEASE_S": repr(self.scheduler_lease_s),
            "ORCH_RECONCILE_INTERVAL_S": repr(self.reconcile_interval_s),
            "ORCH_RECONCILE_GRACE_S": repr(self.reconcile_grace_s),
            "ORCH_BULK_STREAM_TIMEOUT_S": repr(self.bulk_stream_timeout_s),
        }
        if self.database_url:
            env["ORCH_DATABASE_URL"] = self.database_url
        if self.broker_url:
            env["ORCH_BROKER_URL"] = self.broker_url
        if self.imports:
            env["ORCH_IMPORTS"] = ",".join(self.imports)
        if self.config_file is not None:
            env["ORCH_CONFIG"] = str(self.config_file)
        for tier, policy in self.tiers.items():
            default = DEFAULT_POLICIES[tier]
            for field, value in policy.model_dump().items():
                if value != getattr(default, field):
                    env[f"ORCH_TIER_{tier.name}_{field.upper()}"] = str(value)
        return env


def _fit_drain_budget(policy: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """A time limit set at or below the tier's default drain budget, with no budget set,
    takes half the limit as its budget (a draining task must end before its limit); a budget
    set explicitly is left for the policy's check to refuse."""
    if "drain_budget_s" not in given and "time_limit_s" in given:
        with contextlib.suppress(TypeError, ValueError):
            limit = float(policy["time_limit_s"])
            if float(policy["drain_budget_s"]) >= limit > 0:
                policy["drain_budget_s"] = limit / 2
    return policy


def _parse_tier_var(name: str, fields: set[str]) -> tuple[Tier, str] | None:
    for tier in TIER_ORDER:
        prefix = f"ORCH_TIER_{tier.name}_"
        if name.startswith(prefix):
            field = name.removeprefix(prefix).lower()
            return (tier, field) if field in fields else None
    return None
