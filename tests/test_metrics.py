"""Prometheus metrics: real jobs through a real prefork worker, scraped over HTTP."""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import Client
from orchestrator.admission import SHEDS_KEY
from orchestrator.local import LocalWorker
from orchestrator.metrics import ClusterCollector, exposition_registry
from orchestrator.settings import Settings

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_prefork_worker_exposes_the_sum_of_its_pool_processes_metrics(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    port = _free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999.db").write_bytes(b"stale")  # a previous run's: emptied
    worker = LocalWorker(settings, tiers="interactive,nearline,offline", concurrency=2,
                         name=f"m-{uuid.uuid4().hex[:6]}@test", log=tmp_path / "worker.log",
                         args=["--metrics-port", str(port), "--metrics-dir", str(metrics_dir)])
    try:
        worker.wait_ready()
        assert not (metrics_dir / "counter_99999.db").exists()
        # 200 ms each: long enough that both pool processes take some, however busy the machine
        burns = [client.submit("burn", {"ms": 200}, tenant="acme", tier="nearline")
                 for _ in range(6)]
        flaky = client.submit("burn", {"ms": 1, "fail_attempts": 1}, tenant="globex",
                              tier="interactive")
        texts = [client.submit("upper", {"texts": [f"t{i}"]}, tenant="acme") for i in range(4)]
        done = client.wait([*burns, flaky, *texts], timeout=60)
        assert all(j.state == "succeeded" for j in done)
        deadline = time.monotonic() + 10
        while True:  # the HTTP server reads the files the pool processes wrote
            samples = _samples(_scrape(port))
            key = ("orch_jobs_finished_total", frozenset(
                {"tier": "nearline", "kind": "burn", "outcome": "succeeded"}.items()))
            if samples.get(key) == 6 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        worker.stop()
    pids = {p.name.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
    assert len(pids) == 2, "each pool process writes its own file"

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("orch_jobs_finished_total", tier="nearline", kind="burn",
                 outcome="succeeded") == 6
    assert value("orch_jobs_finished_total", tier="interactive", kind="burn",
                 outcome="retry") == 1
    assert value("orch_retries_total", tier="interactive", kind="burn") == 1
    assert value("orch_jobs_finished_total", tier="nearline", kind="upper",
                 outcome="succeeded") == 4
    waits = value("orch_queue_wait_seconds_count", tier="nearline")
    assert waits == 6 + 4
    batches = value("orch_batch_size_count", tier="nearline", kind="upper")
    assert 1 <= batches <= 4
    assert value("orch_batch_size_sum", tier="nearline", kind="upper") == 4
    assert value("orch_cpu_seconds_total", tier="nearline") >= 6 * 0.02
    costs = {j.id: j.cost for j in done}
    acme = sum((c for j, c in costs.items() if client.get(j).tenant == "acme"), Decimal(0))
    assert acme > 0
    assert value("orch_cost_total", tenant="acme", tier="nearline") == pytest.approx(
        float(acme), rel=1e-9, abs=1e-12)


def test_the_cluster_exporter_reads_queue_depth_sheds_and_jobs_per_state(
    settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    for i in range(3):
        client.submit("burn", {"ms": 1}, tier="offline", idempotency_key=f"k{i}")
    redis_client.hincrby(SHEDS_KEY, "interactive:queue_wait_objective", 2)
    from prometheus_client import generate_latest

    engine = client.services.engine
    text = generate_latest(exposition_registry(
        None, ClusterCollector(settings, engine, client.services.redis))).decode()
    samples = _samples(text)
    assert samples[("orch_queue_depth", frozenset({"tier": "offline"}.items()))] == 3
    assert samples[("orch_queue_depth", frozenset({"tier": "interactive"}.items()))] == 0
    assert samples[("orch_jobs", frozenset({"tier": "offline", "state": "queued"}.items()))] == 3
    assert samples[("orch_sheds_total", frozenset(
        {"tier": "interactive", "reason": "queue_wait_objective"}.items()))] == 2


def test_the_scheduler_counts_releases_and_reconciler_republishes(
    settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    """``orchestrator scheduler --metrics-port`` serves these counters; here read directly."""
    import threading
    from datetime import timedelta

    from prometheus_client import generate_latest

    from orchestrator.db.store import utcnow
    from orchestrator.metrics import SchedulerMetrics
    from orchestrator.scheduler.process import SchedulerProcess
    from orchestrator.window_catalog import WindowCatalog
    from orchestrator.windows import WindowSpec

    now = utcnow()
    WindowCatalog(client.services.engine, settings).add(WindowSpec.build(
        "soon", starts_at=now + timedelta(seconds=1), ends_at=now + timedelta(minutes=5)))
    deferred = client.submit("echo", {"n": 1}, tier="offline", window="soon")
    lost = client.submit("echo", {"n": 2}, tier="offline", window=None)
    redis_client.flushdb()  # the queued job's message is gone
    process = SchedulerProcess(settings.model_copy(update={
        "scheduler_tick_s": 0.2, "reconcile_interval_s": 0.5, "reconcile_grace_s": 0.0}),
        holder="metrics-test")
    process.metrics = SchedulerMetrics()
    stop = threading.Event()
    thread = threading.Thread(target=process.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            samples = _samples(generate_latest(process.metrics.registry).decode())
            released = samples.get(("orch_window_released_total",
                                    frozenset({"window": "soon"}.items())), 0)
            republished = samples.get(("orch_reconciler_republished_total",
                                       frozenset({"reason": "message_gone"}.items())), 0)
            if (released and republished) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert samples[("orch_scheduler_acting", frozenset())] == 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert released == 1, "the deferred job was released once when its window opened"
    assert republished == 1, "the job whose message was flushed was re-published once"
    assert client.get(deferred.id).state == "queued"
    assert client.get(lost.id).state == "queued"
