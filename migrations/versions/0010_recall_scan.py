"""Recall searches exactly within its scope: the conversation's (or the user's) own
turns, nearest first.

Ordered by ``embedding <=> query`` the planner walks the HNSW index over *all*
turns and filters afterwards: once the table holds many other conversations'
turns, the nearest ones found are someone else's and the scope's own are
missed (a large backfill did this). A conversation's or a user's turns are few
and indexed by conversation, so an exact search among them is cheap: the
ordering expression is written so the index cannot serve it.

A later migration that replaces ``kontext_admit_batch`` must keep this.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from migrations import admit_batch

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXED = "ORDER BY tt.embedding <=> c.query LIMIT recall_k"
EXACT = "ORDER BY (tt.embedding <=> c.query) + 0 LIMIT recall_k  -- exact, in scope (0010)"


def upgrade() -> None:
    admit_batch.replace(INDEXED, EXACT)


def downgrade() -> None:
    admit_batch.replace(EXACT, INDEXED)
