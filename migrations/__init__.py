"""Alembic migrations; run them with ``orchestrator db upgrade``."""
