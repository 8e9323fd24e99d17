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
from tests.conftest import Stack, gone, run_cli, stack_env, start_stack, wait_for


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
        async with httpx.AsyncClient(base_url=stack.api_url) as http:
            ready = await http.get("/readyz")
        assert ready.json() == {"status": "ready", "checks": {"postgres": "ok", "kafka": "ok"}}
    finally:
        code = stack.stop(timeout=60)
    output = "".join(stack.output)
    assert code == 0, output[-3000:]
    assert "Kontext stopped." in output
    assert "Traceback" not in output
    assert "Warning" not in output  # e.g. a deprecation, printed on the first /readyz
    await wait_for(lambda: all(gone(c) for c in children), timeout=10)
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


async def _kill_outright(stack: Stack, timeout: float) -> list[str]:
    """SIGKILL ``stack``'s ``kontext`` process, then wait until every process it had
    started is gone (any left after ``timeout`` is killed, and the wait fails); their
    command lines."""
    children = psutil.Process(stack.process.pid).children(recursive=True)
    commands = []
    for child in children:
        with contextlib.suppress(psutil.Error):  # one that ended meanwhile
            commands.append(" ".join(child.cmdline()))
    try:
        stack.process.kill()
        stack.process.wait(10)
        await wait_for(lambda: all(gone(c) for c in children), timeout=timeout)
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
    return commands


async def test_a_parent_killed_outright_leaves_no_process(workdir: Path) -> None:
    """``kontext up`` killed with SIGKILL (the OOM killer, a CI timeout) cannot stop what
    it started: its broker, Postgres and worker processes stop by themselves. The stack
    file it leaves is named as such by the commands that read it, and a new stack starts
    on its data directory."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    data_dir = workdir / f"embedded-{uuid.uuid4().hex[:6]}"
    env["KONTEXT_DATA_DIR"] = str(data_dir)
    stack = start_stack(["up", "--engine", "tiny", "--port", "0", "--process", "api"], env, workdir)
    commands = " ".join(await _kill_outright(stack, timeout=60))
    assert "kontext.cli worker api" in commands
    assert "tansu broker" in commands and "bin/postgres" in commands

    # Its stack file stays (nothing removed it): a command beside it says where the
    # address came from, not a DATABASE_URL nobody set.
    listed = run_cli(["keys", "list"], cwd=workdir, timeout=60, KONTEXT_DATA_DIR=str(data_dir))
    assert listed.returncode == 1, listed.stdout + listed.stderr
    said = listed.stderr.strip().splitlines()[-1]
    assert said.startswith("kontext: cannot connect to Postgres at postgresql://postgres@")
    assert f"(from {data_dir / 'stack.env'}: is `kontext up` running?)" in said
    assert "DATABASE_URL" not in said

    # The data directory is free again: a new stack starts on it.
    again = start_stack(["up", "--engine", "null", "--port", "0"], env, workdir)
    assert again.stop() == 0, "".join(again.output[-40:])


async def test_a_worker_stops_when_the_process_that_spawned_it_is_killed_outright(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    """The same on a broker and a database of its own, which stay up: its API worker
    stops by itself (it has nothing else to stop it)."""
    env = stack_env(broker, database, f"k{uuid.uuid4().hex[:8]}")
    stack = start_stack(["up", "--engine", "tiny", "--port", "0", "--process", "api"], env, workdir)
    commands = await _kill_outright(stack, timeout=30)
    assert ["kontext.cli worker api" in c for c in commands] == [True]


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
