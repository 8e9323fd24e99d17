"""``kontext bench``: the Steve Min TPS counting rule, the workload, and one real run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psutil
import pytest

from kontext.app.children import Child, Children
from kontext.bench import lanes
from kontext.bench import turns as benchmark
from kontext.bench.memory import resend_prompt
from kontext.bench.turns import Outcome, Phase
from kontext.store import ledger
from schemas.events import ChatMessage
from tests.conftest import embedded_env, gone, run_cli, wait_for
from tests.factories import job_request
from workers.context import TRUNCATION_MARKER
from workers.engines.tiny import ByteTokenizer
from workers.summaries import summary_job


def test_a_turn_counts_only_if_it_succeeded_and_its_prompt_carried_the_fact() -> None:
    fact = "my locker code is 4821"
    outcomes = [
        Outcome(0.1, True),
        Outcome(0.1, False),
        Outcome(0.1, True, asks_for=fact, prompt=f"<|user|>\nHi. By the way, {fact}.\n"),
        Outcome(0.1, True, asks_for=fact, prompt="<|user|>\nWhat is my locker code?\n"),
        Outcome(0.1, True, asks_for=fact, prompt=None),
        Outcome(0.1, False, asks_for=fact, prompt=fact),
    ]
    assert [o.verified for o in outcomes] == [True, False, True, False, False, False]
    assert benchmark.steve_min_tps(outcomes, 2.0) == 1.0
    summary = Phase(outcomes, 2.0).summary()
    assert summary["turns_verified"] == 2
    assert summary["fact_recalled"] == 1 and summary["fact_asked"] == 4
    assert summary["turns_per_s"] == 2.0  # succeeded, fact or not


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [benchmark.percentile(values, p) for p in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert benchmark.percentile([7.0], 99) == 7.0
    assert benchmark.percentile([], 50) == 0.0


def test_batch_distribution_between_two_snapshots() -> None:
    before = {"count": 2.0, "sum": 3.0, "1.0": 1.0, "2.0": 2.0, "4.0": 2.0, "+Inf": 2.0}
    after = {"count": 6.0, "sum": 20.0, "1.0": 2.0, "2.0": 3.0, "4.0": 5.0, "+Inf": 6.0}
    assert benchmark.batch_distribution(before, after) == {
        "engine_calls": 4,
        "mean": 4.25,
        "histogram": {"1": 1, "3-4": 2, "5+": 1},
    }


def test_scripts_replay_real_lines_between_the_fact_and_the_question() -> None:
    work = benchmark.scripts(3, 5)
    assert len(work) == 3
    for script in work:
        assert len(script.messages) == 5
        assert script.fact.startswith("my locker code is ")
        assert script.fact in script.messages[0]
        assert script.messages[-1] == benchmark.QUESTION
        assert all(m and script.fact not in m for m in script.messages[1:])
    assert benchmark.scripts(3, 5) == work  # deterministic
    assert len({s.fact for s in work}) == 3


def test_plot_writes_a_png(tmp_path: Path) -> None:
    results = [
        {"engine": "null", "turns": 3, "conversations": c, "steve_min_tps": t, "p99_ms": p}
        for c, t, p in ((1, 10.0, 50.0), (4, 30.0, 80.0))
    ]
    benchmark.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_the_raw_baseline_calls_the_engine_a_few_times_with_whole_batches() -> None:
    prompts = [str(i) for i in range(300)]
    one = benchmark.raw_sample(prompts, 1)
    assert len(one) == benchmark.ONE_AT_A_TIME_SAMPLE
    assert one[0] == "0" and int(one[-1]) > 280  # spread over the whole run
    sixteen = benchmark.raw_sample(prompts, 16)
    assert len(sixteen) == 16 * benchmark.RAW_CALLS
    assert len(set(sixteen)) == len(sixteen) and int(sixteen[-1]) > 280
    # Fewer prompts than the calls want: every prompt, cut to whole batches.
    assert benchmark.raw_sample(prompts[:40], 32) == prompts[:32]
    # Fewer than one batch: all of them, in one short call.
    assert benchmark.raw_sample(prompts[:20], 32) == prompts[:20]


@pytest.mark.parametrize(
    ("separate", "via"),
    [(False, "http"), (True, "http"), (False, "kafka")],
    ids=["two-processes", "separate-inference", "over-kafka"],
)
def test_bench_json_through_the_whole_pipeline(tmp_path: Path, separate: bool, via: str) -> None:
    """The stack runs in child processes (the API, the workers; with --separate-inference
    the inference worker in a third), the bench is the load generator (submitting over
    HTTP, or on the submissions topic); batch sizes come from the inference worker's
    metrics endpoint, CPU time from every process."""
    args = ["bench", "--engine", "null", "--conversations", "2", "--turns", "3", "--json"]
    args += ["--separate-inference"] if separate else []
    args += ["--via", via]
    done = run_cli(args, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["engine"] == "null"
    workers = "submissions, enricher, recorder, webhooks, batches, reconciler"
    assert result["layout"] == (
        f"api | {workers} | inference"
        if separate
        else "api | submissions, enricher, inference, recorder, webhooks, batches, reconciler"
    )
    assert (result["tracing"], result["submitted_over"]) == ("tracing off", via)
    cpu = result["cpu_ms_per_turn"]
    processes = {*result["layout"].split(" | "), "load generator", "broker", "postgres"}
    assert set(cpu["by_process"]) == processes
    # Every process is measured (tests/test_cpu.py checks the meter itself); six turns
    # can leave a quiet one under the kernel's 10 ms accounting tick.
    assert all(ms >= 0 for ms in cpu["by_process"].values()) and cpu["total"] > 0
    assert cpu["total"] == pytest.approx(sum(cpu["by_process"].values()), abs=0.01)
    assert (result["conversations"], result["turns"]) == (2, 3)
    assert result["turns_total"] == result["turns_verified"] == 6
    assert (result["fact_recalled"], result["fact_asked"]) == (2, 2)
    assert result["steve_min_tps"] > 0 and result["tokens_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    # Where the time went, from the jobs' timeline: every stage was reached.
    stages = result["stage_p50_ms"]
    assert list(stages) == [
        "admitted", "enriched", "batched", "generated", "recorded", "replied"
    ]  # fmt: skip
    assert all(ms is not None and ms >= 0 for ms in stages.values()), stages
    assert "Where a turn's time goes" in (tmp_path / "docs" / "benchmarks.md").read_text()
    batches = result["batch_sizes"]
    assert (
        batches["engine_calls"] >= 1
        and sum(batches["histogram"].values()) == batches["engine_calls"]
    )
    # The engine's share of the pipeline phase, from the inference worker's call timer.
    busy = result["engine_in_pipeline"]
    assert busy["mean_call_ms"] > 0 and 0 <= busy["busy_share"] < 1
    # Two conversations never fill a batch of the raw baseline's size (6 prompts).
    assert busy["full_batch_calls"] == 0 and busy["full_batch_call_p50_ms"] is None
    baselines = result["baselines"]
    assert baselines["raw_engine"]["tokens_per_s"] > 0
    # The raw engine at the batch max, before and after the pipeline.
    assert all(t > 0 for t in baselines["raw_engine"]["tokens_per_s_at_same_before_after"])
    assert baselines["one_at_a_time"]["tokens_per_s"] > 0
    assert baselines["naive_resend"]["fact_recalled"] == 2
    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "Steve Min TPS, closed-loop multi-turn: `null` engine" in section
    header, _, row = next(
        table.splitlines()[:3] for table in section.split("\n\n") if "| p50 / p95" in table
    )
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["| conversations x turns"] == "| 2 x 3"
    p50, p95, p99 = (result[k] for k in ("p50_ms", "p95_ms", "p99_ms"))
    assert cells["p50 / p95 / p99 ms"] == f"{p50:.0f} / {p95:.0f} / {p99:.0f}"
    assert cells["CPU ms per turn"] == f"{cpu['total']:.2f}"


def test_bench_lanes_measures_probes_without_then_during_a_backfill(tmp_path: Path) -> None:
    args = ["bench-lanes", "--engine", "tiny", "--probes", "10", "--lines", "40"]
    done = run_cli([*args, "--separate-inference"], tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| without backfill")]
    rows += [line for line in done.stdout.splitlines() if line.startswith("| during a 40-line")]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "10"  # every probe answered
        p50, p95, p99, top = (float(c) for c in cells[2:6])
        assert 0 < p50 <= p95 <= p99 <= top
        # Both stages' interactive waits were read, the inference one from the child.
        enrich_wait, inference_wait = (float(c) for c in cells[6:8])
        assert 0 < enrich_wait < top and 0 < inference_wait < top
    assert re.search(
        r"Backfill lines done in the \d+\.\d s after the last probe: \d+ "
        r"|The backfill had ended by the last probe\.",
        done.stdout,
    )
    # The bench leaves nothing running: the cancelled backfill ended before it stopped.
    assert re.search(r"The cancelled backfill ended \d+\.\d s after its cancel\.", done.stdout)
    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "inference worker in its own process" in section


def test_the_lanes_table_gives_the_backfills_rate_after_the_probes_or_says_it_had_ended() -> None:
    idle = lanes.Phase("without backfill", [10.0, 20.0], {}, 1.0)
    going = lanes.table(lanes.Result([idle], after_lines=12, after_s=40.0, settled_s=2.5))
    assert "Backfill lines done in the 40.0 s after the last probe: 12 (0.3/s)." in going
    assert "The cancelled backfill ended 2.5 s after its cancel." in going
    ended = lanes.table(lanes.Result([idle], after_lines=0, after_s=0.0, settled_s=None))
    assert "The backfill had ended by the last probe." in ended
    assert "/s)" not in ended
    assert "The cancelled backfill had not ended 300 s after its cancel." in ended


async def test_work_beside_a_child_process_that_dies_fails_at_once(tmp_path: Path) -> None:
    """No waiting out turns that can never be answered: a child's exit ends the work."""

    def child(process: asyncio.subprocess.Process) -> Children:
        log = tmp_path / "worker.log"
        return Children([Child(("inference",), process, log, "http://127.0.0.1:1/metrics")])

    dies = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
    never = asyncio.Event()
    with pytest.raises(RuntimeError, match=r"inference process exited \(code 3\)"):
        await asyncio.wait_for(child(dies).guard(never.wait()), timeout=30)
    # Work that finishes first returns its result.
    lives = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "input()", stdin=asyncio.subprocess.PIPE
    )
    assert await child(lives).guard(asyncio.sleep(0, result="done")) == "done"
    lives.kill()
    await lives.wait()


