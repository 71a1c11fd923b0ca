"""Prometheus metrics: what workers record, and the HTTP exposition.

Workers run a Celery **prefork** pool, so every pool process records into its own files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and the worker's main
process serves their sum (``orchestrator worker --metrics-port``). The directory must be set
before ``prometheus_client`` is first imported in the process, which is why nothing in this
package imports it at module level: ``prepare_multiprocess_dir`` sets it and empties it at
worker start (stale files from a previous run would add old counts), and each pool process
is marked dead at its shutdown. Counters of dead processes are kept (they are sums).

Cluster-wide state (queue depth, worker slots, sheds, jobs per state) is not a per-process
figure: ``ClusterCollector`` reads it from Redis and the database at scrape time, served by
``orchestrator metrics serve`` (one exporter for the deployment; the scheduler can serve it
too with ``serve``). Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.admission import Admission, read_sheds
from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, Outcome, jobs
from orchestrator.errors import ConfigurationError, OrchestratorError
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

if TYPE_CHECKING:
    from orchestrator.costs.charge import Charge
    from orchestrator.db.transitions import Finish

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0, 300.0, 900.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def prepare_multiprocess_dir(path: Path | None = None) -> Path:
    """Choose, create and empty the multiprocess directory, and export it as ``ENV``.

    ``path`` (else ``$PROMETHEUS_MULTIPROC_DIR``, else a new private temporary directory).
    Call it in the worker's main process before the pool forks and before anything imports
    ``prometheus_client``.
    """
    chosen = path or (Path(os.environ[ENV]) if os.environ.get(ENV) else
                      Path(tempfile.mkdtemp(prefix="orchestrator-metrics-")))
    chosen.mkdir(parents=True, exist_ok=True)
    for stale in chosen.glob("*.db"):
        stale.unlink()
    os.environ[ENV] = str(chosen)
    return chosen


def mark_process_dead(pid: int) -> None:
    """Drop a finished pool process's live-gauge files (multiprocess mode only)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class WorkerMetrics:
    """The metrics one worker process records (unregistered: exposition reads the files)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.finished = Counter(
            "orch_jobs_finished", "Attempts that ended, by how they ended.",
            ["tier", "kind", "outcome"], registry=None)
        self.retries = Counter(
            "orch_retries", "Attempts that failed and were queued again to retry.",
            ["tier", "kind"], registry=None)
        self.preemptions = Counter(
            "orch_preemptions", "Bulk chunk attempts that yielded to higher-tier work.",
            ["tier"], registry=None)
        self.queue_wait = Histogram(
            "orch_queue_wait_seconds", "Time from (re)queue to claim, per attempt.",
            ["tier"], buckets=QUEUE_WAIT_BUCKETS, registry=None)
        self.batch_size = Histogram(
            "orch_batch_size", "Jobs per model call of a batch kind.", ["tier", "kind"],
            buckets=BATCH_SIZE_BUCKETS, registry=None)
        self.cpu = Counter(
            "orch_cpu_seconds", "CPU seconds measured for attempts.", ["tier"], registry=None)
        self.cost = Counter(
            "orch_cost", "Cost charged to finished jobs (price table currency).",
            ["tenant", "tier"], registry=None)

    def record(self, finishes: Sequence[Finish], owned: set[str]) -> None:
        """One finished batch (or job): outcomes, waits, batch sizes, CPU."""
        batches: dict[str, tuple[str, str, int]] = {}
        for f in finishes:
            claim = f.claim
            outcome = f.outcome if claim.job_id in owned else "discarded"
            self.finished.labels(claim.tier, claim.kind, outcome).inc()
            if outcome == Outcome.RETRY:
                self.retries.labels(claim.tier, claim.kind).inc()
            elif outcome == Outcome.PREEMPTED:
                self.preemptions.labels(claim.tier).inc()
            if claim.queued_at is not None:
                wait = (claim.started_at - claim.queued_at).total_seconds()
                self.queue_wait.labels(claim.tier).observe(max(wait, 0.0))
            self.cpu.labels(claim.tier).inc(max(f.cpu_seconds, 0.0))
            if f.batch_id is not None and f.batch_size:
                batches[f.batch_id] = (claim.tier, claim.kind, f.batch_size)
        for tier, kind, size in batches.values():
            self.batch_size.labels(tier, kind).observe(size)

    def charged(self, charges: Sequence[Charge]) -> None:
        """Accountant observer: count committed charges by tenant and tier."""
        for c in charges:
            self.cost.labels(c.tenant, c.tier).inc(float(c.cost))


class ClusterCollector:
    """Deployment-wide gauges read at scrape time from Redis and the database."""

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = client

    def describe(self) -> list[Any]:
        return []  # collected on demand only; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        depth = GaugeMetricFamily("orch_queue_depth",
                                  "Jobs waiting in a tier: queue lists, batch buffers, fair "
                                  "turns.", labels=["tier"])
        slots = GaugeMetricFamily("orch_worker_slots",
                                  "Pool slots of live workers serving a tier.", labels=["tier"])
        admission = Admission(self.redis, self.settings)
        try:
            for tier in TIER_ORDER:
                load = admission.load(tier)
                depth.add_metric([tier.value], load.backlog)
                slots.add_metric([tier.value], load.slots)
            sheds = CounterMetricFamily("orch_sheds", "Submits refused with Overloaded.",
                                        labels=["tier", "reason"])
            for (tier_name, reason), n in sorted(read_sheds(self.redis).items()):
                sheds.add_metric([tier_name, reason], n)
        except (redis.RedisError, OrchestratorError):
            log.warning("metrics: Redis did not answer", exc_info=True)
            return
        yield depth
        yield slots
        yield sheds
        active = GaugeMetricFamily("orch_jobs", "Jobs in an active state, per tier.",
                                   labels=["tier", "state"])
        try:
            with reading(self.engine) as conn:
                counts = {(t, s): n for t, s, n in conn.execute(
                    select(jobs.c.tier, jobs.c.state, func.count())
                    .where(jobs.c.state.in_(JobState.ACTIVE))
                    .group_by(jobs.c.tier, jobs.c.state))}
        except SQLAlchemyError:
            log.warning("metrics: the database did not answer", exc_info=True)
            return
        for tier in TIER_ORDER:
            for state in JobState.ACTIVE:
                active.add_metric([tier.value, state], counts.get((tier.value, state), 0))
        yield active


class SchedulerMetrics:
    """What the scheduler does, in its own registry (it is one process, not a pool)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.released = Counter(
            "orch_window_released", "Deferred jobs released to their queue when a window "
            "opened.", ["window"], registry=self.registry)
        self.republished = Counter(
            "orch_reconciler_republished", "Jobs the reconciler re-published: reason "
            "message_gone (queued, broker message lost), lease_expired (running, worker "
            "lost) or taken_unclaimed (queued, taken from a buffer, never claimed).", ["reason"],
            registry=self.registry)
        self.acting = Gauge(
            "orch_scheduler_acting", "1 while this scheduler holds the lease and acts.",
            registry=self.registry)

    def released_jobs(self, released: Mapping[str, Sequence[str]]) -> None:
        for window, ids in released.items():
            if ids:
                self.released.labels(window).inc(len(ids))

    def reconciled(self, republished: int, taken_over: int, recovered: int = 0) -> None:
        if republished:
            self.republished.labels("message_gone").inc(republished)
        if taken_over:
            self.republished.labels("lease_expired").inc(taken_over)
        if recovered:
            self.republished.labels("taken_unclaimed").inc(recovered)


def exposition_registry(multiprocess_dir: Path | None, cluster: ClusterCollector | None
                        ) -> Any:
    """A registry that sums the multiprocess files and/or reads the cluster's state."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        MultiProcessCollector(registry, path=str(multiprocess_dir))
    if cluster is not None:
        registry.register(cluster)
    return registry


def serve(port: int, *, multiprocess_dir: Path | None = None,
          cluster: ClusterCollector | None = None, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server.

    Raises:
        ConfigurationError: the port cannot be bound.
    """
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(
            port, addr=addr, registry=exposition_registry(multiprocess_dir, cluster))
    except OSError as e:
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {e}") from e
    log.info("serving Prometheus metrics on %s:%d", addr, port)
    return server
