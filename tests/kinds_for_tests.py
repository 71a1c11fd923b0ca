"""Job kinds that only the tests use (imported through ORCH_IMPORTS)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ConfigDict

from orchestrator.errors import PermanentError, TransientError
from orchestrator.kinds import BatchPolicy, JobContext, kind


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


class UpperPayload(BaseModel):
    """Texts to upper-case; a batch kind with a bulk field, like ``embed``."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str]
    group: str = "g"


def _upper(payloads: list[UpperPayload], ctx: JobContext) -> list[Any]:
    """Upper-case every text. "boom" fails the whole call; "bad" fails only its own job;
    "late" makes a call of more than one job overrun the tier's soft time limit; "opaque" is
    returned as a row no JSON encoder takes, "nan" as NaN."""
    texts = [t for p in payloads for t in p.texts]
    if "boom" in texts:
        raise TransientError("boom in the batch")
    if "late" in texts and len(payloads) > 1:
        raise SoftTimeLimitExceeded()
    ctx.share.weights = [float(sum(len(t) for t in p.texts)) for p in payloads]
    out: list[Any] = []
    for p in payloads:
        if "bad" in p.texts:
            out.append(PermanentError("bad text"))
        else:
            out.append([object() if t == "opaque" else float("nan") if t == "nan"
                        else t.upper() for t in p.texts])
    if any(t.startswith("slow") for t in texts):
        time.sleep(1.0)
    return out


upper = kind(
    "upper", schema=UpperPayload, tier="nearline", max_attempts=2,
    batch=BatchPolicy(max_batch_size=4, max_queue_delay_ms=300, key=lambda p: p.group,
                      bulk_field="texts", chunk_size=100, segment_size=10),
)(_upper)


class NightlyPayload(BaseModel):
    """An offline kind whose jobs wait for the built-in ``offpeak`` window by default."""

    model_config = ConfigDict(extra="forbid")

    note: str = ""


@kind("nightly", schema=NightlyPayload, tier="offline", window="offpeak")
def nightly(payload: NightlyPayload, ctx: JobContext) -> dict[str, Any]:
    """Return the note."""
    return {"note": payload.note}


class TallyPayload(BaseModel):
    """Items to count; each call appends the items it processed to ``path``."""

    model_config = ConfigDict(extra="forbid")

    items: list[str]
    path: str
    sleep_s: float = 0.0


def _tally(payloads: list[TallyPayload], ctx: JobContext) -> list[Any]:
    """Sleep, then append each item to its payload's file: a test counts how often each ran."""
    out: list[Any] = []
    for p in payloads:
        time.sleep(p.sleep_s)
        with Path(p.path).open("a") as f:
            f.writelines(f"{item}\n" for item in p.items)
        out.append([item.upper() for item in p.items])
    return out


tally = kind(
    "tally", schema=TallyPayload, tier="offline", max_attempts=3,
    batch=BatchPolicy(max_batch_size=4, max_queue_delay_ms=100, key=lambda p: p.path,
                      bulk_field="items", chunk_size=100, segment_size=2),
)(_tally)


class PacePayload(BaseModel):
    """Items that each take ``per_item_s``; every call appends how many items it got."""

    model_config = ConfigDict(extra="forbid")

    items: list[str]
    path: str
    per_item_s: float = 0.0


def _pace(payloads: list[PacePayload], ctx: JobContext) -> list[Any]:
    out: list[Any] = []
    for p in payloads:
        time.sleep(p.per_item_s * len(p.items))
        with Path(p.path).open("a") as f:
            f.write(f"{len(p.items)}\n")
        out.append(list(p.items))
    return out


# A chunked kind with no segment size of its own: its mini-batches are sized by time.
pace = kind(
    "pace", schema=PacePayload, tier="offline",
    batch=BatchPolicy(key=lambda p: p.path, bulk_field="items", chunk_size=100),
)(_pace)

# The same with a fixed segment size (as ``index`` has, which commits per mini-batch).
pace_fixed = kind(
    "pace_fixed", schema=PacePayload, tier="offline",
    batch=BatchPolicy(key=lambda p: p.path, bulk_field="items", chunk_size=100, segment_size=4),
)(_pace)
