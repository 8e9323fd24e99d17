"""Background pacing: background work gives way while interactive jobs arrive, and runs
flat out again once they stop."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.conftest import wait_for
from workers.embeddings import DIMENSIONS, MiniLMEmbedder
from workers.pacing import Pacer
from workers.priority_gate import PriorityGate


def test_a_backfill_alone_is_never_paused() -> None:
    pacer = Pacer(share=0.25, window_s=60)
    pacer.ran_background(100)
    assert pacer.background_may_start()
    pacer.saw_interactive()  # an interactive job arrives: the pause now applies
    assert not pacer.background_may_start()


def test_pacing_off_never_pauses() -> None:
    for pacer in (Pacer(share=1, window_s=60), Pacer(share=0.25, window_s=0)):
        pacer.saw_interactive()
        pacer.ran_background(100)
        assert pacer.background_may_start()
    with pytest.raises(ValueError):
        Pacer(share=0, window_s=1)


def test_an_interactive_job_counts_as_arriving_until_its_batch_ends() -> None:
    """A job that waits longer than the window (a long engine call) still holds
    background work back; the window runs again from its batch's end."""
    pacer = Pacer(share=0.25, window_s=2)
    later = time.monotonic() + 60  # well past any window
    pacer.interactive_began()
    assert pacer.interactive_active(later)
    pacer.interactive_ended()
    assert pacer.interactive_active() and not pacer.interactive_active(later)


async def test_background_resumes_when_its_pause_ends() -> None:
    pacer = Pacer(share=0.5, window_s=60)
    pacer.saw_interactive()
    pacer.ran_background(0.2)  # a pause as long as the work: 0.2 s
    assert not pacer.background_may_start()
    await asyncio.wait_for(pacer.wait_for_background(), timeout=10)
    assert pacer.background_may_start()


async def test_background_resumes_once_interactive_jobs_stop_arriving() -> None:
    pacer = Pacer(share=0.25, window_s=0.3)
    pacer.saw_interactive()
    pacer.ran_background(100)  # a 300 s pause, cut short when the window closes
    assert not pacer.background_may_start()
    await asyncio.wait_for(pacer.wait_for_background(), timeout=10)
    assert not pacer.interactive_active()


async def test_the_gate_paces_background_turns_but_never_interactive_ones() -> None:
    pacer = Pacer(share=0.25, window_s=60)
    gate = PriorityGate(pacer)
    async with gate.turn(background=False):  # an interactive call: opens the window
        pass
    async with gate.turn(background=True):
        await asyncio.sleep(0.1)  # a background call that ran 0.1 s: paused 0.3 s after
    assert not pacer.background_may_start()
    order: list[str] = []

    async def call(name: str, background: bool) -> None:
        async with gate.turn(background):
            order.append(name)

    backfill = asyncio.create_task(call("backfill", True))
    await asyncio.wait_for(call("interactive", False), timeout=5)
    assert order == ["interactive"]  # the gate was free, yet the backfill waited
    await asyncio.wait_for(backfill, timeout=10)
    assert order == ["interactive", "backfill"]


async def test_a_paced_background_embedding_lets_interactive_calls_cut_in() -> None:
    """While interactive calls arrive, a long background call runs in short paced turns:
    an interactive call made during it finishes first, and the vectors are the same."""
    pacer = Pacer(share=0.5, window_s=60)
    embedder = MiniLMEmbedder(pacer=pacer, paced_chunk=4)
    texts = [f"Backfill line {i} about the weather in town {i}." for i in range(40)]
    whole = embedder.embed_sync(texts)
    await embedder.embed(["an interactive question"])  # interactive calls are arriving
    finished: list[str] = []

    async def call(name: str, items: list[str], background: bool) -> np.ndarray:
        vectors = await embedder.embed(items, background)
        finished.append(name)
        return vectors

    async with embedder._gate.turn(background=False):  # hold the model a moment
        backfill = asyncio.create_task(call("backfill", texts, True))
        await wait_for(lambda: embedder._gate.waiting(background=True) == 1, timeout=10)
    # The backfill has the model now; an interactive call comes during its call.
    asked = await asyncio.wait_for(call("interactive", ["what is the weather?"], False), 30)
    paced = await asyncio.wait_for(backfill, timeout=60)
    assert finished == ["interactive", "backfill"]
    assert asked.shape == (1, DIMENSIONS)
    np.testing.assert_allclose(paced, whole, atol=1e-5)


async def test_off_path_work_yields_but_is_not_paced() -> None:
    """The recorder's memory embeddings go after waiting interactive calls, but a
    paused backfill does not hold them up (the recorder waits on them)."""
    pacer = Pacer(share=0.25, window_s=60)
    gate = PriorityGate(pacer)
    pacer.saw_interactive()
    pacer.ran_background(100)  # a 300 s pause of the background lane
    async with asyncio.timeout(5):
        async with gate.turn(background=True, paced=False):
            pass


def test_pauses_are_counted_only_while_they_hold_background_work_back() -> None:
    def paused() -> float:
        return REGISTRY.get_sample_value("kontext_background_paused_seconds_total") or 0.0

    pacer = Pacer(share=0.5, window_s=60)
    before = paused()
    pacer.ran_background(3)  # no interactive job yet: nothing held back
    assert paused() == before
    pacer.saw_interactive()
    pacer.ran_background(10)  # a 10 s pause from now: 7 s more than the first one
    assert 6.5 < paused() - before < 7.5
