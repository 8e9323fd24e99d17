"""``kontext webhooks list|redeliver``: inspect and redeliver webhook deliveries."""

from __future__ import annotations

import asyncio
from typing import Annotated, cast
from uuid import UUID

import typer

from kontext import stackfile
from kontext.app.process import console

app = typer.Typer(help="Webhook deliveries: list them, redeliver one.")


@app.command("list")
def webhooks_list(
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
    job_id: Annotated[str | None, typer.Option("--job-id")] = None,
    limit: int = 20,
) -> None:
    """Print recent deliveries as JSON lines, with their attempts."""
    from kontext.connections import create_pool
    from kontext.store import deliveries
    from schemas.webhooks import DeliveryStatus

    settings = stackfile.database_settings()
    if status not in (None, "pending", "delivered", "dead"):
        console.print(f"[red]unknown status {status!r}")
        raise typer.Exit(2)

    async def main() -> None:
        pool = await create_pool(settings, max_size=1)
        try:
            found = await deliveries.find(
                pool,
                status=cast(DeliveryStatus | None, status),
                job_id=UUID(job_id) if job_id else None,
                limit=limit,
            )
        finally:
            await pool.close()
        for delivery in found:
            print(delivery.model_dump_json())

    asyncio.run(main())


@app.command("redeliver")
def webhooks_redeliver(
    delivery_id: Annotated[str, typer.Argument(help="The delivery id.")],
) -> None:
    """Queue a delivery for an attempt now, with a fresh retry schedule (even when dead)."""
    from kontext.connections import create_pool
    from kontext.store import deliveries

    settings = stackfile.database_settings()
    try:
        wanted = UUID(delivery_id)
    except ValueError:
        console.print(f"[red]not a delivery id: {delivery_id!r}")
        raise typer.Exit(2) from None

    async def main() -> deliveries.Redelivery:
        pool = await create_pool(settings, max_size=1)
        try:
            return await deliveries.redeliver(pool, wanted)
        finally:
            await pool.close()

    outcome = asyncio.run(main())
    if outcome is deliveries.Redelivery.MISSING:
        console.print(f"[red]no webhook delivery {wanted}")
        raise typer.Exit(1)
    if outcome is deliveries.Redelivery.IN_FLIGHT:
        console.print(f"[yellow]an attempt of {wanted} is in flight; try again shortly")
        raise typer.Exit(1)
    console.print(f"delivery {wanted} queued for redelivery")
