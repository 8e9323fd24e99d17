"""Tenants' webhook endpoints in Postgres: register, list, remove.

Each endpoint gets its own ``whsec_`` secret at registration, shown once; its
deliveries are signed with it alone. Deliveries are made by the webhooks
service (see ``kontext.store.deliveries``).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from uuid import UUID, uuid4

import asyncpg

from schemas.webhooks import EndpointView, EventPattern

_VIEW = "id, url, events, description, created_at"


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 24 bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def register(
    pool: asyncpg.Pool,
    tenant_id: str,
    url: str,
    events: Sequence[EventPattern],
    description: str | None,
) -> EndpointView:
    secret = new_secret()
    row = await pool.fetchrow(
        f"""
        INSERT INTO webhook_endpoints (id, tenant_id, url, secret, events, description)
        VALUES ($1, $2, $3, $4, $5, $6)
        RETURNING {_VIEW}
        """,
        uuid4(),
        tenant_id,
        url,
        secret,
        sorted(set(events)),
        description,
    )
    assert row is not None
    return EndpointView(**dict(row), secret=secret)


async def find(pool: asyncpg.Pool, tenant_id: str) -> list[EndpointView]:
    rows = await pool.fetch(
        f"SELECT {_VIEW} FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY created_at",
        tenant_id,
    )
    return [EndpointView(**dict(row)) for row in rows]


async def remove(pool: asyncpg.Pool, tenant_id: str, endpoint_id: UUID) -> bool:
    """Remove an endpoint of the tenant (its pending deliveries go with it)."""
    removed = await pool.fetchval(
        "DELETE FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2 RETURNING id",
        endpoint_id,
        tenant_id,
    )
    return removed is not None
