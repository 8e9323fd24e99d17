"""Following a Postgres NOTIFY channel from one long-lived connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)

RECONNECT_S = 1.0

Notified = Callable[[asyncpg.Connection, int, str, str], None]


async def listen_forever(
    dsn: str, channel: str, notified: Notified, connected: Callable[[], None], what: str
) -> None:
    """Call ``notified`` for each notification on ``channel``, for ever, reconnecting
    after a lost connection; ``connected`` runs after each (re)connection, since what
    was notified while no one listened is lost."""
    while True:
        try:
            conn = await asyncpg.connect(dsn)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(channel, notified)
                connected()
                await lost.wait()
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s listener failed (%s); reconnecting", what, exc)
        await asyncio.sleep(RECONNECT_S)
