"""Tenants and API keys in Postgres: create, list, revoke, verify.

A key is ``kx_<8 hex>_<secret>``: the ``kx_<8 hex>`` prefix is shown in listings
and names the key for ``revoke``; only the SHA-256 of the whole key is stored
(the secret has 256 bits of entropy, so a plain hash is enough; nothing can
recover the key from the database, and it is printed once, at creation).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

KEY_PATTERN = re.compile(r"^(kx_[0-9a-f]{8})_[A-Za-z0-9_-]{43}$")
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DEFAULT_TENANT = "default"
REVOKED_CHANNEL = "kontext_key_revoked"
"""Postgres NOTIFY channel: the prefix of a key just revoked (API caches drop it)."""


class KeyRefused(Exception):
    """A key operation that cannot be done (unknown tenant name format, unknown prefix)."""


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``key`` is the only time the plaintext exists."""

    id: uuid.UUID
    tenant_id: str
    prefix: str
    key: str
    operator: bool


@dataclass(frozen=True)
class KeyRow:
    id: uuid.UUID
    tenant_id: str
    prefix: str
    operator: bool
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class VerifiedKey:
    """What a valid, unrevoked key stands for."""

    key_id: uuid.UUID
    tenant_id: str
    prefix: str
    operator: bool


def digest(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate() -> tuple[str, str]:
    """A new ``(prefix, key)``."""
    prefix = f"kx_{secrets.token_hex(4)}"
    return prefix, f"{prefix}_{secrets.token_urlsafe(32)}"


def valid_tenant(name: str) -> bool:
    return re.fullmatch(TENANT_PATTERN, name) is not None


async def create(
    conn: asyncpg.Connection | asyncpg.Pool, tenant: str, *, operator: bool = False
) -> NewKey:
    """Create a key for ``tenant`` (the tenant too, if it is new)."""
    if not valid_tenant(tenant):
        raise KeyRefused(f"invalid tenant name {tenant!r}: letters, digits, '.', '_', '-'")
    while True:
        prefix, key = generate()
        key_id = uuid.uuid4()
        row = await conn.fetchrow(
            """
            WITH tenant AS (
                INSERT INTO tenants (id, name) VALUES ($2, $2) ON CONFLICT (id) DO NOTHING
            )
            INSERT INTO api_keys (id, tenant_id, prefix, hash, operator)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (prefix) DO NOTHING
            RETURNING id
            """,
            key_id,
            tenant,
            prefix,
            digest(key),
            operator,
        )
        if row is not None:  # else a prefix collision (1 in 4 billion): draw again
            return NewKey(id=key_id, tenant_id=tenant, prefix=prefix, key=key, operator=operator)


async def list_keys(conn: asyncpg.Connection | asyncpg.Pool) -> list[KeyRow]:
    rows = await conn.fetch(
        "SELECT id, tenant_id, prefix, operator, created_at, revoked_at FROM api_keys "
        "ORDER BY tenant_id, created_at"
    )
    return [KeyRow(**dict(row)) for row in rows]


async def revoke(conn: asyncpg.Connection | asyncpg.Pool, prefix: str) -> KeyRow | None:
    """Revoke the key with ``prefix`` (idempotent); None when there is none.

    Notifies ``kontext_key_revoked`` so every API process drops the key at once.
    """
    row = await conn.fetchrow(
        """
        WITH revoked AS (
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE prefix = $1
            RETURNING id, tenant_id, prefix, operator, created_at, revoked_at
        )
        SELECT revoked.*, pg_notify($2, $1) IS NULL AS notified FROM revoked
        """,
        prefix,
        REVOKED_CHANNEL,
    )
    if row is None:
        return None
    found = dict(row)
    found.pop("notified")
    return KeyRow(**found)


async def verify(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> VerifiedKey | None:
    """The key's tenant and rights, or None for a malformed, unknown or revoked key."""
    if KEY_PATTERN.fullmatch(key) is None:
        return None
    row = await conn.fetchrow(
        "SELECT id, tenant_id, prefix, operator FROM api_keys "
        "WHERE hash = $1 AND revoked_at IS NULL",
        digest(key),
    )
    if row is None:
        return None
    return VerifiedKey(
        key_id=row["id"], tenant_id=row["tenant_id"], prefix=row["prefix"], operator=row["operator"]
    )


async def mint(dsn: str, tenant: str = DEFAULT_TENANT, *, operator: bool = False) -> str:
    """A new key for ``tenant`` (the plaintext; only its hash is stored)."""
    conn = await asyncpg.connect(dsn)
    try:
        return (await create(conn, tenant, operator=operator)).key
    finally:
        await conn.close()