async def test_the_bench_vacuums_the_tables_earlier_runs_grew_and_leaves_near_empty_ones(
    own_pool: asyncpg.Pool,
) -> None:
    """A run starts without earlier runs' dead rows, with fresh statistics for the tables
    that hold them; a fresh database's near-empty tables keep no statistics, so Postgres
    does not plan their growing use as scans of one page."""
    pool = own_pool  # statistics of its own, whatever other tests wrote
    await pool.execute("INSERT INTO conversations (id) VALUES ('c')")
    await pool.execute(
        "INSERT INTO turns (conversation_id, seq, role, content, tokens)"
        " SELECT 'c', n, 'user', repeat('x', 400), 100 FROM generate_series(1, 400) AS n"
    )
    await pool.execute("DELETE FROM turns WHERE seq > 200")
    await benchmark.vacuum(pool)
    rows = await pool.fetch(
        "SELECT relname, reltuples FROM pg_class WHERE relname = ANY($1::text[])",
        list(benchmark.WRITTEN_TABLES),
    )
    planned = {r["relname"]: r["reltuples"] for r in rows}
    assert set(planned) == set(benchmark.WRITTEN_TABLES)
    # Vacuumed and analyzed: the statistics count the live rows, not the deleted ones.
    assert planned.pop("turns") == 200
    # Never vacuumed nor analyzed (-1): planned as at least VACUUM_MIN_PAGES pages.
    assert planned == {table: -1 for table in planned}


