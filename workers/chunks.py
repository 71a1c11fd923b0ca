"""Running one chunk of a bulk job in mini-batches, yielding to higher tiers at checkpoints.

Between mini-batches the chunk asks Redis whether higher-tier work waits (``HigherTierCheck``).
Waiting interactive work is first run in place (``InPlaceServer``): the chunk's process takes
those messages, runs them and carries on, its own state untouched in memory; the time they took
is not the chunk's (its CPU and wall seconds leave it out). If higher-tier work still waits
and the chunk has run its tier's minimum slice, it writes the results so far as a checkpoint
file and ends the attempt as ``preempted``: the job goes back to its tier's resume step (the
front of the tier) with ``items_done`` at the checkpoint, its slot is free for the waiting
work, and the next attempt starts at the checkpoint. No item runs twice; every attempt adds
only the CPU it used; a preemption does not use up a retry.

A chunk that belongs to an off-peak window also checks, between mini-batches, that the window
is still open (``window_open``); once it has closed, the chunk checkpoints the same way and goes
back to ``deferred``, to resume at the checkpoint in the window's next opening.

Mini-batches are sized by time (``Pacer``): a kind's measured wall time per item says how many
fit the tier's ``preempt_check_ms``, so the wait of higher-tier work for the next check is
bounded in milliseconds, not in items whose cost depends on the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from orchestrator.db.store import Claim
from orchestrator.kinds import JobContext, KindSpec
from orchestrator.results import ResultStore
from orchestrator.tiers import Tier, TierPolicy
from workers.execution import Outcomes
from workers.preemption import HigherTierCheck, InPlaceServer


class Pacer:
    """Sizes chunks' mini-batches from each kind's last measured wall seconds per item.

    Keyed by kind and batch key (``embed:<model>``): two models of one kind keep their own pace.

    A kind not yet measured in this process starts at its full segment size (one model call);
    from then on a mini-batch takes ``step_s / seconds per item`` items, between 1 and the
    segment size, so it lasts about ``step_s``. The estimate follows the machine: a slower
    model call (a slower CPU, or the cores shared with other work) makes the next one smaller.
    """

    def __init__(self) -> None:
        self._per_item: dict[str, float] = {}

    def size(self, kind: str, most: int, step_s: float) -> int:
        per_item = self._per_item.get(kind)
        if step_s <= 0 or not per_item:
            return most
        return max(1, min(most, int(step_s / per_item)))

    def ran(self, kind: str, items: int, seconds: float) -> None:
        if items > 0 and seconds > 0:
            self._per_item[kind] = seconds / items


def _join(pieces: list[Any]) -> Any:
    import numpy as np

    if pieces and hasattr(pieces[0], "dtype"):
        return np.concatenate([np.asarray(p) for p in pieces])
    return [row for piece in pieces for row in piece]


def run_chunk(spec: KindSpec, claim: Claim, model: Any, ctx: JobContext, *,
              policy: TierPolicy, segment: int, check: HigherTierCheck, results: ResultStore,
              outcomes: Outcomes, window_open: Callable[[], bool] | None = None,
              pacer: Pacer, step_s: float, in_place: InPlaceServer | None = None) -> None:
    """Run a chunk from its checkpoint; record success, failure or preemption in ``outcomes``.

    Mini-batches hold ``segment`` items, or with ``step_s`` > 0 as many as ``pacer`` says
    take about that long (at most ``segment``).
    """
    assert spec.batch is not None and spec.batch.bulk_field is not None
    assert claim.parent_id is not None
    field = spec.batch.bulk_field
    items = getattr(model, field)
    # Resume at the checkpoint only if its results are really there (a worker without the
    # shared result store would otherwise assemble a short chunk); else redo the chunk.
    start = claim.items_done if results.covers(claim.parent_id, claim.job_id,
                                                claim.items_done) else 0
    done = start
    pieces: list[Any] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    lent = [0.0, 0.0]  # cpu and wall seconds spent on higher-tier work run in place
    paced = f"{spec.name}:{spec.batch_key(model)}"  # e.g. embed:<model>: each its own pace

    def spent() -> tuple[float, float]:
        return (time.process_time() - cpu0 - lent[0],
                time.perf_counter() - wall0 - lent[1])

    def must_yield() -> bool:
        waiting = check.waiting_by_tier()
        if not any(waiting.values()):
            return False
        if in_place is not None and waiting.get(Tier.INTERACTIVE):
            served, cpu, wall = in_place.serve()
            lent[0] += cpu
            lent[1] += wall
            if in_place.limit_due:  # the chunk's soft limit came while that work ran
                raise SoftTimeLimitExceeded()
            waiting = check.waiting_by_tier()
            if served:
                # Interactive work that arrived meanwhile is served at the next checkpoint,
                # a mini-batch away; only other work waiting above frees the slot.
                waiting.pop(Tier.INTERACTIVE, None)
            # (Served nothing: what the first look saw may have been taken by another slot
            # meanwhile; the second look says whether something is still out of reach.)
        return any(waiting.values()) and spent()[1] >= policy.preempt_min_slice_s

    try:
        while done < len(items):
            end = min(done + pacer.size(paced, segment, step_s), len(items))
            called = time.perf_counter()
            (piece,) = spec.fn([model.model_copy(update={field: items[done:end]})], ctx)
            pacer.ran(paced, end - done, time.perf_counter() - called)
            if isinstance(piece, BaseException):
                raise piece
            pieces.append(piece)
            done = end
            # Redone from 0 (its checkpoint's results were not there), a chunk does not stop
            # before its old checkpoint: that would move it back, and its parent, which
            # counted those items already, would count them again.
            may_stop = claim.items_done <= done < len(items)
            if may_stop and window_open is not None and not window_open():
                results.write_part(claim.parent_id, claim.job_id, start, _join(pieces))
                outcomes.defer(claim, done, *spent())
                return
            if may_stop and must_yield():
                results.write_part(claim.parent_id, claim.job_id, start, _join(pieces))
                outcomes.preempt(claim, done, *spent())
                return
        whole = results.assemble(claim.parent_id, claim.job_id, start, _join(pieces))
    except Exception as e:  # recorded on the job; the checkpoint stays
        outcomes.fail(claim, e, *spent())
        return
    outcomes.ok(claim, whole, *spent())
