"""Raw onnxruntime throughput of the exported MiniLM, with no orchestrator around it.

    .venv/bin/python bench/raw_onnx.py [--model-dir DIR] [--rounds 5] [--sentences 256]

For each variant (int8, int8-rows, fp32) and batch size (1, 4, 8, 16, 32, 64), one session with one
intra-op thread embeds ``--sentences`` sentences of exactly 32 tokens (``[CLS]`` and ``[SEP]``
included); a round's rate is sentences per second of wall time, and the figure is the median
of the rounds (the rate per CPU-second of this process is recorded alongside).
Two columns per row: ``session`` times ``InferenceSession.run`` on pre-tokenized arrays,
``embed`` times ``EmbeddingModel.embed`` (tokenize + run + pool/normalise), so the wrapper's own
cost shows. A last row runs one session with 2 intra-op threads at batch 16, the alternative to
two single-threaded worker processes. Before each row it waits (up to ``--quiet-wait`` s) for
other processes to leave the CPUs and records how busy they were. Results go to
``bench/results/raw_onnx.json``.

The model dir defaults to ``ORCH_MODEL_DIR`` (``orchestrator models export`` fills it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from bench.overhead import wait_for_quiet  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from workers.models.embedding import DEFAULT_EMBEDDING_MODEL, EmbeddingModel  # noqa: E402

BATCH_SIZES = (1, 4, 8, 16, 32, 64)
VARIANTS = ("int8", "int8-rows", "fp32")
TOKENS = 32
# fmt: off
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "our",
    "search", "index", "rebuilds", "every", "night", "and", "the", "payment", "service",
    "scores", "each", "new", "invoice", "for", "fraud", "before", "it", "reaches", "the",
    "ledger", "so", "that", "analysts", "can", "review", "unusual", "transfers", "in", "the",
    "morning", "with", "fresh", "coffee",
)
# fmt: on


def sentences(model: EmbeddingModel, n: int) -> list[str]:
    """``n`` distinct sentences that each tokenize to exactly ``TOKENS`` tokens."""
    out: list[str] = []
    for i in range(n):
        words: list[str] = []
        for k in range(TOKENS):  # longest prefix of the word cycle that fits
            word = WORDS[(i * 7 + k) % len(WORDS)]
            if model.count_tokens([" ".join([*words, word])])[0] > TOKENS:
                break
            words.append(word)
        while model.count_tokens([" ".join(words)])[0] < TOKENS:
            words.append("a")  # one token, to land exactly on TOKENS
        out.append(" ".join(words))
    return out


def rate(run: Callable[[int], Any], n: int, batch: int, rounds: int) -> dict[str, Any]:
    """Median sentences/s over ``rounds`` passes of ``n`` sentences in batches of ``batch``.

    ``sentences_per_cpu_s`` divides by this process's CPU time instead of wall time: with one
    thread it estimates the uncontended rate even when other work shares the cores.
    """
    run(0)  # warm-up: first-run allocations and kernel selection
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for offset in range(0, n, batch):
            run(offset)
        wall.append(n / (time.perf_counter() - start))
        cpu.append(n / (time.process_time() - start_cpu))
    median = statistics.median(wall)
    return {
        "sentences_per_s": round(median, 1),
        "ms_per_batch": round(1000 * batch / median, 2),
        "sentences_per_cpu_s": round(statistics.median(cpu), 1),
        "rounds": [round(r, 1) for r in wall],
    }


def measure(
    model_dir: Path, variant: str, batch: int, threads: int, texts: list[str], rounds: int
) -> dict[str, Any]:
    model = EmbeddingModel.from_dir(model_dir, variant, intra_op_threads=threads)
    session = model._session  # raw onnxruntime, the same session embed() uses
    enc = model._tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    names = {i.name for i in session.get_inputs()}
    n = len(texts) - len(texts) % batch

    def raw(offset: int) -> Any:
        return session.run(
            None, {k: v[offset : offset + batch] for k, v in feeds.items() if k in names}
        )

    def wrapped(offset: int) -> Any:
        return model.embed(texts[offset : offset + batch])

    return {
        "variant": variant,
        "batch": batch,
        "intra_op_threads": threads,
        "session": rate(raw, n, batch, rounds),
        "embed": rate(wrapped, n, batch, rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for other processes to go quiet before each row",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "raw_onnx.json")
    args = parser.parse_args()
    model_dir = args.model_dir or Settings.from_env().model_dir
    load_at_start = os.getloadavg()
    probe = EmbeddingModel.from_dir(model_dir, "int8")
    texts = sentences(probe, args.sentences)
    plan = [(v, b, 1) for v in VARIANTS for b in BATCH_SIZES]
    plan += [(v, 16, 2) for v in VARIANTS]
    rows = []
    for variant, batch, threads in plan:
        busy = wait_for_quiet(args.quiet_wait)
        rows.append(
            {
                **measure(model_dir, variant, batch, threads, texts, args.rounds),
                "busy_pct_before": busy,
            }
        )
        _print(rows[-1])
    result = {
        "benchmark": "raw_onnx",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": DEFAULT_EMBEDDING_MODEL,
        "tokens_per_sentence": TOKENS,
        "sentences_per_round": args.sentences,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "versions": {p: metadata.version(p) for p in ("onnxruntime", "tokenizers", "numpy")},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _print(row: dict[str, Any]) -> None:
    print(
        f"{row['variant']:>9} batch {row['batch']:>3} threads {row['intra_op_threads']}: "
        f"session {row['session']['sentences_per_s']:>7.1f}/s  "
        f"embed {row['embed']['sentences_per_s']:>7.1f}/s  "
        f"(per CPU-s: {row['session']['sentences_per_cpu_s']:>7.1f}; "
        f"CPUs {row['busy_pct_before']:.0f}% busy before)",
        flush=True,
    )


if __name__ == "__main__":
    main()
