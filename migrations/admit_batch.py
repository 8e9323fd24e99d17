"""``kontext_admit_batch`` (the enricher's claim, created in 0003) as migrations patch it:
read its definition and replace one piece of its text."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def definition() -> str:
    """The function's current ``CREATE OR REPLACE`` statement."""
    text = op.get_bind().scalar(
        sa.text("SELECT pg_get_functiondef('kontext_admit_batch'::regproc)")
    )
    assert isinstance(text, str)
    return text


def replace(old: str, new: str) -> None:
    """Redefine the function with its first ``old`` replaced by ``new`` (it must be there)."""
    current = definition()
    assert old in current, "kontext_admit_batch changed"
    op.execute(current.replace(old, new, 1))
