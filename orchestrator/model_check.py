"""At submit, a job that names a model no live worker of its tier has is refused.

Each worker announces the models its model dir holds with its registry heartbeat
(``workers.registry``: ``orch:worker-models:<name>`` maps a family, ``embedding`` or
``scoring``, to names). A kind that runs a model says which one a payload names
(``kind(model_of=...)``), and ``Client.submit`` checks it against the union of what the tier's
live workers hold, the way an inference server answers "model not found" at request time
instead of after the queue.

The check only refuses what it knows: with no live worker serving the tier (the job waits for
one, which may bring the model), or a live one that does not announce its models, or Redis not
answering, the submit goes ahead and a worker without the model fails the job as before. The
announcements are read at most every ``CACHE_S`` per client; a name missing from that reading is
looked up again before a refusal (when the reading is older than ``FRESH_S``), and a model the
client's own model dir holds (the embedded default, or a shared dir, where the workers find it
too) is never refused, so a model exported while workers run is accepted at once there,
elsewhere within a heartbeat.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from orchestrator.admission import WORKERS_SET, worker_key
from orchestrator.errors import InvalidPayload
from orchestrator.tiers import Tier

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
SCORING = "scoring"
#: an embedding model's tokenizer, beside its graph ``model-<variant>.onnx``
TOKENIZER_FILE = "tokenizer.json"
#: the two graphs of a scorer pair, ``model-<size>.onnx``: every row, then the unsure ones
SCORER_SIZES = ("small", "large")
#: a worker whose model dir holds more models of a family than this announces none (the check
#: then stays out of the way, rather than refuse the ones left out)
MAX_ANNOUNCED = 1000
#: seconds a reading of the workers' announcements is reused
CACHE_S = 5.0
#: seconds a reading is trusted before a refusal (which looks again once it is older)
FRESH_S = 0.5
#: a worker's announced models are at this prefix plus its name
MODELS_KEY_PREFIX = "orch:worker-models:"

#: family -> names the live workers of a tier hold; None: not known
Holdings = Mapping[str, frozenset[str]] | None


def models_key(worker: str) -> str:
    """Where a worker announces its models (apart from its registry entry: see the registry)."""
    return f"{MODELS_KEY_PREFIX}{worker}"


def model_files(model_dir: Path, family: str, name: str, embed_variant: str) -> list[Path]:
    """The files a worker opens for a model: the model dir's layout."""
    base = Path(model_dir) / name
    if family == EMBEDDING:
        return [base / f"model-{embed_variant}.onnx", base / TOKENIZER_FILE]
    if family == SCORING:
        return [base / f"model-{size}.onnx" for size in SCORER_SIZES]
    raise ValueError(f"unknown model family {family!r}")


def holds(model_dir: Path, family: str, name: str, embed_variant: str) -> bool:
    """Whether ``model_dir`` holds every file of the model (False for an unknown family)."""
    try:
        files = model_files(model_dir, family, name, embed_variant)
    except ValueError:
        return False
    return all(path.is_file() for path in files)


class ModelCheck:
    """Refuses submits whose model no live worker of their tier holds."""

    def __init__(self, client: redis.Redis, *, cache_s: float = CACHE_S,
                 model_dir: Path | None = None, embed_variant: str = "int8") -> None:
        """``model_dir``: the client's own (see the module docstring)."""
        self.redis = client
        self.cache_s = cache_s
        self.model_dir = model_dir
        self.embed_variant = embed_variant
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._entries: list[_Entry] = []
        self._held: dict[Tier, Holdings] = {}  # per tier, from the entries of this reading

    def check(self, kind: str, tier: Tier, family: str, name: str) -> None:
        """Raises: InvalidPayload (on the payload's ``model``) when the tier's live workers all
        announce their models and none holds ``name``."""
        held = self._holdings(tier, fresh=False)
        if held is None or family not in held or name in held[family]:
            return
        held = self._holdings(tier, fresh=True)  # exported a moment ago?
        if held is None or family not in held or name in held[family]:
            return  # (a family no worker announces is not theirs to judge)
        if self.model_dir is not None and holds(self.model_dir, family, name,
                                                 self.embed_variant):
            return
        have = ", ".join(sorted(held.get(family, ()))) or "none"
        raise InvalidPayload(kind, [{
            "loc": ("model",), "type": "model_unavailable",
            "msg": (f"no live worker of the {tier.value} tier has the {family} model "
                    f"{name!r} in its model dir (they have: {have}); export it there "
                    f"(`orchestrator models export`) or name another"),
        }])

    def _holdings(self, tier: Tier, *, fresh: bool) -> Holdings:
        with self._lock:
            now = time.monotonic()
            age = now - self._read_at
            # A fresh look at most every FRESH_S: a stream of submits naming a missing model
            # must not turn into a Redis read each, with every other submit waiting its turn.
            if age >= self.cache_s or (fresh and age >= FRESH_S):
                try:
                    self._entries = self._read()
                except redis.RedisError:
                    log.debug("model check skipped: Redis does not answer", exc_info=True)
                    return None
                self._read_at = now
                self._held.clear()
            if tier not in self._held:  # once per tier and reading, not per submit
                self._held[tier] = _union([e for e in self._entries if tier.value in e.tiers])
            return self._held[tier]

    def _read(self) -> list[_Entry]:
        names = sorted(n.decode() if isinstance(n, bytes) else str(n)
                       for n in self.redis.smembers(WORKERS_SET))
        if not names:
            return []
        raw = self.redis.mget([key for n in names for key in (worker_key(n), models_key(n))])
        out = []
        for entry_raw, models_raw in zip(raw[::2], raw[1::2], strict=True):
            if entry_raw is None:  # gone without a goodbye (its entry expired)
                continue
            entry = _Entry.parse(entry_raw, models_raw)
            if entry is not None:
                out.append(entry)
        return out


@dataclass(frozen=True)
class _Entry:
    """What the check reads of a live worker: its tiers and the models it announces."""

    tiers: frozenset[str]
    #: family -> model names; None when the worker does not announce its models
    models: dict[str, frozenset[str]] | None

    @classmethod
    def parse(cls, entry_raw: bytes | str, models_raw: bytes | str | None) -> _Entry | None:
        try:
            tiers = frozenset(str(t) for t in json.loads(entry_raw)["tiers"])
        except (ValueError, KeyError, TypeError):
            return None  # malformed: admission control logs it
        try:
            models = json.loads(models_raw) if models_raw is not None else None
        except ValueError:
            models = None
        if not isinstance(models, dict):
            return cls(tiers, None)
        return cls(tiers, {str(f): frozenset(str(n) for n in names)
                           for f, names in models.items() if isinstance(names, list)})


def _union(entries: list[_Entry]) -> Holdings:
    """What a tier's live workers hold together; None when none is live or one does not say."""
    if not entries or any(e.models is None for e in entries):
        return None
    held: dict[str, set[str]] = {}
    for entry in entries:
        for family, names in (entry.models or {}).items():
            held.setdefault(family, set()).update(names)
    return {family: frozenset(names) for family, names in held.items()}
