"""Bearer-key authentication: who is calling, for which tenant.

Every route but ``/healthz`` takes ``principal: Annotated[Principal, Depends(authenticate)]``
(or ``Depends(operator_only)`` for operator routes). A missing, malformed,
unknown or revoked key answers 401 ``{"error": {"code": "unauthorized", ...}}``.

Verified keys are cached in-process for ``KONTEXT_AUTH_CACHE_TTL_S`` (default 5 s),
so a steady client costs no database round trip per request. Revocation is
pushed: ``kontext keys revoke`` notifies ``kontext_key_revoked`` and every API
process drops the key at once; the TTL bounds staleness only while that
listening connection is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated
from uuid import UUID

import asyncpg
from fastapi import Depends, HTTPException, Request

from kontext.listen import listen_forever
from kontext.store import keys
from producers.api.state import ApiState, state

log = logging.getLogger(__name__)

CACHE_MAX = 10_000
CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    """The caller: its tenant, the key it used, and whether it may act for every tenant."""

    tenant_id: str
    key_id: UUID
    operator: bool = False

    def tenant_for(self, requested: str | None) -> str:
        """The tenant to read: the caller's own, or (operators only) ``requested``."""
        if requested is None or requested == self.tenant_id:
            return self.tenant_id
        if not self.operator:
            raise HTTPException(403, "only an operator key may read another tenant")
        return requested


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


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers=CHALLENGE)


async def authenticate(request: Request, api: Annotated[ApiState, Depends(state)]) -> Principal:
    """The caller of this request, from ``Authorization: Bearer <key>``; 401 otherwise."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    cache: KeyCache = request.app.state.keys
    found = await cache.verify(api.pool, key.strip())
    if found is None:
        raise _unauthorized("invalid or revoked API key")
    return Principal(tenant_id=found.tenant_id, key_id=found.key_id, operator=found.operator)


async def operator_only(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Like ``authenticate``, and 403 unless the key is an operator key."""
    if not principal.operator:
        raise HTTPException(403, "this endpoint needs an operator key")
    return principal


Caller = Annotated[Principal, Depends(authenticate)]
"""Shorthand for a route parameter: ``principal: Caller``."""
Operator = Annotated[Principal, Depends(operator_only)]
