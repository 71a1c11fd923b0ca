"""jobs: partial indexes, so that finished jobs and plain single jobs stay out of the indexes
that only active, chunked or deferred jobs are looked up by

Every write of a job row outside a HOT update adds an entry to each index whose predicate the
new row version satisfies. A plain job is inserted, claimed and finished: with four indexes
partial, that is 19 index entries per job instead of 27, and the indexes of active jobs stay
the size of the backlog rather than of the history.

On PostgreSQL the new indexes are built ``CONCURRENTLY`` (no write lock on a large table) before
the old ones are dropped.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ACTIVE = "state IN ('deferred', 'queued', 'running')"

#: (old name, new name, columns, predicate of the new index)
CHANGES = [
    ("ix_jobs_state_tier", "ix_jobs_active_state_tier", ["state", "tier"], ACTIVE),
    ("ix_jobs_tenant_tier_state", "ix_jobs_active_tenant_tier_state",
     ["tenant", "tier", "state", "parent_id"], ACTIVE),
    ("ix_jobs_parent_id", "ix_jobs_chunk_parent_id", ["parent_id"], "parent_id IS NOT NULL"),
    ("ix_jobs_state_window", "ix_jobs_deferred_state_window", ["state", "window"],
     '"window" IS NOT NULL'),
]


def _swap(pairs: Sequence[tuple[str, str, list[str], str | None]]) -> None:
    """Create each new index, then drop the old one it replaces."""
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            for old, new, columns, where in pairs:
                cols = ", ".join(f'"{c}"' for c in columns)
                clause = f" WHERE {where}" if where else ""
                # A build that failed (cancelled, timed out) leaves an INVALID index, which
                # IF NOT EXISTS would keep: drop it and build again.
                invalid = op.get_bind().exec_driver_sql(
                    "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    f"WHERE c.relname = '{new}' AND NOT i.indisvalid").first()
                if invalid:
                    op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {new}")
                op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {new} ON jobs ({cols})"
                           f"{clause}")
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {old}")
        return
    for old, new, columns, where in pairs:
        op.create_index(new, "jobs", columns,
                        sqlite_where=sa.text(where) if where else None)
        op.drop_index(old, table_name="jobs")


def upgrade() -> None:
    _swap(CHANGES)


def downgrade() -> None:
    _swap([(new, old, columns, None) for old, new, columns, _ in CHANGES])
