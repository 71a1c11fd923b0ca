"""``orchestrator metrics``: the deployment's Prometheus exporter (queue depth, slots, sheds,
jobs per state), for Prometheus to scrape next to the workers' own ``--metrics-port``."""

from __future__ import annotations

import threading
from pathlib import Path

import redis
import typer

from orchestrator.errors import ServiceUnavailable
from orchestrator.metrics import ClusterCollector, exposition_registry, serve
from orchestrator.services import open_database
from orchestrator.settings import Settings

app = typer.Typer(help="Prometheus metrics of the deployment.", no_args_is_help=True)


def _cluster(settings: Settings) -> ClusterCollector:
    engine = open_database(settings)
    client = redis.Redis.from_url(settings.redis_url(), socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        engine.dispose()
        raise ServiceUnavailable(f"Redis at {settings.redis_url()} does not answer: {e}") from e
    return ClusterCollector(settings, engine, client)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(9101, "--port", min=1, max=65535),
    addr: str = typer.Option("0.0.0.0", "--addr", help="address to listen on"),
    multiprocess_dir: Path = typer.Option(
        None, "--multiprocess-dir", file_okay=False,
        help="also sum this prometheus_client multiprocess directory (e.g. a scheduler's)"),
) -> None:
    """Serve /metrics until stopped: deployment-wide gauges read at each scrape."""
    cluster = _cluster(Settings.from_env())
    server = serve(port, addr=addr, multiprocess_dir=multiprocess_dir, cluster=cluster)
    typer.echo(f"serving metrics on http://{addr}:{port}/metrics")
    try:
        threading.Event().wait()
    finally:
        server.shutdown()


@app.command("dump")
def dump() -> None:
    """Print the deployment-wide metrics once, in the Prometheus text format."""
    from prometheus_client import generate_latest

    cluster = _cluster(Settings.from_env())
    try:
        typer.echo(generate_latest(exposition_registry(None, cluster)).decode(), nl=False)
    finally:
        cluster.redis.close()
        cluster.engine.dispose()
