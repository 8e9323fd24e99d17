"""The migrations build exactly the schema that schemas/tables.py describes."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from kontext.app.embedded import EmbeddedPostgres
from kontext.migrate import upgrade
from schemas.tables import metadata
from tests.conftest import own_database


async def test_migrated_database_matches_the_table_definitions(database: EmbeddedPostgres) -> None:
    url = await own_database(database)
    await asyncio.to_thread(upgrade, url)  # applying twice is a no-op

    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
            extensions = await conn.exec_driver_sql("SELECT extname FROM pg_extension")
            names = {row[0] for row in extensions}
    finally:
        await engine.dispose()
    assert diff == []
    assert "vector" in names
