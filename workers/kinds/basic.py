"""``echo`` and ``burn``: kinds with no model, for smoke tests, demos and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import PermanentError, TransientError
from orchestrator.kinds import JobContext, kind


class EchoPayload(BaseModel):
    """Any JSON object; it comes back unchanged."""

    model_config = ConfigDict(extra="allow")


@kind("echo", schema=EchoPayload, tier="interactive")
def echo(payload: EchoPayload, ctx: JobContext) -> dict[str, Any]:
    """Return the payload unchanged."""
    return payload.model_dump()


class BurnPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ms: float = Field(ge=0, le=600_000, description="CPU time to spend, in milliseconds")
    fail_attempts: int = Field(
        default=0, ge=0, description="raise a transient error on the first N attempts"
    )
    fail_permanently: bool = Field(default=False, description="raise a permanent error")


@kind("burn", schema=BurnPayload, tier="nearline")
def burn(payload: BurnPayload, ctx: JobContext) -> dict[str, Any]:
    """Spin the CPU for ``ms`` milliseconds of process CPU time."""
    if payload.fail_permanently:
        raise PermanentError("burn asked to fail permanently")
    if ctx.attempt <= payload.fail_attempts:
        raise TransientError(f"burn asked to fail attempt {ctx.attempt} of {payload.fail_attempts}")
    start = time.process_time()
    target = payload.ms / 1000.0
    spins = 0
    while time.process_time() - start < target:
        spins += 1
    return {"ms": payload.ms, "spins": spins}
