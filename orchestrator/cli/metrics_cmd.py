"""``orchestrator metrics``: the deployment's Prometheus exporter (queue depth, slots, sheds,
jobs per state), for Prometheus to scrape next to the workers' own ``--metrics-port``."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from orchestrator.metrics import ClusterCollector, exposition_registry, serve
from orchestrator.services import Services
from orchestrator.settings import Settings

app = typer.Typer(help="Prometheus metrics of the deployment.", no_args_is_help=True)


def _cluster(settings: Settings) -> tuple[Services, ClusterCollector]:
    services = Services.open(settings)  # attaches the embedded Redis when it is the broker
    return services, ClusterCollector(settings, services.engine, services.redis)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(9101, "--port", min=1, max=65535),
    addr: str = typer.Option("0.0.0.0", "--addr", help="address to listen on"),
    multiprocess_dir: Path = typer.Option(
        None, "--multiprocess-dir", file_okay=False,
        help="also sum this prometheus_client multiprocess directory (e.g. a scheduler's)"),
) -> None:
    """Serve /metrics until stopped: deployment-wide gauges read at each scrape."""
    services, cluster = _cluster(Settings.from_env())
    server = serve(port, addr=addr, multiprocess_dir=multiprocess_dir, cluster=cluster)
    typer.echo(f"serving metrics on http://{addr}:{port}/metrics")
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
        services.close()


@app.command("dump")
def dump() -> None:
    """Print the deployment-wide metrics once, in the Prometheus text format."""
    from prometheus_client import generate_latest

    services, cluster = _cluster(Settings.from_env())
    try:
        typer.echo(generate_latest(exposition_registry(None, cluster)).decode(), nl=False)
    finally:
        services.close()