async def test_each_engine_call_of_a_run_is_read_from_its_jobs_timeline(
    pool: asyncpg.Pool,
) -> None:
    """The jobs of one engine call share the stamp taken as it began, and the call ends
    with its last answer: grouped by it, they give each call's size and time, so a full
    batch's call in the pipeline can be set against the raw engine's call of the same
    size. With an engine that batches continuously each job's answer has its own time.
    A job answered without the engine (no stamps) and a summary job are no call of the
    run's chat turns."""
    run = f"bench-t{uuid.uuid4().hex[:6]}"
    jobs = [job_request(f"turn {n}", conversation_id=f"{run}-{n}") for n in range(6)]
    jobs.append(summary_job(f"{run}-0", "tiny", 1, 1, 2, [("user", "turn 0")], 8))
    for request in jobs:
        await ledger.admit(pool, request, None)
    # Two calls: each job in it, and when its answer came (seconds into the call). The
    # first call answered its jobs one by one; the summary job rode in it and came last.
    made = [((0, 1, 2, 6), (3.5, 7.0, 5.0, 9.0)), ((3, 4), (1.5, 1.5))]
    began = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)
    for offset, (members, answered) in enumerate(made):
        start = began + timedelta(seconds=10 * offset)
        for i, seconds in zip(members, answered, strict=True):
            await pool.execute(
                "UPDATE jobs SET batched_at = $2, generated_at = $3 WHERE id = $1",
                jobs[i].job_id,
                start,
                start + timedelta(seconds=seconds),
            )

    calls = await benchmark.engine_calls(pool, f"{run}-%")

    assert calls == [(3, 7000.0), (2, 1500.0)]
    assert benchmark.full_batch_call_ms(calls, 3) == 7000.0
    assert benchmark.full_batch_call_ms(calls, 16) is None
    assert await benchmark.engine_wall_busy_s(pool, f"{run}-%") == 8.5


