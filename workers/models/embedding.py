"""Sentence embeddings through onnxruntime and a ``tokenizers`` tokenizer.

Model dir layout (``Settings.model_dir``, ``ORCH_MODEL_DIR``)::

    <model_dir>/
      all-MiniLM-L6-v2/          one directory per model, named as the kind's config names it
        model-fp32.onnx          float32 export (pooling and L2 norm inside the graph)
        model-int8.onnx          dynamic int8 quantisation of the same graph (default variant)
        model-int8-rows.onnx     the same int8 weights, activations quantised per row
        tokenizer.json           Hugging Face ``tokenizers`` file
        manifest.json            what was exported, from what, and its cosine agreement
      scoring-synthetic/
        model-small.onnx, model-large.onnx, manifest.json

Any ONNX graph whose inputs are among ``input_ids``, ``attention_mask`` and ``token_type_ids``
works: a first output of rank 3 (token embeddings) is mean-pooled under the attention mask here,
one of rank 2 is taken as already pooled. Both are L2-normalised here.

The int8 variant is about 2.4x faster than fp32 on one core, but dynamic quantisation scales
activations over the whole batch, so an int8 vector depends slightly on its batch mates (on the
export's reference texts, one text alone vs inside a batch: cosine >= 0.95). ``int8-rows`` (the
same weights, activations quantised per row: ``rowquant``) and fp32 vectors are batch-invariant;
choose one (``ORCH_EMBED_VARIANT``) where vectors must be reproducible: int8-rows runs at
0.79-0.87x int8's speed on one thread, fp32 at 0.42x (``bench/raw_onnx.py``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from orchestrator.errors import ConfigurationError, PermanentError
from orchestrator.model_check import EMBEDDING, model_files
from workers.models._session import open_session

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
#: what an export wrote, next to its files (``workers.models.export``)
MANIFEST = "manifest.json"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INT_TYPES: dict[str, type[np.integer[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def embedding_files(model_dir: Path, name: str, variant: str) -> tuple[Path, Path]:
    """Where a model's graph and tokenizer live in the model dir layout."""
    graph, tokenizer = model_files(model_dir, EMBEDDING, name, variant)
    return graph, tokenizer


class EmbeddingModel:
    """One onnxruntime session and its tokenizer; turns texts into unit-length vectors.

    Made once per worker process (in ``worker_process_init``) and reused for every batch.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        intra_op_threads: int = 1,
        max_length: int = 128,
        name: str | None = None,
    ) -> None:
        """Load the graph and the tokenizer.

        Raises:
            ConfigurationError: a file is missing or unreadable, or the graph asks for an input
                this class cannot feed.
        """
        if max_length < 1:
            raise ConfigurationError(f"max_length must be at least 1, got {max_length}")
        self._session = open_session(Path(model_path), intra_op_threads=intra_op_threads)
        self._tokenizer = _load_tokenizer(Path(tokenizer_path), max_length)
        self._name = name or Path(model_path).parent.name or Path(model_path).stem
        self._inputs: dict[str, type[np.integer[Any]]] = {}
        for spec in self._session.get_inputs():
            if spec.name not in TOKEN_INPUTS or spec.type not in _INT_TYPES:
                raise ConfigurationError(
                    f"model {model_path} declares input {spec.name!r} of type {spec.type}; "
                    f"an embedding model may only take {', '.join(TOKEN_INPUTS)} as integers"
                )
            self._inputs[spec.name] = _INT_TYPES[spec.type]
        if "input_ids" not in self._inputs:
            raise ConfigurationError(f"model {model_path} has no 'input_ids' input")
        output = self._session.get_outputs()[0]
        if len(output.shape) not in (2, 3):
            raise ConfigurationError(
                f"model {model_path}: first output {output.name!r} has rank {len(output.shape)};"
                " expected [batch, dim] or [batch, sequence, dim]"
            )
        self._output = output.name
        last = output.shape[-1]
        self._dim = last if isinstance(last, int) else int(self.embed(["dimension probe"]).shape[1])

    @classmethod
    def from_dir(
        cls,
        model_dir: Path,
        variant: str = "int8",
        *,
        name: str = DEFAULT_EMBEDDING_MODEL,
        **kw: Any,
    ) -> EmbeddingModel:
        """Load ``<model_dir>/<name>/model-<variant>.onnx`` and its ``tokenizer.json``.

        Raises:
            ConfigurationError: the files are not there (run ``orchestrator models export``).
        """
        model_path, tokenizer_path = embedding_files(Path(model_dir), name, variant)
        manifest = model_path.parent / MANIFEST
        if "max_length" not in kw and manifest.is_file():  # as exported (256 for MiniLM)
            with contextlib.suppress(ValueError, TypeError, KeyError):
                kw["max_length"] = int(json.loads(manifest.read_text())["max_length"])
        return cls(model_path, tokenizer_path, name=name, **kw)

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch: float32 [len(texts), dim], each row of unit length.

        Raises:
            PermanentError: an item is not a string, or a text has no tokens at all.
        """
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """``embed``, and the tokens each text cost the model (as ``count_tokens``), from one
        tokenization.

        Raises:
            PermanentError: as ``embed``.
        """
        encodings = self._encode(texts)
        if not encodings:
            return np.zeros((0, getattr(self, "_dim", 0)), dtype=np.float32), []
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        counts = mask.sum(axis=1)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise PermanentError(f"text at index {int(empty[0])} has no tokens to embed")
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        feed = {
            k: v.astype(self._inputs[k], copy=False) for k, v in feed.items() if k in self._inputs
        }
        (out,) = self._session.run([self._output], feed)
        out = np.asarray(out, dtype=np.float32)
        if out.ndim == 3:
            weights = mask[:, :, None].astype(np.float32)
            out = (out * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32, copy=False), counts.tolist()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs the model (after truncation, padding excluded).

        Raises:
            PermanentError: an item is not a string.
        """
        return [int(sum(e.attention_mask)) for e in self._encode(texts)]

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        if isinstance(texts, str):
            raise PermanentError("embed takes a sequence of texts, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise PermanentError(f"item {i} is {type(text).__name__}, not a string")
        return self._tokenizer.encode_batch(list(texts)) if len(texts) else []

    def __repr__(self) -> str:
        return f"EmbeddingModel(name={self._name!r}, dim={self._dim})"


def _load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    if not path.is_file():
        raise ConfigurationError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise ConfigurationError(f"cannot read tokenizer {path}: {e}") from e
    # Exported tokenizer files often pad to a fixed length (MiniLM's pads to 128); padding to
    # the batch's longest text is what keeps short batches cheap.
    pad = tokenizer.padding or {}
    pad_token = pad.get("pad_token") or "[PAD]"
    pad_id = pad.get("pad_id")
    if pad_id is None:
        pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ConfigurationError(f"tokenizer {path} has no padding token ([PAD]) configured")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=None)
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
