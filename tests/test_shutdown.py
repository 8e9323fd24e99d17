"""SIGTERM shuts Kontext down cleanly: offsets committed, no process left behind."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from tests.conftest import Stack, gone, stack_env, start_stack, wait_for


async def _submit_and_finish(stack: Stack, count: int) -> list[str]:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        ids = []
        for i in range(count):
            response = await http.post(
                "/v1/jobs",
                json={"model": "tiny", "messages": [{"role": "user", "content": f"job {i}"}]},
            )
            assert response.status_code == 202
            ids.append(response.json()["id"])

        async def all_done() -> bool:
            for job_id in ids:
                status = (await http.get(f"/v1/jobs/{job_id}")).json()["status"]
                if status != "succeeded":
                    return False
            return True

        await wait_for(all_done, timeout=90, interval=0.2)
    return ids


async def test_sigterm_with_embedded_runtime_leaves_no_process(workdir: Path) -> None:
    data_dir = workdir / f"embedded-{uuid.uuid4().hex[:6]}"
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    env["KONTEXT_DATA_DIR"] = str(data_dir)
    stack = start_stack(["up", "--engine", "tiny", "--port", "0"], env, workdir)
    try:
        children = psutil.Process(stack.process.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert "tansu" in names and "postgres" in names
        await _submit_and_finish(stack, 2)
    finally:
        code = stack.stop(timeout=60)
    output = "".join(stack.output)
    assert code == 0, output[-3000:]
    assert "Kontext stopped." in output
    assert "Traceback" not in output
    await wait_for(lambda: all(gone(c) for c in children), timeout=10)
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


async def test_a_parent_killed_outright_leaves_no_process(workdir: Path) -> None:
    """``kontext up`` killed with SIGKILL (the OOM killer, a CI timeout) cannot stop what
    it started: its broker, Postgres and worker processes stop by themselves."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    env["KONTEXT_DATA_DIR"] = str(workdir / f"embedded-{uuid.uuid4().hex[:6]}")
    stack = start_stack(["up", "--engine", "tiny", "--port", "0", "--process", "api"], env, workdir)
    children: list[psutil.Process] = []
    try:
        children = psutil.Process(stack.process.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert any("kontext.cli worker api" in c for c in commands), commands
        assert {"tansu", "postgres"} <= {c.name() for c in children}
        stack.process.kill()
        stack.process.wait(10)
        await wait_for(lambda: all(gone(c) for c in children), timeout=60)
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition, last offset + 1 (counted by reading: the embedded broker's
    end_offsets is not exact)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    ends: dict[int, int] = defaultdict(int)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                break
            for tp, messages in batches.items():
                ends[tp.partition] = messages[-1].offset + 1
    finally:
        await consumer.stop()
    return dict(ends)


async def test_sigterm_commits_every_consumer_groups_offsets(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    stack = start_stack(
        ["up", "--engine", "tiny", "--port", "0"], stack_env(broker, database, prefix), workdir
    )
    try:
        await _submit_and_finish(stack, 6)
    finally:
        code = stack.stop(timeout=60)
    assert code == 0, "".join(stack.output[-40:])

    topics = stack.settings.topics
    groups = {
        f"{prefix}-enricher": topics.requests,
        f"{prefix}-inference-tiny": topics.inference("tiny"),
        f"{prefix}-recorder": topics.completions,
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        for group, topic in groups.items():
            ends = await _end_offsets(broker.bootstrap_servers, topic)
            assert sum(ends.values()) >= 6
            partitions = [TopicPartition(topic, p) for p in ends]
            committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            got = {tp.partition: meta.offset for tp, meta in committed.items()}
            assert got == ends, f"{group}: committed {got}, end {ends}"
    finally:
        await admin.close()
    assert re.search(r"Kontext stopped", "".join(stack.output))
