"""Job kinds that only the tests use (imported through ORCH_IMPORTS)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from orchestrator.kinds import JobContext, kind


class RecordPayload(BaseModel):
    """Append a line to a file, so a test can count how often the effect ran."""

    model_config = ConfigDict(extra="forbid")

    path: str
    label: str
    sleep_s: float = 0.0


@kind("record", schema=RecordPayload, tier="nearline", max_attempts=3)
def record(payload: RecordPayload, ctx: JobContext) -> dict[str, Any]:
    """Sleep, then append ``label attempt`` to ``path``."""
    time.sleep(payload.sleep_s)
    with Path(payload.path).open("a") as f:
        f.write(f"{payload.label} {ctx.attempt} {time.time():.6f}\n")
    return {"label": payload.label, "attempt": ctx.attempt}
