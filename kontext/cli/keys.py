"""``kontext keys create|list|revoke``: manage tenants' API keys in DATABASE_URL
(or the running ``kontext up``'s database)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kontext import stackfile
from kontext.connections import connect
from kontext.store import keys

app = typer.Typer(help="API keys: create one (and its tenant), list them, revoke one.")
err = Console(stderr=True)


@app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="The tenant (created if new).")],
    operator: Annotated[
        bool, typer.Option("--operator", help="The key may read every tenant's data.")
    ] = False,
) -> None:
    """Create a key; it is printed once, alone on the last line of output."""
    settings = stackfile.database_settings()

    async def main() -> keys.NewKey:
        conn = await connect(settings)
        try:
            return await keys.create(conn, tenant, operator=operator)
        finally:
            await conn.close()

    try:
        new = asyncio.run(main())
    except keys.KeyRefused as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    kind = "operator key" if new.operator else "key"
    print(f"created {kind} {new.prefix} for tenant {new.tenant_id}; it is shown only now:")
    print(new.key, flush=True)


@app.command("list")
def list_command() -> None:
    """Every key: prefix, tenant, operator, created, revoked (never the key)."""
    settings = stackfile.database_settings()

    async def main() -> list[keys.KeyRow]:
        conn = await connect(settings)
        try:
            return await keys.list_keys(conn)
        finally:
            await conn.close()

    table = Table("prefix", "tenant", "operator", "created", "revoked")
    for row in asyncio.run(main()):
        table.add_row(
            row.prefix,
            row.tenant_id,
            "yes" if row.operator else "",
            f"{row.created_at:%Y-%m-%d %H:%M:%S}",
            f"{row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "",
        )
    Console(width=120).print(table)


@app.command("revoke")
def revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix (kx_...).")]) -> None:
    """Revoke a key: every API process refuses it at once (401)."""
    settings = stackfile.database_settings()

    async def main() -> keys.KeyRow | None:
        conn = await connect(settings)
        try:
            return await keys.revoke(conn, prefix)
        finally:
            await conn.close()

    row = asyncio.run(main())
    if row is None:
        err.print(f"[red]no key with prefix {prefix!r}")
        raise typer.Exit(1)
    print(f"revoked {row.prefix} (tenant {row.tenant_id})")
