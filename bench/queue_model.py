"""What an ideal batcher could reach on this machine: a queueing model of the open-loop test.

``bench/batching.py``'s open loop measures the real system. This script asks what the best
possible system would measure with the same arrivals and the same model: Poisson arrivals at a
fraction of the raw rate, ``--slots`` single-threaded model slots, a batch taken when it is full
or when its oldest job reaches the cap (or, if every slot is busy then, when a slot frees),
and a batch of n jobs occupying its slot for ``a + b·n`` seconds (slower by ``--both-busy``
while the other slot runs too: two processes share the cores' caches and memory bandwidth),
plus ``--overhead`` seconds per batch and ``--dispatch`` seconds from due to started. Nothing
else competes for the cores: no submitting client, no database, no broker.

``a`` and ``b`` are fitted here from the real model (one process, one onnxruntime thread,
32-token sentences at batch 1 and at batch 16), unless given. Writes
``bench/results/queue_model.json``. Usage::

    .venv/bin/python bench/queue_model.py --model-dir /tmp/models-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fit(model_dir: Path, rounds: int = 3) -> tuple[float, float]:
    """Seconds per batch of n = a + b·n, from the model's CPU time at batch 1 and 16."""
    from bench.raw_onnx import sentences
    from workers.models.embedding import EmbeddingModel

    model = EmbeddingModel.from_dir(model_dir, "int8", intra_op_threads=1)
    texts = sentences(model, 256)
    per: dict[int, float] = {}
    for b in (1, 16):
        model.embed(texts[:b])
        runs = []
        for _ in range(rounds):
            c0 = time.process_time()
            for i in range(0, len(texts), b):
                model.embed(texts[i:i + b])
            runs.append((time.process_time() - c0) / (len(texts) // b))
        per[b] = float(np.median(runs))
    slope = (per[16] - per[1]) / 15
    return per[1] - slope, slope


def simulate(rate: float, *, cap: float, a: float, b: float, slots: int, max_batch: int,
             overhead: float, dispatch: float, both_busy: float, seconds: float, seed: int
             ) -> dict[str, float]:
    """Time-in-queue percentiles (ms) of one run of the model."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds)))
    free = [0.0] * slots
    waits: list[float] = []
    i, n = 0, len(arrivals)
    queue: list[float] = []
    while i < n or queue:
        s = int(np.argmin(free))
        if not queue:
            queue.append(float(arrivals[i]))
            i += 1
        # due: full, or the oldest job's cap; taken when a slot is free too
        take = max(free[s], queue[0] + cap)
        while i < n and len(queue) < max_batch and arrivals[i] <= take:
            queue.append(float(arrivals[i]))
            i += 1
        if len(queue) >= max_batch:
            take = max(free[s], queue[max_batch - 1])
        take += dispatch
        while i < n and len(queue) < max_batch and arrivals[i] <= take:
            queue.append(float(arrivals[i]))
            i += 1
        batch, queue = queue[:max_batch], queue[max_batch:]
        waits += [take - t for t in batch]
        busy = any(f > take for k, f in enumerate(free) if k != s)
        free[s] = take + (a + b * len(batch)) * (both_busy if busy else 1.0) + overhead
    w = np.array(waits) * 1000
    return {"p50_ms": round(float(np.percentile(w, 50)), 1),
            "p99_ms": round(float(np.percentile(w, 99)), 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--a-ms", type=float, default=None, help="fixed ms per batch (else fitted)")
    p.add_argument("--b-ms", type=float, default=None, help="ms per job (else fitted)")
    p.add_argument("--raw", type=float, default=None,
                   help="raw rate (jobs/s) the loads are fractions of (default: from "
                        "bench/results/batching.json)")
    p.add_argument("--loads", default="0.25,0.5")
    p.add_argument("--cap-ms", type=float, default=10.0)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--both-busy", type=float, default=None,
                   help="slowdown while both slots run (default: raw rate vs one process)")
    p.add_argument("--overheads-ms", default="0,3,6", help="per-batch overheads to try")
    p.add_argument("--dispatch-ms", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=400.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.a_ms is None or args.b_ms is None:
        if args.model_dir is None:
            p.error("give --model-dir (to fit a and b) or both --a-ms and --b-ms")
        a, b = fit(args.model_dir)
    else:
        a, b = args.a_ms / 1000, args.b_ms / 1000
    raw = args.raw
    if raw is None:
        report = json.loads((args.out / "batching.json").read_text())
        raw = next(r["sentences_per_s"] for r in report["raw"]
                   if r["batch"] == report["config"]["batch"])
    # Two processes reach `raw` together; one alone would reach slots / (a/16 + b) per second.
    both_busy = args.both_busy or max(1.0, args.slots / ((a / 16 + b) * raw))
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        for overhead_ms in (float(x) for x in args.overheads_ms.split(",")):
            rows.append({"load": load, "rate": round(load * raw, 1), "overhead_ms": overhead_ms,
                         **simulate(load * raw, cap=args.cap_ms / 1000, a=a, b=b,
                                    slots=args.slots, max_batch=args.max_batch,
                                    overhead=overhead_ms / 1000,
                                    dispatch=args.dispatch_ms / 1000, both_busy=both_busy,
                                    seconds=args.seconds, seed=1)})
    out = {"command": " ".join([".venv/bin/python bench/queue_model.py", *(argv or sys.argv[1:])]),
           "a_ms": round(a * 1000, 3), "b_ms": round(b * 1000, 3), "raw": raw,
           "both_busy": round(both_busy, 3), "cap_ms": args.cap_ms,
           "dispatch_ms": args.dispatch_ms, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "queue_model.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"a = {out['a_ms']} ms per batch, b = {out['b_ms']} ms per job, raw {raw}/s, "
          f"both-busy slowdown {out['both_busy']}")
    for r in rows:
        print(f"  load {r['load']:.0%} ({r['rate']}/s), per-batch overhead {r['overhead_ms']} ms: "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")


if __name__ == "__main__":
    main()
