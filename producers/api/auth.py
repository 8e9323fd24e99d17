"""Bearer-key authentication: who is calling, for which tenant.

Every route but ``/healthz`` takes ``principal: Annotated[Principal, Depends(authenticate)]``
(or ``Depends(operator_only)`` for operator routes). A missing, malformed,
unknown or revoked key answers 401 ``{"error": {"code": "unauthorized", ...}}``.

Keys are verified through the process's ``producers.key_cache.KeyCache`` (cached,
revocation pushed by LISTEN/NOTIFY), as the submissions gateway verifies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated
from uuid import UUID

from fastapi import Depends, HTTPException, Request

from producers.api.state import ApiState, state
from producers.key_cache import KeyCache

log = logging.getLogger(__name__)

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
