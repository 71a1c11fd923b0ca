"""Declaring job kinds: a decorator that carries the payload schema, default tier and retry policy.

Kinds live in ordinary modules that both the client (to validate payloads at submit) and the
workers (to run them) import by name, through ``ORCH_IMPORTS``. Nothing is discovered by magic.

    from pydantic import BaseModel
    from orchestrator.kinds import JobContext, kind

    class Resize(BaseModel):
        url: str

    @kind("resize", schema=Resize, tier="nearline", max_attempts=5)
    def resize(payload: Resize, ctx: JobContext) -> dict:
        ...
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.errors import ConfigurationError, InvalidPayload, UnknownKind
from orchestrator.tiers import Tier, TierPolicy

KindFn = Callable[[Any, "JobContext"], Any]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for transient errors; ``None`` fields fall back to the tier's policy."""

    max_attempts: int | None = None
    backoff_base_s: float | None = None
    backoff_max_s: float | None = None

    def resolve(self, tier: TierPolicy) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts or tier.max_attempts,
            backoff_base_s=tier.backoff_base_s if self.backoff_base_s is None
            else self.backoff_base_s,
            backoff_max_s=tier.backoff_max_s if self.backoff_max_s is None
            else self.backoff_max_s,
        )


@dataclass(frozen=True)
class BatchPolicy:
    """Declares a kind as batchable: small jobs of it are coalesced into one call.

    ``None`` sizes fall back to the tier's ``max_batch_size`` / ``max_queue_delay_ms``.
    ``key`` names the part of a payload that must match for two jobs to share a batch (for
    example the model); jobs are coalesced per (kind, key, tier). ``bulk_field`` is the payload
    list that ``submit_bulk`` fills with a chunk of items.
    """

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    key: Callable[[Any], str] | None = None
    bulk_field: str | None = None
    chunk_size: int = 1024
    segment_size: int | None = None
    """Items per mini-batch of a bulk chunk (its preemption points); default one model call."""
    chunked: bool = False
    """A plain ``submit`` of this kind runs as a bulk job too: its ``bulk_field`` becomes the
    items of checkpointed chunks that yield to higher tiers (long offline kinds: ``index``)."""

    def size(self, tier: TierPolicy) -> int:
        return self.max_batch_size or tier.max_batch_size

    def delay_ms(self, tier: TierPolicy) -> float:
        return tier.max_queue_delay_ms if self.max_queue_delay_ms is None \
            else self.max_queue_delay_ms


@dataclass
class BatchShare:
    """Set by a batch kind to say how the call's CPU is shared (e.g. tokens per job)."""

    weights: list[float] | None = None


@dataclass(frozen=True)
class JobContext:
    """What a running kind may know about its job(s); passed as the second argument.

    For a batch kind, ``job_id`` and ``attempt`` are those of the first job of the batch;
    ``batch_ids`` lists all of them in payload order.
    """

    job_id: str
    tenant: str
    tier: Tier
    attempt: int
    max_attempts: int
    queued_at: datetime | None
    worker: str
    log: logging.LoggerAdapter[logging.Logger]
    resources: Any = None
    batch_ids: tuple[str, ...] = ()
    share: BatchShare = field(default_factory=BatchShare)


