"""Worker registration: admission control counts the slots of live workers per tier.

A worker's main process (not its pool processes) runs a ``Heartbeat`` thread that rewrites
``orch:workers:<name>`` = ``{"tiers": [...], "concurrency": n}`` every ``interval_s`` with a
time to live of three intervals, so a worker killed without a goodbye drops out within three
heartbeats; a clean stop removes its entry at once. Beside it, ``orch:worker-models:<name>`` =
``{family: [names]}`` (what its model dir holds, looked at again on every beat) lets a submit
naming a model no live worker has be refused at the edge (``orchestrator.model_check``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import redis

from orchestrator.admission import WORKERS_SET, worker_key
from orchestrator.model_check import models_key
from orchestrator.tiers import Tier

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0


def register(client: redis.Redis, name: str, tiers: Sequence[Tier | str], concurrency: int,
             *, ttl_s: float = 3 * HEARTBEAT_S,
             models: Mapping[str, Sequence[str]] | None = None) -> None:
    """Announce (or renew) a worker serving ``tiers`` with ``concurrency`` slots (and holding
    ``models``, family -> names; None: it does not say).

    Raises:
        ValueError: a tier is unknown or ``concurrency`` is below 1.
        redis.RedisError: Redis does not answer.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    entry = json.dumps({"tiers": [Tier(t).value for t in tiers], "concurrency": concurrency})
    ttl_ms = max(int(ttl_s * 1000), 1)
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_key(name), entry, px=ttl_ms)
    # Apart from the entry, which admission control reads on every submit: a long list of
    # models would cost every submit, and only the model check reads it.
    if models is None:
        pipe.delete(models_key(name))
    else:
        pipe.set(models_key(name), json.dumps(
            {family: list(names) for family, names in models.items()}), px=ttl_ms)
    pipe.sadd(WORKERS_SET, name)
    pipe.execute()


def unregister(client: redis.Redis, name: str) -> None:
    """Remove a worker's entry (its slots stop counting at once)."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(worker_key(name), models_key(name))
    pipe.srem(WORKERS_SET, name)
    pipe.execute()


class Heartbeat:
    """Keeps one worker registered while it runs; use as a context manager."""

    def __init__(self, client: redis.Redis, name: str, tiers: Sequence[Tier], concurrency: int,
                 *, interval_s: float = HEARTBEAT_S,
                 models: Callable[[], Mapping[str, Sequence[str]] | None] | None = None
                 ) -> None:
        """``models``: what the worker holds, asked again on every beat."""
        self.redis = client
        self.models = models
        self.name = name
        self.tiers = list(tiers)
        self.concurrency = concurrency
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="worker-registry-heartbeat")

    def _beat(self) -> None:
        try:
            models = self.models() if self.models is not None else None
        except Exception:  # announce nothing rather than stop beating
            log.warning("worker %s: could not list its models", self.name, exc_info=True)
            models = None
        try:
            register(self.redis, self.name, self.tiers, self.concurrency,
                     ttl_s=3 * self.interval_s, models=models)
        except redis.RedisError:
            log.warning("worker %s: registry heartbeat failed", self.name, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        try:
            unregister(self.redis, self.name)
        except redis.RedisError:
            log.warning("worker %s: could not unregister; its entry expires by itself",
                        self.name, exc_info=True)
