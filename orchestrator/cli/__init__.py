"""The admin CLI: a thin Typer shell over functions in ``orchestrator``."""
