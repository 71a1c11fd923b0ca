"""The one place an onnxruntime session is made, so every model gets the same CPU discipline."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from orchestrator.errors import ConfigurationError


def open_session(path: Path, *, intra_op_threads: int) -> ort.InferenceSession:
    """One CPU session: ``intra_op_threads`` threads for an operator, no inter-op parallelism.

    A worker process runs one batch at a time, so sequential execution with one inter-op thread
    keeps a process's CPU use at ``intra_op_threads`` cores and the cost accounting honest.

    Raises:
        ConfigurationError: the file is missing or onnxruntime cannot load it.
    """
    if intra_op_threads < 1:
        raise ConfigurationError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
    if not path.is_file():
        raise ConfigurationError(
            f"model file {path} does not exist (export models with `orchestrator models export`)"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
        raise ConfigurationError(f"onnxruntime cannot load model {path}: {e}") from e


def metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The model's custom metadata (``metadata_props``), e.g. the scorers' held-out accuracy."""
    return dict(session.get_modelmeta().custom_metadata_map)
