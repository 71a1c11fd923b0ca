"""Escalation of the scoring kind: how many rows go to the large model, and how often it agrees.

Scores fresh rows of the synthetic task the demo scorers were trained on (labels known) with
the small model, the large model and the escalating cascade at several thresholds, on one
onnxruntime thread, and reports per threshold: the share of rows escalated, how often the
small model's answer agreed with the large one on those rows, the accuracy of each, and rows/s.

    .venv/bin/python bench/scoring.py [--rows 200000] [--model-dir DIR]

Writes bench/results/scoring.json and bench/results/scoring.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from workers.models.builders import build_scoring_models, synthetic_classification
from workers.models.scoring import EscalatingScorer, ScoringModel

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 0.95)


def _rate(fn: object, rows: np.ndarray, batch: int) -> tuple[float, list[object]]:
    outs = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        outs.append(fn(rows[i:i + batch]))  # type: ignore[operator]
    return len(rows) / (time.perf_counter() - start), outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a dir holding scoring-synthetic/ (default: build a fresh pair)")
    args = parser.parse_args()
    folder = args.model_dir / "scoring-synthetic" if args.model_dir else \
        Path(tempfile.mkdtemp()) / "scoring-synthetic"
    if not (folder / "model-large.onnx").exists():
        build_scoring_models(folder)
    small = ScoringModel(folder / "model-small.onnx", name="small")
    large = ScoringModel(folder / "model-large.onnx", name="large")
    rows, truth = synthetic_classification(args.rows, small.n_features or 16, seed=12345)

    small_rate, small_out = _rate(small.predict_proba, rows, args.batch)
    large_rate, large_out = _rate(large.predict_proba, rows, args.batch)
    small_labels = np.concatenate([o.argmax(axis=1) for o in small_out])  # type: ignore[attr-defined]
    large_labels = np.concatenate([o.argmax(axis=1) for o in large_out])  # type: ignore[attr-defined]
    figures: dict[str, object] = {
        "rows": args.rows, "batch": args.batch,
        "small": {"rows_per_s": round(small_rate),
                  "accuracy": float((small_labels == truth).mean())},
        "large": {"rows_per_s": round(large_rate),
                  "accuracy": float((large_labels == truth).mean())},
        "cascade": [],
    }
    for threshold in THRESHOLDS:
        scorer = EscalatingScorer(small, large, threshold)
        rate, outs = _rate(scorer.score, rows, args.batch)
        labels = np.concatenate([o.labels for o in outs])  # type: ignore[attr-defined]
        escalated = np.concatenate([o.escalated for o in outs])  # type: ignore[attr-defined]
        agree = float((small_labels[escalated] == large_labels[escalated]).mean()) \
            if escalated.any() else None
        figures["cascade"].append({  # type: ignore[attr-defined]
            "threshold": threshold,
            "escalated_share": float(escalated.mean()),
            "small_agrees_with_large_on_escalated": agree,
            "small_agrees_with_large_overall": float((small_labels == large_labels).mean()),
            "accuracy": float((labels == truth).mean()),
            "rows_per_s": round(rate),
        })
    report = {
        "command": "python bench/scoring.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or "?"},
        "figures": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Scoring escalation", "", f"`{report['command']}` on {report['date']}", "",
        f"small (logistic regression): {figures['small']['rows_per_s']:,} rows/s, "  # type: ignore[index]
        f"accuracy {figures['small']['accuracy']:.3f}; "  # type: ignore[index]
        f"large (MLP): {figures['large']['rows_per_s']:,} rows/s, "  # type: ignore[index]
        f"accuracy {figures['large']['accuracy']:.3f}", "",  # type: ignore[index]
        "| threshold | escalated | small = large on escalated | cascade accuracy | rows/s |",
        "|---|---|---|---|---|",
    ]
    for c in figures["cascade"]:  # type: ignore[attr-defined]
        cell = "-" if c["small_agrees_with_large_on_escalated"] is None else \
            f"{c['small_agrees_with_large_on_escalated']:.1%}"
        lines.append(f"| {c['threshold']} | {c['escalated_share']:.1%} | {cell} | "
                     f"{c['accuracy']:.3f} | {c['rows_per_s']:,} |")
    (RESULTS / "scoring.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
