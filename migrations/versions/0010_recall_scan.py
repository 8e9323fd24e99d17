"""Recall keeps scanning the HNSW index until it finds the conversation's (or the
user's) own turns.

An HNSW index scan returns the nearest turns of *all* conversations (40 by
default) and the filter then keeps this conversation's: once the table holds
many other turns, that can leave none. pgvector 0.8's iterative scan goes on
until enough rows pass the filter, in exact distance order.

A later migration that replaces ``kontext_admit_batch`` must set this again.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTION = "kontext_admit_batch(uuid[], text[], int, int, interval)"


def upgrade() -> None:
    op.execute(f"ALTER FUNCTION {FUNCTION} SET hnsw.iterative_scan = strict_order")


def downgrade() -> None:
    op.execute(f"ALTER FUNCTION {FUNCTION} RESET hnsw.iterative_scan")
