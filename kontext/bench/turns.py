"""``kontext bench``: Steve Min TPS under a closed-loop multi-turn workload.

C conversations run at once, T turns each, replaying one speaker's side of real
human conversations (the chitchat-dataset wheel). Turn 1 also plants a fact
("my locker code is NNNN") and the last turn asks for it. Each turn goes through
the whole pipeline; a conversation sends its next turn when the previous reply
arrives. A turn counts towards ``steve_min_tps`` only if it succeeded and, when
it asks for the fact, its prompt contained it.

In the same run, on the same conversations, the baselines call the engine
directly: naive full-history resend (the client keeps the history), then the
resend prompts at batch sizes 8, 16, 32 and the pipeline's batch max, and one
request at a time (on an even sample of at most 32 of them, which is enough for
its rate and keeps slow devices from spending minutes on it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from rich.progress import Progress

from kontext.bench import memory as bench
from kontext.bench.cpu import CpuMeter, per_turn_ms
from kontext.bench.scrape import scrape
from kontext.metrics import BATCH_SIZE, ENGINE_LATENCY
from kontext.settings import Settings
from producers.client import KontextClient, KontextError
from schemas.events import ChatMessage
from workers.engines import device, smollm2, system_prompt
from workers.engines.base import Engine, GenerationRequest

log = logging.getLogger(__name__)

FACT = "my locker code is {code}"
PLANT = "{line} By the way, {fact}."
QUESTION = "What is my locker code?"
RAW_BATCH_SIZES = (1, 8, 16, 32)
ONE_AT_A_TIME_SAMPLE = 32
RAW_CALLS = 8
"""Engine calls per batch size in the raw baseline: a steady rate, and a long run's
baselines (64 x 16 on a GPU) stay minutes, not a quarter of an hour."""
TURN_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 60.0

Advance = Callable[[], None]


@dataclass(frozen=True)
class Script:
    """One benchmark conversation: the user's messages and the fact the last one asks for."""

    messages: list[str]
    fact: str


@dataclass(frozen=True)
class Outcome:
    """One turn as the client saw it."""

    latency_s: float
    succeeded: bool
    completion_tokens: int = 0
    prompt_tokens: int = 0
    asks_for: str | None = None
    """The planted fact, on the turn that asks for it."""
    prompt: str | None = None

    @property
    def verified(self) -> bool:
        """Succeeded, and carried the planted fact in its prompt if it asked for it."""
        if not self.succeeded:
            return False
        return self.asks_for is None or (self.prompt is not None and self.asks_for in self.prompt)