async def test_overlapping_engine_calls_are_busy_time_once(pool: asyncpg.Pool) -> None:
    """An engine given several micro-batches at once (continuous batching) runs calls
    that overlap: the time the engine worked is the union of their spans."""
    run = f"bench-o{uuid.uuid4().hex[:6]}"
    jobs = [job_request(f"turn {n}", conversation_id=f"{run}-{n}") for n in range(3)]
    for request in jobs:
        await ledger.admit(pool, request, None)
    began = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    # 0-4 s and 3-6 s overlap; 10-11 s stands apart: 7 s of work, not 8.
    for job, (start, end) in zip(jobs, ((0, 4), (3, 6), (10, 11)), strict=True):
        await pool.execute(
            "UPDATE jobs SET batched_at = $2, generated_at = $3 WHERE id = $1",
            job.job_id,
            began + timedelta(seconds=start),
            began + timedelta(seconds=end),
        )
    assert await benchmark.engine_wall_busy_s(pool, f"{run}-%") == 7.0


def test_the_naive_resend_fits_the_window_as_a_client_must() -> None:
    """The baseline without server-side memory: the oldest turns go first, and a new
    message that alone does not fit is cut as the pipeline cuts one (an engine would
    refuse the prompt otherwise)."""
    tokenizer = ByteTokenizer()
    system = ChatMessage(role="system", content="You are a helpful assistant.")
    history = [system]
    for turn in range(6):
        history.append(ChatMessage(role="user", content=f"question {turn} " + "q" * 100))
        history.append(ChatMessage(role="assistant", content=f"answer {turn} " + "a" * 100))
    history.append(ChatMessage(role="user", content="the last question"))
    prompt = resend_prompt(tokenizer, history, 500)
    assert tokenizer.count(prompt) <= 500
    assert history[0] == system and history[-1].content == "the last question"
    assert "answer 5" in prompt and "question 0" not in prompt  # the oldest went first

    alone = [system, ChatMessage(role="user", content="my code is 4350. " + "y" * 2000)]
    prompt = resend_prompt(tokenizer, alone, 500)
    assert tokenizer.count(prompt) <= 500
    assert TRUNCATION_MARKER in prompt and "my code is 4350." in prompt
    assert len(alone) == 2 and TRUNCATION_MARKER in alone[1].content


async def test_ctrl_c_stops_the_bench_and_its_whole_stack(tmp_path: Path) -> None:
    """SIGINT mid-run (a terminal's Ctrl-C; the stack's processes have sessions of
    their own, so only the bench gets it): the bench stops within seconds, says it
    measured nothing, and leaves no process behind."""
    args = ["bench", "--engine", "tiny", "--conversations", "64", "--turns", "8"]
    bench = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontext.cli",
        *args,
        cwd=tmp_path,
        env=embedded_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stack: dict[psutil.Process, str] = {}

    def workers_started() -> bool:
        stack.clear()
        for child in psutil.Process(bench.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # one that ended meanwhile
                stack[child] = " ".join(child.cmdline())
        return any("kontext.cli worker" in command for command in stack.values())

    try:
        await wait_for(workers_started, timeout=120, interval=0.2)
        bench.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(bench.communicate(), timeout=60)
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.communicate()
    err = stderr.decode()
    assert bench.returncode == 1, err[-3000:]
    assert "the benchmark stopped before it measured anything" in err
    assert "Traceback" not in err
    commands = " ".join(stack.values())
    assert "tansu broker" in commands and "bin/postgres" in commands
    await wait_for(lambda: all(gone(c) for c in stack), timeout=10)


def test_bench_embeddings_times_each_dtype_and_compares_its_vectors(tmp_path: Path) -> None:
    """One row per dtype and batch size; float32 batched is float32 alone, bfloat16 is
    within rounding of it; the section says what ``auto`` picks on this machine."""
    done = run_cli(
        ["bench-embeddings", "--texts", "12", "--batch-sizes", "1,5"], tmp_path, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Embeddings: MiniLM in float32 and bfloat16" in section
    assert re.search(
        r"AMX (yes|no), so `KONTEXT_TORCH_DTYPE=auto` picks (bfloat16|float32)", section
    )
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][1:]
    assert [(r[0], r[1]) for r in rows] == [
        ("| float32", "1"), ("| float32", "5"), ("| bfloat16", "1"), ("| bfloat16", "5")
    ]  # fmt: skip
    for cells in rows:
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        low, mean = (float(c) for c in cells[4].rstrip(" |").split(", "))
        assert low <= mean and low >= (0.99999 if cells[0] == "| float32" else 0.999)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--batch-sizes", "1,four"], "whole numbers of 1 or more"),
        (["--texts", "10000000"], "the dataset has only"),
    ],
    ids=["batch-sizes", "texts"],
)
def test_bench_embeddings_refuses_bad_options_in_one_line(
    tmp_path: Path, args: list[str], said: str
) -> None:
    done = run_cli(["bench-embeddings", *args], tmp_path, timeout=60)
    assert done.returncode == 2
    assert said in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "docs" / "benchmarks.md").exists()
