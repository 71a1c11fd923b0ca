"""What a worker's model dir holds, by family, announced with its registry heartbeat.

A submit that names a model no live worker of its tier has is then refused at the edge
(``orchestrator.model_check``) instead of failing in a worker after it waited its turn.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.model_check import EMBEDDING, MAX_ANNOUNCED, SCORING, holds

log = logging.getLogger(__name__)


def installed(model_dir: Path, embed_variant: str) -> dict[str, list[str]] | None:
    """Family -> names of the models a worker can open: an embedding model whose graph of
    ``embed_variant`` and tokenizer are there, a scorer whose small and large graphs are.
    None (announce nothing) when a family has more than ``MAX_ANNOUNCED``."""
    out: dict[str, list[str]] = {EMBEDDING: [], SCORING: []}
    try:
        subdirs = sorted(p.name for p in Path(model_dir).iterdir() if p.is_dir())
    except OSError:  # no model dir yet: no models
        return out
    for name in subdirs:
        for family, names in out.items():
            if holds(Path(model_dir), family, name, embed_variant):
                names.append(name)
    for family, names in out.items():
        if len(names) > MAX_ANNOUNCED:
            log.warning("model dir %s holds %d %s models, more than the %d a worker announces: "
                        "submits are not checked against it", model_dir, len(names), family,
                        MAX_ANNOUNCED)
            return None
    return out
