"""The compose stack's config validates, and its monitoring files match the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_config_validates_with_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed")
    done = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_compose_has_every_service_and_each_runs_an_orchestrator_command() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker-interactive",
                             "worker-batch", "scheduler", "metrics", "flower", "prometheus",
                             "grafana"}
    from typer.main import get_command

    from orchestrator.cli.main import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name, service in services.items():
        if service.get("image", "").startswith("tiered-orchestrator"):
            first = service["command"][0]
            assert first in commands or first == "scheduler", (name, first)


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    services = _compose()["services"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for group in job["static_configs"]
               for t in group["targets"]]
    for target in targets:
        host, port = target.split(":")
        command = services[host]["command"]
        assert port in command, (target, command)


def test_the_dashboard_only_uses_documented_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/orchestrator.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs
            for m in re.findall(r"\b(orch_[a-z_]+)", e)}
    documented = set(re.findall(r"`(orch_[a-z_]+)`", (ROOT / "docs/metrics.md").read_text()))
    assert used and used <= documented, used - documented
    source = (ROOT / "orchestrator/metrics.py").read_text()
    for name in documented:
        base = name.removesuffix("_total")
        assert f'"{base}"' in source, name