def steve_min_tps(outcomes: Sequence[Outcome], elapsed_s: float) -> float:
    """Verified turns per second."""
    return sum(o.verified for o in outcomes) / elapsed_s if elapsed_s > 0 else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def dataset_path() -> Path:
    """``dataset.json`` inside the installed chitchat-dataset wheel (never imported)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "kontext bench needs the chitchat-dataset wheel: pip install -e '.[bench]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def dialogue_lines(path: Path) -> Iterator[list[str]]:
    """Each conversation's first speaker's lines (consecutive messages joined), by id."""
    data: dict[str, Any] = json.loads(path.read_text())
    for key in sorted(data):
        groups = data[key]["messages"][0::2]
        lines = [" ".join(m["text"].strip() for m in group).strip() for group in groups]
        yield [line for line in lines if line]


def scripts(
    conversations: int, turns: int, seed: int = 0, path: Path | None = None
) -> list[Script]:
    """``conversations`` scripts of ``turns`` messages: real lines, fact first, question last.

    A script takes the next dataset conversations, in id order, until it has enough lines.
    """
    if turns < 2:
        raise ValueError("a benchmark conversation needs at least 2 turns (plant, then ask)")
    rng = random.Random(seed)
    sources = dialogue_lines(path or dataset_path())
    out: list[Script] = []
    for _ in range(conversations):
        lines: list[str] = []
        while len(lines) < turns - 1:
            lines.extend(next(sources))
        fact = FACT.format(code=rng.randrange(1000, 10000))
        first = PLANT.format(line=lines[0], fact=fact)
        out.append(Script([first, *lines[1 : turns - 1], QUESTION], fact))
    return out


@dataclass
class Phase:
    """The outcomes of one way of running the workload, and how long it took."""

    outcomes: list[Outcome]
    elapsed_s: float
    conversations: str = ""
    """The prefix of its conversations' ids (LIKE pattern), for the ledger's timeline."""

    def summary(self) -> dict[str, Any]:
        latencies = [o.latency_s * 1000 for o in self.outcomes]
        asked = [o for o in self.outcomes if o.asks_for is not None]
        succeeded = [o for o in self.outcomes if o.succeeded]
        return {
            "steve_min_tps": round(steve_min_tps(self.outcomes, self.elapsed_s), 2),
            "turns_per_s": round(len(succeeded) / self.elapsed_s, 2),
            "tokens_per_s": round(sum(o.completion_tokens for o in succeeded) / self.elapsed_s, 1),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "turns_total": len(self.outcomes),
            "turns_succeeded": len(succeeded),
            "turns_verified": sum(o.verified for o in self.outcomes),
            "fact_recalled": sum(o.verified for o in asked),
            "fact_asked": len(asked),
            "mean_prompt_tokens": round(
                statistics.mean(o.prompt_tokens for o in succeeded) if succeeded else 0.0, 1
            ),
            "elapsed_s": round(self.elapsed_s, 3),
        }


async def pipeline(
    client: KontextClient,
    model: str,
    work: Sequence[Script],
    max_tokens: int,
    advance: Advance,
    over_kafka: bool = False,
) -> Phase:
    """Every conversation at once through the pipeline, each turn after the last reply;
    submitted over HTTP, or with ``over_kafka`` on the submissions topic."""
    run = uuid.uuid4().hex[:8]
    chat = client.chat_over_kafka if over_kafka else client.chat

    async def converse(index: int, script: Script) -> list[Outcome]:
        conversation = f"bench-{run}-{index}"
        outcomes: list[Outcome] = []
        for number, text in enumerate(script.messages, 1):
            asks = script.fact if number == len(script.messages) else None
            began = time.perf_counter()
            try:
                reply = await chat(
                    timeout=TURN_TIMEOUT_S,
                    model=model,
                    conversation_id=conversation,
                    messages=[{"role": "user", "content": text}],
                    max_tokens=max_tokens,
                    include_prompt=asks is not None,
                )
            except (KontextError, TimeoutError) as exc:
                log.warning("turn %d of %s failed: %r", number, conversation, exc)
                outcomes.append(Outcome(time.perf_counter() - began, False, asks_for=asks))
                advance()
                continue
            latency = time.perf_counter() - began
            result = reply.result
            if result is None or result.context is None:
                outcomes.append(Outcome(latency, False, asks_for=asks))
            else:
                outcomes.append(
                    Outcome(
                        latency,
                        True,
                        completion_tokens=result.usage.completion_tokens,
                        prompt_tokens=result.context.prompt_tokens,
                        asks_for=asks,
                        prompt=result.context.prompt,
                    )
                )
            advance()
        return outcomes

    started = time.perf_counter()
    done = await asyncio.gather(*(converse(i, s) for i, s in enumerate(work)))
    elapsed = time.perf_counter() - started
    return Phase([o for outcomes in done for o in outcomes], elapsed, f"bench-{run}-%")


STAGES = (
    ("admitted", "created_at", "claimed_at"),
    ("enriched", "claimed_at", "enriched_at"),
    ("batched", "enriched_at", "batched_at"),
    ("generated", "batched_at", "generated_at"),
    ("recorded", "generated_at", "completed_at"),
    ("replied", "completed_at", "replied_at"),
)
"""Each stage of a job's timeline: its name, and the stamps it lies between."""


async def stage_medians(pool: asyncpg.Pool, conversations: str) -> dict[str, float | None]:
    """Median milliseconds each stage of the timeline took, over the jobs of the
    conversations matching ``conversations`` (a LIKE pattern): where a turn's latency goes."""
    columns = ", ".join(
        f"percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM {end} - {start}))"
        f" * 1000 AS {name}"
        for name, start, end in STAGES
    )
    row = await pool.fetchrow(
        f"SELECT {columns} FROM jobs WHERE conversation_id LIKE $1 AND kind = 'chat'",
        conversations,
    )
    return {name: None if row[name] is None else round(row[name], 2) for name, _, _ in STAGES}


