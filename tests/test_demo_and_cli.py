"""The README's first command, and the admin CLI, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import Client
from orchestrator.db.migrate import head_revision

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.e2e
def test_demo_runs_the_whole_system_on_the_embedded_default_and_cleans_up(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    done = _cli("demo", env={"ORCH_STATE_DIR": str(state), "COLUMNS": "120"}, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every job ended as expected" in done.stdout
    assert "micro-batching" in done.stdout and "6000/6000 items" in done.stdout
    for tier in ("interactive", "nearline", "offline"):
        assert tier in done.stdout
    assert (state / "orchestrator.db").exists()
    # The private Redis was stopped by the last process that used it.
    assert not (state / "redis.sock").exists()
    listed = _cli("jobs", "list", "--json", "--limit", "500", env={"ORCH_STATE_DIR": str(state)})
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    # Every submitted job, the bulk score job's six chunks, and the window step's index job
    # (one chunk) and search.
    assert len(jobs) == 208 + 6 + 3
    assert "released by the scheduler" in done.stdout and "interactive search" in done.stdout
    assert {j["tenant"] for j in jobs} == {"acme", "globex", "initech"}


def _env_for(client: Client) -> dict[str, str]:
    return client.settings.to_env()


def test_jobs_list_and_show_report_state_attempts_and_cost_columns(client: Client) -> None:
    from orchestrator.services import Services
    from workers.runtime import Runtime

    handle = client.submit("burn", {"ms": 5, "fail_attempts": 1}, tenant="acme")
    other = client.submit("echo", {"x": 1}, tenant="globex", tier="offline")
    runtime = Runtime(Services.open(client.settings), worker="cli-test")
    try:
        runtime.execute(handle.id)
        runtime.execute(handle.id)
    finally:
        runtime.close()
    env = _env_for(client)
    shown = _cli("jobs", "show", handle.id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "succeeded" and data["attempts"] == 2
    assert [a["outcome"] for a in data["attempt_log"]] == ["retry", "succeeded"]
    for column in ("queue_seconds", "cpu_seconds", "wall_seconds", "items", "cost"):
        assert column in data
    human = _cli("jobs", "show", handle.id, env={**env, "COLUMNS": "200"})
    assert human.returncode == 0 and "attempts" in human.stdout and "retry" in human.stdout
    listed = _cli("jobs", "list", "--tenant", "globex", "--json", env=env)
    assert [j["id"] for j in json.loads(listed.stdout)] == [other.id]
    queued = _cli("jobs", "list", "--state", "queued", "--tier", "offline", "--json", env=env)
    assert [j["id"] for j in json.loads(queued.stdout)] == [other.id]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # output, not storage
def test_cli_errors_are_one_line_and_exit_non_zero(client: Client) -> None:
    env = _env_for(client)
    missing = _cli("jobs", "show", "nope", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no job with id 'nope'"
    bad_state = _cli("jobs", "list", "--state", "sleeping", env=env)
    assert bad_state.returncode == 1 and "unknown state 'sleeping'" in bad_state.stderr
    bad_tier = _cli("worker", "--tiers", "interactive,urgent", env=env)
    assert bad_tier.returncode == 1 and "unknown tier 'urgent'" in bad_tier.stderr
    unknown = _cli("frobnicate", env=env)
    assert unknown.returncode == 2 and "No such command 'frobnicate'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad_setting = _cli("jobs", "list", env={**env, "ORCH_TIER_OFFLINE_LEASE": "3"})
    assert bad_setting.returncode == 1 and "unknown setting ORCH_TIER_OFFLINE_LEASE" in (
        bad_setting.stderr)


def test_a_worker_on_an_unmigrated_database_refuses_to_start(
    tmp_path: Path, redis_url: str
) -> None:
    # It said "ready", took the queue's messages, failed each with "worker process was not
    # initialised" and acknowledged it: its jobs waited in the database with nothing to send
    # them again.
    env = {"ORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
           "ORCH_BROKER_URL": redis_url, "ORCH_STATE_DIR": str(tmp_path)}
    done = _cli("worker", "--tiers", "interactive", "--concurrency", "1", env=env, timeout=60)
    assert done.returncode == 1 and "run `orchestrator db upgrade`" in done.stderr
    assert "ready" not in done.stderr + done.stdout


def test_db_upgrade_migrates_a_new_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    done = _cli("db", "upgrade", env={"ORCH_DATABASE_URL": url,
                                      "ORCH_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert f"revision {head_revision()}" in done.stdout
    current = _cli("db", "current", env={"ORCH_DATABASE_URL": url,
                                         "ORCH_STATE_DIR": str(tmp_path)})
    assert f"current: {head_revision()}" in current.stdout
