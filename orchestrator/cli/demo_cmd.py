"""``orchestrator demo``."""

from __future__ import annotations


def demo() -> None:
    """Run the whole system on the embedded default and print a summary."""
    import typer

    from orchestrator.demo import run_demo

    raise typer.Exit(run_demo())