async def naive_resend(
    engine: Engine,
    system_prompt: str,
    work: Sequence[Script],
    max_tokens: int,
    batch_size: int,
    advance: Advance,
) -> tuple[Phase, list[str]]:
    """Full history resent every turn straight to the engine, conversations in lockstep
    (turn N of every conversation, ``batch_size`` per engine call); also the prompts sent."""
    tokenizer = engine.tokenizer
    budget = engine.context_window - max_tokens
    histories = [[ChatMessage(role="system", content=system_prompt)] for _ in work]
    outcomes: list[Outcome] = []
    prompts: list[str] = []
    started = time.perf_counter()
    for turn in range(len(work[0].messages)):
        rendered: list[str] = []
        for script, history in zip(work, histories, strict=True):
            history.append(ChatMessage(role="user", content=script.messages[turn]))
            rendered.append(bench.resend_prompt(tokenizer, history, budget))
        prompts.extend(rendered)
        last = turn == len(work[0].messages) - 1
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start : start + batch_size]
            began = time.perf_counter()
            answers = await engine.generate([GenerationRequest(p, max_tokens) for p in chunk])
            latency = time.perf_counter() - began
            for offset, (prompt, answer) in enumerate(zip(chunk, answers, strict=True)):
                index = start + offset
                histories[index].append(ChatMessage(role="assistant", content=answer.text))
                outcomes.append(
                    Outcome(
                        latency,
                        True,
                        completion_tokens=answer.completion_tokens,
                        prompt_tokens=answer.prompt_tokens,
                        asks_for=work[index].fact if last else None,
                        prompt=prompt,
                    )
                )
                advance()
    return Phase(outcomes, time.perf_counter() - started), prompts


async def raw_engine(
    engine: Engine, prompts: Sequence[str], max_tokens: int, batch_size: int, advance: Advance
) -> Phase:
    """The prompts straight to the engine, ``batch_size`` per call, one call after another,
    from a cold start: the bench's other phases ran the same prompts, and an engine that
    keeps prompt prefixes would serve them from its cache."""
    await engine.forget_prefixes()
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        began = time.perf_counter()
        answers = await engine.generate([GenerationRequest(p, max_tokens) for p in chunk])
        latency = time.perf_counter() - began
        outcomes.extend(
            Outcome(latency, True, a.completion_tokens, a.prompt_tokens) for a in answers
        )
        for _ in answers:
            advance()
    return Phase(outcomes, time.perf_counter() - started)


