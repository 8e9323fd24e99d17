"""The embedding model's gate: one call at a time, interactive callers first."""

from __future__ import annotations

import asyncio

import pytest

from workers.priority_gate import PriorityGate


async def test_a_waiting_interactive_caller_goes_before_earlier_background_ones() -> None:
    gate = PriorityGate()
    order: list[str] = []
    release = asyncio.Event()

    async def call(name: str, background: bool) -> None:
        async with gate.turn(background):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(call("first", True))
    await asyncio.sleep(0)  # let it take the gate
    waiting = [
        asyncio.create_task(call("backfill-1", True)),
        asyncio.create_task(call("backfill-2", True)),
        asyncio.create_task(call("interactive", False)),
    ]
    await asyncio.sleep(0)
    assert order == ["first"]  # one holder at a time
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "interactive", "backfill-1", "backfill-2"]


async def test_a_cancelled_waiter_never_blocks_the_gate() -> None:
    gate = PriorityGate()
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.turn(True):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)

    async def wait_turn() -> None:
        async with gate.turn(False):
            pass

    cancelled = asyncio.create_task(wait_turn())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await holder
    # The gate is free again: a new caller gets it at once.
    await asyncio.wait_for(wait_turn(), timeout=1)
