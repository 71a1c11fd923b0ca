"""per-tenant quotas (in-flight per tier, rate, burst, monthly budget) and the in-flight index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_inflight", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rate_per_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("burst", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("monthly_budget", sa.Numeric(precision=18, scale=8), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_tenant_tier_state", ["tenant", "tier", "state", "parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_tier_state")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("monthly_budget")
        batch_op.drop_column("burst")
        batch_op.drop_column("rate_per_s")
        batch_op.drop_column("max_inflight")
