"""Apply the Alembic migrations in migrations/ to a database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import migrations

if TYPE_CHECKING:
    from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config  # imported when migrating: a worker's start skips it

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (blocking; run it off the event loop)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)
