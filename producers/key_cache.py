"""Verified API keys, cached in-process; every intake (the HTTP API, the submissions
gateway) checks keys through one.

A key found valid is kept for ``KONTEXT_AUTH_CACHE_TTL_S`` (default 5 s), so a
steady client costs no database round trip per request. Revocation is pushed:
``kontext keys revoke`` notifies ``kontext_key_revoked`` and every cache drops the
key at once; the TTL bounds staleness only while that listening connection is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

import asyncpg

from kontext.listen import listen_forever
from kontext.store import keys

CACHE_MAX = 10_000


class KeyCache:
    """Verified keys by digest, for ``ttl_s``; revocations arrive by LISTEN/NOTIFY."""

    def __init__(self, dsn: str, ttl_s: float) -> None:
        self.dsn = dsn
        self.ttl_s = ttl_s
        self._found: OrderedDict[str, tuple[float, keys.VerifiedKey]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        listening = listen_forever(
            self.dsn, keys.REVOKED_CHANNEL, self._notified, self.drop, "key revocation"
        )
        self._task = asyncio.create_task(listening, name="key-revocations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def verify(self, pool: asyncpg.Pool, key: str) -> keys.VerifiedKey | None:
        digest = keys.digest(key)
        now = time.monotonic()
        hit = self._found.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await keys.verify(pool, key)
        if found is None:
            self._found.pop(digest, None)
            return None
        self._found[digest] = (now + self.ttl_s, found)
        self._found.move_to_end(digest)
        while len(self._found) > CACHE_MAX:
            self._found.popitem(last=False)
        return found

    def drop(self, prefix: str | None = None) -> None:
        """Forget the key with ``prefix`` (every key when None)."""
        if prefix is None:
            self._found.clear()
            return
        for digest, (_, found) in list(self._found.items()):
            if found.prefix == prefix:
                del self._found[digest]

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.drop(payload)