def raw_sample(prompts: Sequence[str], size: int) -> list[str]:
    """The raw baseline's prompts at batch ``size``, evenly spread over the run: enough
    for ``RAW_CALLS`` calls (``ONE_AT_A_TIME_SAMPLE`` one at a time), or every prompt;
    in whole batches where there are enough, so that no short last call lowers the rate."""
    wanted = ONE_AT_A_TIME_SAMPLE if size == 1 else size * RAW_CALLS
    if len(prompts) > wanted:
        return [prompts[i * len(prompts) // wanted] for i in range(wanted)]
    return list(prompts[: len(prompts) // size * size] or prompts)


def _model_samples(histogram: Histogram, model: str, metrics: Iterable[Metric]) -> Iterator[Sample]:
    """The samples of ``histogram``'s family for ``model`` among ``metrics``."""
    name = next(iter(histogram.describe())).name
    for metric in metrics:
        if metric.name == name:
            yield from (s for s in metric.samples if s.labels.get("model") == model)


def batch_sizes(model: str, metrics: Iterable[Metric] | None = None) -> dict[str, float]:
    """The inference worker's batch-size histogram for ``model`` as it stands now:
    cumulative counts by bucket bound (``le``), plus ``count`` and ``sum``. ``metrics``:
    another process's, scraped; default: this process's."""
    snapshot = {"count": 0.0, "sum": 0.0}
    for sample in _model_samples(
        BATCH_SIZE, model, BATCH_SIZE.collect() if metrics is None else metrics
    ):
        if sample.name.endswith("_bucket"):
            snapshot[sample.labels["le"]] = sample.value
        elif sample.name.endswith("_count"):
            snapshot["count"] = sample.value
        elif sample.name.endswith("_sum"):
            snapshot["sum"] = sample.value
    return snapshot


def engine_busy_s(model: str, metrics: Iterable[Metric]) -> float:
    """Seconds the inference worker has spent in engine calls for ``model`` so far."""
    samples = _model_samples(ENGINE_LATENCY, model, metrics)
    return sum(s.value for s in samples if s.name.endswith("_sum"))


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Engine calls between two snapshots: how many, the mean batch size, and how many
    fell in each bucket ("1", "3-4", "257+")."""
    calls = after["count"] - before.get("count", 0.0)
    histogram: dict[str, int] = {}
    lower, below = 1, 0.0
    for le in (k for k in after if k not in ("count", "sum")):
        cumulative = after[le] - before.get(le, 0.0)
        upper = None if le == "+Inf" else int(float(le))
        if upper is None:
            label = f"{lower}+"
        else:
            label = str(upper) if upper == lower else f"{lower}-{upper}"
        if cumulative > below:
            histogram[label] = int(cumulative - below)
        below = cumulative
        lower = (upper or lower) + 1
    mean = (after["sum"] - before.get("sum", 0.0)) / calls if calls else 0.0
    return {"engine_calls": int(calls), "mean": round(mean, 2), "histogram": histogram}


async def settle(pool: asyncpg.Pool, conversation_prefix: str = "bench-") -> None:
    """Wait until the recorder has embedded every stored benchmark turn, so its
    memory upkeep does not spill into the next measurement."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        pending = await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM turns WHERE embedding IS NULL"
            " AND conversation_id LIKE $1)",
            f"{conversation_prefix}%",
        )
        if not pending:
            return
        await asyncio.sleep(0.2)
    log.warning("recorder still embedding after %.0f s; measuring anyway", SETTLE_TIMEOUT_S)


ENGINE_CALLED = "conversation_id LIKE $1 AND kind = 'chat' AND batched_at IS NOT NULL"
"""The chat jobs of the conversations matching ``$1`` that went through an engine call."""


async def engine_calls(pool: asyncpg.Pool, conversations: str) -> list[tuple[int, float]]:
    """Each engine call that ran jobs of the conversations matching ``conversations`` (a
    LIKE pattern), as (jobs in it, milliseconds), from the jobs' timeline: the jobs of
    one call share the stamp taken as it began (``batched_at``), and the call ends with
    its last answer (the latest ``generated_at``: with an engine that batches
    continuously, each job's answer has its own)."""
    rows = await pool.fetch(
        "SELECT count(*) AS size,"
        " extract(epoch FROM max(generated_at) - batched_at) * 1000 AS ms"
        f" FROM jobs WHERE {ENGINE_CALLED}"
        " GROUP BY batched_at ORDER BY batched_at",
        conversations,
    )
    return [(int(row["size"]), float(row["ms"])) for row in rows]


async def engine_wall_busy_s(pool: asyncpg.Pool, conversations: str) -> float:
    """Seconds in which at least one engine call ran jobs of the conversations matching
    ``conversations``: the union of the calls' spans in the jobs' timeline. Calls that
    overlap (an engine given several micro-batches at once) count once."""
    busy = await pool.fetchval(
        "SELECT coalesce(extract(epoch FROM sum(upper(span) - lower(span))), 0) FROM unnest(("
        f" SELECT range_agg(tstzrange(batched_at, generated_at)) FROM jobs WHERE {ENGINE_CALLED}"
        ")) AS span",
        conversations,
    )
    return float(busy)


def full_batch_call_ms(calls: Sequence[tuple[int, float]], size: int) -> float | None:
    """The median call among ``calls`` that ran ``size`` jobs, or None if none did."""
    full = [ms for n, ms in calls if n == size]
    return round(statistics.median(full), 1) if full else None


WRITTEN_TABLES = ("jobs", "conversations", "turns", "summaries", "usage", "webhook_deliveries")
"""The tables a turn writes."""


VACUUM_MIN_PAGES = 10
"""Postgres plans a table never vacuumed nor analyzed as at least this many pages."""


async def vacuum(pool: asyncpg.Pool) -> None:
    """Vacuum and analyze the tables a turn writes that earlier runs have grown, as
    pgbench does. The embedded Postgres lives for one run, shorter than autovacuum's
    first round, so without this each run inherits every earlier run's dead rows: the
    status index of the jobs ledger held 18,000 entries for a few hundred open jobs after
    a dozen runs. A table under ``VACUUM_MIN_PAGES`` is left alone: on a fresh database,
    statistics of the warm-up's few rows made Postgres plan sequential scans, and keep
    them as the run grew the tables (0.85 ms of Postgres CPU a turn, against 0.3-0.4)."""
    grown = await pool.fetchval(
        "SELECT array_agg(t) FROM unnest($1::text[]) AS t"
        " WHERE pg_relation_size(t::regclass) >= $2 * current_setting('block_size')::bigint",
        list(WRITTEN_TABLES),
        VACUUM_MIN_PAGES,
    )
    if grown:
        await pool.execute(f"VACUUM (ANALYZE) {', '.join(grown)}")


def _tracker(progress: Progress, description: str, total: int) -> Advance:
    task = progress.add_task(description, total=total)
    return lambda: progress.advance(task)


WARM_UP_TURNS = 8
"""Turns of one conversation before the measurement: enough for each stage's
statements to be prepared on the connections they use and past Postgres's first
five executions (custom plans, then the choice of a generic one), which the first
turns of a fresh stack pay once."""


RESUME_TURNS = 3
"""Untimed turns right before the measurement: after the pause of the baselines, the
settling and the vacuum, every stage's consumer is back to its short fetch wait
(``FetchTempo`` lengthens a consumer's wait with its quiet; on the embedded broker
the first turn after a pause of seconds waited up to 200 ms at each hop)."""


async def warm_up(client: KontextClient, engine: Engine, model: str, max_tokens: int) -> None:
    """One engine call and ``WARM_UP_TURNS`` pipeline turns, untimed: first calls pay
    one-off costs."""
    prompt = engine.tokenizer.render([ChatMessage(role="user", content="Hello!")])
    await engine.generate([GenerationRequest(prompt, max_tokens)])
    await untimed_turns(client, model, max_tokens, WARM_UP_TURNS)


async def untimed_turns(client: KontextClient, model: str, max_tokens: int, turns: int) -> None:
    """``turns`` turns of a conversation of their own, not measured."""
    conversation = f"bench-warmup-{uuid.uuid4().hex[:8]}"
    for turn in range(turns):
        await client.chat(
            timeout=TURN_TIMEOUT_S,
            model=model,
            conversation_id=conversation,
            messages=[{"role": "user", "content": f"Hello! ({turn + 1})"}],
            max_tokens=max_tokens,
        )


async def measure(
    settings: Settings,
    pool: asyncpg.Pool,
    client: KontextClient,
    engine: Engine,
    work: Sequence[Script],
    max_tokens: int,
    progress: Progress,
    metrics_url: str,
    meter: CpuMeter,
    over_kafka: bool = False,
) -> dict[str, Any]:
    """The baselines (on ``engine``, called directly), then the pipeline, on the same
    conversations; one result object. ``metrics_url``: the inference worker's metrics;
    ``meter`` reads the CPU time of every process of the stack."""
    model = settings.engines[0]

    async def snapshot() -> tuple[dict[str, float], float]:
        metrics = list(await scrape(metrics_url))
        return batch_sizes(engine.name, metrics), engine_busy_s(engine.name, metrics)

    turns = len(work) * len(work[0].messages)
    label = f"{len(work)} conversations"
    naive, prompts = await naive_resend(
        engine,
        settings.system_prompt or system_prompt(model),
        work,
        max_tokens,
        settings.batch_max_size,
        _tracker(progress, f"naive resend, {label}", turns),
    )
    raw: dict[int, dict[str, Any]] = {}
    same = min(settings.batch_max_size, len(prompts))
    for size in sorted({min(b, len(prompts)) for b in RAW_BATCH_SIZES} | {same}):
        sample = raw_sample(prompts, size)
        track = _tracker(progress, f"raw engine, batch {size}", len(sample))
        raw[size] = (await raw_engine(engine, sample, max_tokens, size, track)).summary()
    await settle(pool)
    await vacuum(pool)
    await untimed_turns(client, model, max_tokens, RESUME_TURNS)
    before, busy_before = await snapshot()
    load = os.getloadavg()[0]
    cpu_before = meter.read()
    phase = await pipeline(
        client,
        model,
        work,
        max_tokens,
        _tracker(progress, f"pipeline, {label}", turns),
        over_kafka=over_kafka,
    )
    cpu_used = meter.read().since(cpu_before)
    after, busy_after = await snapshot()
    await settle(pool)
    stages = await stage_medians(pool, phase.conversations)
    calls = await engine_calls(pool, phase.conversations)
    wall_busy_s = await engine_wall_busy_s(pool, phase.conversations)
    # The raw engine at the pipeline's batch max once more: the machine's speed drifts,
    # so the pipeline is set against the mean of the runs before and after it.
    sample = raw_sample(prompts, same)
    track = _tracker(progress, f"raw engine again, batch {same}", len(sample))
    again = (await raw_engine(engine, sample, max_tokens, same, track)).summary()
    best = max(raw, key=lambda size: float(raw[size]["tokens_per_s"]))
    naive_summary = naive.summary()
    summary = phase.summary()
    bracket = [float(raw[same]["tokens_per_s"]), float(again["tokens_per_s"])]
    same_tps = statistics.fmean(bracket)
    batches = batch_distribution(before, after)
    busy_s = busy_after - busy_before
    tokens = sum(o.completion_tokens for o in phase.outcomes if o.succeeded)
    # A full batch's call against the raw call of the same size, both medians: whether
    # the engine runs slower in the pipeline, apart from how the pipeline feeds it.
    full_ms = full_batch_call_ms(calls, same)
    raw_ms = statistics.fmean([float(raw[same]["p50_ms"]), float(again["p50_ms"])])
    return {
        "engine": model,
        "device": getattr(engine, "device", "cpu"),
        "conversations": len(work),
        "turns": len(work[0].messages),
        "max_tokens": max_tokens,
        **summary,
        "cpu_ms_per_turn": per_turn_ms(cpu_used, int(summary["turns_verified"])),
        "stage_p50_ms": stages,
        "load_average_at_start": round(load, 2),
        "batch_sizes": batches,
        "engine_in_pipeline": {
            "busy_share": round(busy_s / phase.elapsed_s, 4),
            "mean_call_ms": round(1000 * busy_s / batches["engine_calls"], 3)
            if batches["engine_calls"]
            else 0.0,
            "tokens_per_busy_s": round(tokens / busy_s, 1) if busy_s else 0.0,
            "wall_busy_share": round(wall_busy_s / phase.elapsed_s, 4),
            "full_batch_calls": sum(1 for n, _ in calls if n == same),
            "full_batch_call_p50_ms": full_ms,
            "full_batch_call_over_raw": round(full_ms / raw_ms, 3)
            if full_ms is not None and raw_ms
            else None,
        },
        "baselines": {
            "raw_engine": {
                "best_batch_size": best,
                "tokens_per_s": raw[best]["tokens_per_s"],
                "same_batch_size": same,
                "tokens_per_s_at_same_before_after": bracket,
                "call_p50_ms_at_same_before_after": [raw[same]["p50_ms"], again["p50_ms"]],
                "pipeline_share_at_same_batch_size": round(
                    summary["tokens_per_s"] / same_tps if same_tps else 0.0, 3
                ),
                "tokens_per_s_by_batch_size": {
                    str(size): r["tokens_per_s"] for size, r in raw.items()
                },
            },
            "one_at_a_time": {
                key: raw[1][key] for key in ("tokens_per_s", "turns_per_s", "p50_ms", "p99_ms")
            },
            "naive_resend": {
                "batch_size": settings.batch_max_size,
                **{
                    key: naive_summary[key]
                    for key in (
                        "steve_min_tps",
                        "turns_per_s",
                        "tokens_per_s",
                        "fact_recalled",
                        "fact_asked",
                        "mean_prompt_tokens",
                    )
                },
            },
        },
    }


def report(results: Sequence[dict[str, Any]]) -> str:
    """Two Markdown tables: the pipeline's figures, then the baselines beside them."""
    lines = [
        "| conversations x turns | steve_min_tps | verified turns | fact recalled "
        "| p50 / p95 / p99 ms | CPU ms per turn | tokens/s | mean prompt tokens "
        "| engine calls (mean batch) | batch sizes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        batches = r["batch_sizes"]
        cpu = r["cpu_ms_per_turn"]
        sizes = ", ".join(f"{k}: {v}" for k, v in batches["histogram"].items())
        lines.append(
            f"| {r['conversations']} x {r['turns']} | **{r['steve_min_tps']:.1f}** "
            f"| {r['turns_verified']}/{r['turns_total']} "
            f"| {r['fact_recalled']}/{r['fact_asked']} "
            f"| {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} "
            f"| {cpu['total']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['mean_prompt_tokens']:.0f} "
            f"| {batches['engine_calls']} ({batches['mean']:.1f}) | {sizes} |"
        )
    lines += [
        "",
        "| conversations x turns | pipeline tokens/s | raw engine, best batch: tokens/s "
        "| raw engine tokens/s by batch size | pipeline / raw at the batch max "
        "(raw before, after) | engine in the pipeline: busy (calls summed; any running), "
        "mean call ms, tokens/s busy "
        "| a full batch's call in the pipeline: p50 ms (over the raw call's p50) "
        "| one at a time: tokens/s (p50 ms) "
        "| naive resend: steve_min_tps, tokens/s, fact recalled, mean prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["baselines"]
        raw, one, naive = base["raw_engine"], base["one_at_a_time"], base["naive_resend"]
        by_size = ", ".join(f"{k}: {v:.1f}" for k, v in raw["tokens_per_s_by_batch_size"].items())
        before, after = raw["tokens_per_s_at_same_before_after"]
        busy = r["engine_in_pipeline"]
        full = busy["full_batch_call_p50_ms"]
        over = busy["full_batch_call_over_raw"]
        lines.append(
            f"| {r['conversations']} x {r['turns']} | {r['tokens_per_s']:.1f} "
            f"| {raw['tokens_per_s']:.1f} (batch {raw['best_batch_size']}) | {by_size} "
            f"| {raw['pipeline_share_at_same_batch_size']:.0%} "
            f"(batch {raw['same_batch_size']}; {before:.1f}, {after:.1f}) "
            f"| {busy['busy_share']:.0%}; {busy['wall_busy_share']:.0%}, "
            f"{busy['mean_call_ms']:.0f}, "
            f"{busy['tokens_per_busy_s']:.1f} "
            + (
                f"| {full:.0f} ({over:.2f}; {busy['full_batch_calls']} calls) "
                if full is not None and over is not None
                else "| none at the batch max "
            )
            + f"| {one['tokens_per_s']:.1f} ({one['p50_ms']:.0f}) "
            f"| {naive['steve_min_tps']:.1f}, {naive['tokens_per_s']:.1f}, "
            f"{naive['fact_recalled']}/{naive['fact_asked']}, {naive['mean_prompt_tokens']:.0f} |"
        )
    lines += [
        "",
        "CPU milliseconds per verified turn, by process (the pipeline phase only):",
        "",
        "| conversations x turns | "
        + " | ".join(results[0]["cpu_ms_per_turn"]["by_process"])
        + " |",
        "|---|" + "---|" * len(results[0]["cpu_ms_per_turn"]["by_process"]),
    ]
    for r in results:
        by = r["cpu_ms_per_turn"]["by_process"]
        cells = " | ".join(
            f"{by.get(k, 0.0):.3f}" for k in results[0]["cpu_ms_per_turn"]["by_process"]
        )
        lines.append(f"| {r['conversations']} x {r['turns']} | {cells} |")
    lines += [
        "",
        "Where a turn's time goes: median milliseconds of each stage of the jobs' "
        "timeline (accepted → admitted → enriched → batched → generated → recorded → "
        "replied):",
        "",
        "| conversations x turns | " + " | ".join(name for name, _, _ in STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for r in results:
        stages = r["stage_p50_ms"]
        cells = " | ".join(
            "n/a" if stages.get(name) is None else f"{stages[name]:.1f}" for name, _, _ in STAGES
        )
        lines.append(f"| {r['conversations']} x {r['turns']} | {cells} |")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """A PNG of steve_min_tps and p99 latency against concurrent conversations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["conversations"] for r in results]
    figure, left = plt.subplots(figsize=(7, 4.2))
    [tps] = left.plot(
        xs, [r["steve_min_tps"] for r in results], "o-", color="tab:blue", label="steve_min_tps"
    )
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("concurrent conversations")
    left.set_ylabel("steve_min_tps (verified turns/s)", color="tab:blue")
    right = left.twinx()
    [p99] = right.plot(xs, [r["p99_ms"] for r in results], "s--", color="tab:red", label="p99")
    left.legend(handles=[tps, p99], loc="upper left")
    right.set_ylabel("p99 end-to-end latency (ms)", color="tab:red")
    engine = results[0]["engine"]
    left.set_title(f"kontext bench, {engine} engine, {results[0]['turns']} turns per conversation")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def publish(
    results: Sequence[dict[str, Any]],
    settings: Settings,
    command: str,
    path: Path = Path("docs/benchmarks.md"),
) -> tuple[str, Path | None]:
    """Append the run's section to ``path`` (with a plot beside it when it swept
    concurrency); the section's tables and the plot's path."""
    body = report(results)
    figure: Path | None = None
    if len(results) > 1:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        figure = path.parent / f"bench-{results[0]['engine']}-{stamp}.png"
        plot(results, figure)
        body += f"\n\n![steve_min_tps and p99 against concurrency]({figure.name})"
    engine, turns = results[0]["engine"], results[0]["turns"]
    what = engine_setup(engine, settings)
    bench.record(
        f"Steve Min TPS, closed-loop multi-turn: `{engine}` engine",
        f"Engine `{engine}`{what} on {results[0].get('device', 'cpu')}, embedder "
        f"`{settings.embedder}`{embedder_setup(settings)}; processes: "
        f"{results[0]['layout']}, the load generator in its own, submitting over "
        f"{results[0].get('submitted_over', 'http')}; "
        f"{results[0].get('tracing', 'tracing off')}; "
        f"load average {results[0]['load_average_at_start']} at the start; "
        f"{turns} turns per conversation replaying "
        f"chitchat-dataset 0.9.0 lines, a fact planted in turn 1 and asked for in turn "
        f"{turns}; max_tokens {results[0]['max_tokens']}, batch max "
        f"{settings.batch_max_size} / {settings.batch_max_wait_ms} ms, "
        f"{settings.topic_partitions} partitions, summariser `{settings.summarizer}`; broker, "
        f"Postgres, workers and load generator on this machine. Command: `{command}`.",
        body,
        path,
    )
    return body, figure


def precision(settings: Settings) -> str:
    """The dtype that ``settings`` give the transformers models on this machine."""
    return str(device.dtype(settings, device.device(settings))).removeprefix("torch.")


def embedder_setup(settings: Settings) -> str:
    """What a section says of the embedder beside its name."""
    return f" ({precision(settings)})" if settings.embedder == "minilm" else ""


def engine_setup(engine: str, settings: Settings) -> str:
    """What a section says of the engine beside its name (empty: nothing to say)."""
    if engine == "null":
        return " (no model: pipeline overhead only)"
    if engine == "smollm2":
        return f" ({smollm2.batching(settings)} batching, {precision(settings)})"
    if engine == "vllm" and settings.vllm_max_num_seqs is not None:
        return f" (max_num_seqs {settings.vllm_max_num_seqs})"
    return ""