@dataclass(frozen=True)
class KindSpec:
    """A declared job kind."""

    name: str
    fn: KindFn
    schema: type[BaseModel]
    tier: Tier
    retry: RetryPolicy
    description: str = ""
    module: str = field(default="")
    batch: BatchPolicy | None = None
    setup: Callable[[Any], Any] | None = None
    #: the off-peak window this kind's jobs wait for unless a submit names another (or none)
    window: str | None = None
    #: the model a validated payload runs, ``(family, name)``; a submit naming one that no
    #: live worker of its tier holds is refused (``orchestrator.model_check``)
    model_of: Callable[[Any], tuple[str, str] | None] | None = None

    def batch_key(self, model: BaseModel) -> str:
        """The coalescing key of a validated payload ("-" when the kind has none)."""
        if self.batch is None or self.batch.key is None:
            return "-"
        return str(self.batch.key(model))

    def validate(self, payload: Any) -> BaseModel:
        """Check a payload against the schema.

        Raises:
            InvalidPayload: with pydantic's message for every offending field.
        """
        if not isinstance(payload, dict):
            raise InvalidPayload(
                self.name, [{"loc": (), "msg": f"payload must be a JSON object, got "
                             f"{type(payload).__name__}", "type": "dict_type"}]
            )
        try:
            return self.schema.model_validate(payload)
        except ValidationError as e:
            raise InvalidPayload(
                self.name,
                [{"loc": err["loc"], "msg": err["msg"], "type": err["type"]} for err in e.errors()],
            ) from e


class KindRegistry:
    """Job kinds by name. Declaring the same name twice with different functions is an error."""

    def __init__(self) -> None:
        self._kinds: dict[str, KindSpec] = {}
        self._lock = threading.Lock()

    def kind(
        self,
        name: str,
        *,
        schema: type[BaseModel],
        tier: Tier | str = Tier.NEARLINE,
        max_attempts: int | None = None,
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
        batch: BatchPolicy | None = None,
        setup: Callable[[Any], Any] | None = None,
        window: str | None = None,
        model_of: Callable[[Any], tuple[str, str] | None] | None = None,
    ) -> Callable[[KindFn], KindFn]:
        """Declare a job kind.

        A plain kind is ``fn(payload, ctx) -> result``. A batch kind (``batch=BatchPolicy()``)
        is ``fn(payloads, ctx) -> results``: one result per payload, in order; an item may be
        an exception instance to fail that job alone. ``setup(settings)`` runs once per worker
        process (models, sessions) and its value is ``ctx.resources``. ``window`` names the
        off-peak window the kind's jobs wait for by default. ``model_of(payload)`` names the
        model a payload runs, ``(family, name)`` (None: none), for the submit-time check that
        a live worker holds it.

        Raises:
            ConfigurationError: the name is taken, the tier is unknown or the schema is not a
                pydantic model.
        """
        try:
            tier = Tier(tier)
        except ValueError:
            raise ConfigurationError(
                f"kind {name!r}: unknown tier {tier!r}; choose from interactive, nearline, offline"
            ) from None
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise ConfigurationError(f"kind {name!r}: schema must be a pydantic BaseModel class")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigurationError(f"kind {name!r}: max_attempts must be at least 1")
        retry = RetryPolicy(max_attempts, backoff_base_s, backoff_max_s)

        def register(fn: KindFn) -> KindFn:
            spec = KindSpec(
                name=name, fn=fn, schema=schema, tier=tier, retry=retry,
                description=(fn.__doc__ or "").strip().split("\n")[0], module=fn.__module__,
                batch=batch, setup=setup, window=window, model_of=model_of,
            )
            with self._lock:
                existing = self._kinds.get(name)
                if existing is not None and existing.fn is not fn and (
                    existing.module, existing.fn.__qualname__) != (spec.module, fn.__qualname__):
                    raise ConfigurationError(
                        f"job kind {name!r} declared twice ({existing.module} and {spec.module})"
                    )
                self._kinds[name] = spec
            return fn

        return register

    def get(self, name: str) -> KindSpec:
        """Look up a kind.

        Raises:
            UnknownKind: no module imported so far declares it.
        """
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownKind(name, list(self._kinds)) from None

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def specs(self) -> list[KindSpec]:
        return [self._kinds[name] for name in sorted(self._kinds)]

    def load(self, modules: Iterable[str]) -> KindRegistry:
        """Import the modules that declare kinds.

        Raises:
            ConfigurationError: a module cannot be imported.
        """
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigurationError(f"cannot import job kinds module {module!r}: {e}") from e
        return self


#: The registry that ``@kind`` declares into.
registry = KindRegistry()
kind = registry.kind
