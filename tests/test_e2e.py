"""End to end: real worker processes on the real broker and database."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import Client, JobFailed
from orchestrator.settings import Settings
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.e2e


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_jobs_run_through_a_worker_and_results_come_back(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=2)
    # A burst of 30 on a busy machine can exceed the interactive wait objective and be shed
    # (tests/test_admission.py proves that); this test is about running them, so no objective.
    relaxed = {**settings.to_env(), "ORCH_TIER_INTERACTIVE_QUEUE_WAIT_OBJECTIVE_S": "0"}
    client = Client.from_settings(Settings.from_env(relaxed))
    handles = [client.submit("echo", {"i": i}, tenant=f"t{i % 3}") for i in range(30)]
    burn = client.submit("burn", {"ms": 20}, tier="offline")
    done = client.wait([*handles, burn], timeout=60)
    assert [j.state for j in done] == ["succeeded"] * 31
    assert [j.result for j in done[:30]] == [{"i": i} for i in range(30)]
    assert burn.result(timeout=1)["ms"] == 20
    assert done[-1].cpu_seconds >= 0.015
    client.close()


def test_one_slot_serves_every_interactive_job_before_nearline_before_offline(
    client: Client, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    out = tmp_path / "order.txt"
    handles = []
    # Submitted worst tier first, so arrival order is the opposite of the tier order.
    for tier in ("offline", "nearline", "interactive"):
        for i in range(6):
            handles.append(client.submit("record", {"path": str(out), "label": f"{tier}-{i}"},
                                         tier=tier))
    start_worker(concurrency=1)
    client.wait(handles, timeout=60)
    ran = [label.rsplit("-", 1)[0] for label, *_ in _lines(out)]
    assert ran == ["interactive"] * 6 + ["nearline"] * 6 + ["offline"] * 6
    # Within a tier, first in first out.
    labels = [label for label, *_ in _lines(out)]
    assert labels[:6] == [f"interactive-{i}" for i in range(6)]


def test_worker_serving_only_offline_leaves_interactive_work_alone(
    client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(tiers="offline", concurrency=1)
    offline = client.submit("echo", {"t": "offline"}, tier="offline")
    interactive = client.submit("echo", {"t": "interactive"})
    assert offline.result(timeout=30) == {"t": "offline"}
    time.sleep(0.5)
    assert interactive.status() == "queued"


def test_retry_then_dead_through_a_real_worker(
    client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    flaky = client.submit("burn", {"ms": 1, "fail_attempts": 1}, tier="interactive")
    doomed = client.submit("burn", {"ms": 1, "fail_attempts": 50}, tier="interactive")
    assert flaky.result(timeout=30)["ms"] == 1
    with pytest.raises(JobFailed) as info:
        doomed.result(timeout=30)
    assert info.value.state == "dead"
    assert [a.outcome for a in client.attempts(doomed.id)] == ["retry", "retry", "dead"]


def _running_child(client: Client, job_id: str, worker: WorkerProcess) -> int:
    _wait_for(lambda: client.get(job_id).state == "running", 30, "the job to start")
    [attempt] = client.attempts(job_id)
    pid = int(attempt.worker.rsplit(":", 1)[1])
    assert pid in worker.children()
    return pid


def test_pool_process_killed_mid_task_the_job_finishes_exactly_once(
    client: Client, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    a = start_worker(concurrency=1)
    handle = client.submit("record", {"path": str(out), "label": "x", "sleep_s": 2.0})
    pid = _running_child(client, handle.id, a)
    os.kill(pid, signal.SIGKILL)
    start_worker(concurrency=1)
    assert handle.result(timeout=60) == {"label": "x", "attempt": 2}
    assert [line[:2] for line in _lines(out)] == [["x", "2"]]
    outcomes = [a.outcome for a in client.attempts(handle.id)]
    assert outcomes == ["lost", "succeeded"]


def test_whole_worker_killed_mid_task_another_worker_finishes_it_exactly_once(
    client: Client, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    # Short time limits let the visibility timeout be short, so Redis hands the dead worker's
    # unacknowledged message to the survivor within the test.
    fast = {f"ORCH_TIER_{t}_TIME_LIMIT_S": "4" for t in ("INTERACTIVE", "NEARLINE", "OFFLINE")}
    fast["ORCH_VISIBILITY_TIMEOUT_S"] = "6"
    fast["ORCH_HARD_LIMIT_GRACE_S"] = "1"
    out = tmp_path / "effects.txt"
    a = start_worker(concurrency=1, **fast)
    handle = client.submit("record", {"path": str(out), "label": "y", "sleep_s": 2.0})
    _running_child(client, handle.id, a)
    a.kill()  # before the survivor starts: on a busy machine its start-up outlasts the job
    survivor = start_worker(concurrency=1, **fast)
    assert handle.result(timeout=60) == {"label": "y", "attempt": 2}
    assert [line[:2] for line in _lines(out)] == [["y", "2"]]
    [first, second] = client.attempts(handle.id)
    assert first.outcome == "lost" and second.outcome == "succeeded"
    assert second.worker.startswith(survivor.name + ":")

