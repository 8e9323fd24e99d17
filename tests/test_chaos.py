"""The fast chaos scenario: kill -9 the inference worker mid-batch under load.

Every accepted job is answered exactly once (``make chaos`` runs every scenario).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.chaos import scenarios
from kontext.chaos.cluster import Cluster
from kontext.chaos.load import ReplyTally
from kontext.connections import create_pool

SERVICES = ("api", "enricher", "inference", "recorder", "reconciler")


@pytest.fixture
async def chaos(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> AsyncIterator[scenarios.Chaos]:
    logs = workdir / f"chaos-{uuid.uuid4().hex[:6]}"
    logs.mkdir()
    cluster = Cluster(
        logs,
        lease_s=5,
        prefix=f"c{uuid.uuid4().hex[:8]}",
        services=SERVICES,
        broker=broker,
        database=database,
    )
    try:
        await cluster.start()
        tally = ReplyTally(broker.bootstrap_servers, cluster.settings.topics.replies)
        await tally.start()
        pool = await create_pool(cluster.settings, min_size=0, max_size=2)
        try:
            yield scenarios.Chaos(cluster, tally, pool, rate=4, duration=8)
        finally:
            await pool.close()
            await tally.stop()
    finally:
        cluster.stop()


async def test_killing_inference_mid_batch_loses_and_doubles_nothing(
    chaos: scenarios.Chaos,
) -> None:
    row = await scenarios.kill_service(chaos, "inference", kills=1, every_s=2)
    assert row.submitted > 0
    assert (row.lost, row.answered_twice) == (0, 0), row
    assert not chaos.cluster.dead(), row
