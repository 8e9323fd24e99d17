"""The benchmark commands: ``kontext bench``, ``bench-memory``, ``bench-embeddings``,
``bench-lanes`` and ``bench-policies``; each prints its tables and appends them to
docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated

import typer

from kontext.app.embedded import embedded
from kontext.app.process import (
    Stopped,
    console,
    run_until_signal,
    run_work,
    settings_for,
    setup_logging,
    until_stopped,
)
from kontext.app.runtime import SERVICES, Runtime, prepare
from kontext.store import keys

SeparateInference = Annotated[
    bool,
    typer.Option(
        "--separate-inference",
        help="Run the inference worker in its own process, as production does "
        "(`kontext worker inference`).",
    ),
]


def without_inference(separate: bool) -> list[str]:
    """The services of this process: all, or all but inference when it runs apart."""
    return [s for s in SERVICES if not (separate and s == "inference")]


def _positive_ints(text: str) -> list[int]:
    """A comma-separated option's whole numbers of 1 or more; empty if any is not one."""
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        return []
    return numbers if min(numbers) >= 1 else []


def bench_memory(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2",
    turns: Annotated[str, typer.Option(help="Conversation lengths, comma-separated.")] = "10,20,40",
    runs: Annotated[int, typer.Option(help="Conversations per length.")] = 1,
    max_tokens: Annotated[int, typer.Option()] = 16,
) -> None:
    """Kontext's server-side memory against naive full-history resend, same engine, same run."""
    from kontext.bench import memory as bench
    from producers.client import KontextClient

    setup_logging(False)
    lengths = _positive_ints(turns)
    if not lengths:
        raise typer.BadParameter("whole numbers of 1 or more, comma-separated: 10,20,40")
    # No response cache: repeated runs of the same script must reach the engine.
    base = settings_for([engine], 0).model_copy(update={"cache_ttl_s": 0})
    with embedded(base) as settings:

        async def measure(runtime: Runtime, url: str) -> list[bench.Row]:
            key = await keys.mint(settings.dsn)
            rows: list[bench.Row] = []
            async with KontextClient(
                url, settings.bootstrap, topics=settings.topics, api_key=key
            ) as client:
                for n in lengths:
                    rows.append(await bench.kontext_run(client, engine, n, runs, max_tokens))
                    console.print(f"kontext, {n} turns: done")
            for n in lengths:
                rows.append(await bench.naive_run(runtime.engines[0], n, runs, max_tokens))
                console.print(f"naive resend, {n} turns: done")
            return rows

        rows = run_work(settings, measure)
    rows.sort(key=lambda r: (r.turns, r.mode))
    body = bench.table(rows)
    print(body)
    bench.record(
        "Conversation memory vs naive full-history resend",
        f"Engine `{engine}`, max_tokens {max_tokens}, {runs} conversation(s) per length, "
        f"summariser `{settings.summarizer}`, prompt budget "
        f"{settings.context_budget_tokens or 'model window'}; command: "
        f"`kontext bench-memory --engine {engine} --turns {turns} --runs {runs}`.",
        body,
    )


def bench_embeddings(
    texts: Annotated[int, typer.Option(min=1, help="Chat lines to embed at each size.")] = 256,
    batch_sizes: Annotated[
        str, typer.Option(help="Texts per model call, comma-separated.")
    ] = "1,4,16",
) -> None:
    """The embedding model alone in float32 and bfloat16: time per text and how close the
    vectors are, to see which dtype this machine's CPU runs faster."""
    from rich.progress import Progress

    from kontext.bench import embeddings as bench
    from kontext.bench import memory

    sizes = _positive_ints(batch_sizes)
    if not sizes:
        raise typer.BadParameter("whole numbers of 1 or more, comma-separated: 1,4,16")
    setup_logging(False)
    try:
        lines = bench.chat_lines(texts)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--texts") from None
    with Progress(console=console, refresh_per_second=2) as progress:
        total = len(bench.DTYPES) * len(sizes) * texts
        task = progress.add_task("MiniLM, float32 then bfloat16", total=total)
        rows = bench.measure(lines, sizes, lambda n: progress.advance(task, n))
    body = bench.table(rows)
    print(body)
    memory.record(
        "Embeddings: MiniLM in float32 and bfloat16", bench.setup(texts, batch_sizes), body
    )


def bench_lanes(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "tiny",
    probes: Annotated[int, typer.Option(min=10, help="Interactive jobs per phase.")] = 100,
    lines: Annotated[int, typer.Option(min=1, help="Lines in the background backfill.")] = 10_000,
    max_tokens: Annotated[int, typer.Option(min=1)] = 16,
    line_max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="The backfill lines' max_tokens (default: --max-tokens)."),
    ] = None,
    separate_inference: SeparateInference = False,
) -> None:
    """Interactive p50/p95/p99 latency without, then during, a large batch backfill."""
    import httpx

    from kontext.app.children import spawned
    from kontext.bench import lanes as bench_lanes
    from kontext.bench import memory as bench
    from kontext.bench.turns import engine_setup

    setup_logging(False)
    # No response cache: every probe and line must reach the engine.
    base = settings_for([engine], 0).model_copy(update={"cache_ttl_s": 0})
    with embedded(base) as settings:

        async def measure(url: str, metrics_urls: list[str]) -> bench_lanes.Result:
            key = await keys.mint(settings.dsn)
            auth = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as http:
                return await bench_lanes.run(
                    http, engine, probes, lines, max_tokens, metrics_urls, line_max_tokens
                )

        async def work(runtime: Runtime, url: str) -> bench_lanes.Result:
            if not separate_inference:
                return await measure(url, [])
            overrides = {"KONTEXT_CACHE_TTL_S": "0"}
            async with spawned(settings, [["inference"]], overrides) as children:
                [child] = children.all
                return await children.guard(measure(url, [child.metrics_url]))

        result = run_work(settings, work, without_inference(separate_inference))
    body = bench_lanes.table(result)
    print(body)
    where = "its own process" if separate_inference else "the same process as the rest"
    what = engine_setup(engine, settings)
    lines_limit = f" (the lines' {line_max_tokens})" if line_max_tokens else ""
    command = (
        f"kontext bench-lanes --engine {engine} --probes {probes} --lines {lines}"
        f" --max-tokens {max_tokens}"
        + (f" --line-max-tokens {line_max_tokens}" if line_max_tokens else "")
        + (" --separate-inference" if separate_inference else "")
    )
    bench.record(
        "Interactive latency during a batch backfill",
        f"Engine `{engine}`{what}, max_tokens {max_tokens}{lines_limit}, interactive jobs "
        f"one at a time, background share {settings.background_share}, pacing window "
        f"{settings.pacing_window_ms} ms, batch max size {settings.batch_max_size}, "
        f"inference worker in {where}; command: `{command}`.",
        body,
    )


EmbedderOption = Annotated[
    str, typer.Option(help="minilm (all-MiniLM-L6-v2) or hash (feature hashing, no model).")
]


def bench_layout(separate_inference: bool) -> list[list[str]]:
    """The benchmark's processes: the API in one, the workers in another (inference in
    a third with ``separate_inference``); the load generator is the bench itself."""
    workers = [name for name in SERVICES if name != "api"]
    if not separate_inference:
        return [["api"], workers]
    return [["api"], [name for name in workers if name != "inference"], ["inference"]]


def bench_command(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2",
    conversations: Annotated[
        str, typer.Option(help="Concurrent conversations; a comma list sweeps them (1,4,16).")
    ] = "16",
    turns: Annotated[int, typer.Option(min=2, help="Turns per conversation.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    summarizer: Annotated[str, typer.Option(help="extractive or model.")] = "extractive",
    embedder: EmbedderOption = "minilm",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout; logs on stderr.")
    ] = False,
    separate_inference: SeparateInference = False,
    via: Annotated[
        str,
        typer.Option(
            help="How the load generator submits: http (POST /v1/jobs) or kafka (the "
            "submissions topic, answered by correlation id).",
        ),
    ] = "http",
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="Trace every job (100% sampled) to a local OTLP/HTTP receiver in this "
            "process; compare CPU ms per turn with a run without (tracing off).",
        ),
    ] = False,
) -> None:
    """Steve Min TPS: C conversations x T turns through the pipeline, with baselines.

    The stack runs in child processes (the API in one, the workers in another), the
    load generator in this one; the figures include CPU milliseconds per turn summed
    over every process, broker and Postgres included. Each job's timeline is always
    kept; --trace exports every span too."""
    import json
    from contextlib import AsyncExitStack, redirect_stdout

    from rich.progress import Progress

    from kontext.app.children import spawned
    from kontext.bench import otlp
    from kontext.bench import turns as benchmark
    from kontext.bench.cpu import CpuMeter, stack_roots
    from kontext.connections import create_pool
    from producers.client import KontextClient
    from workers.engines import load_engine

    sizes = _positive_ints(conversations)
    if not sizes or summarizer not in ("extractive", "model"):
        console.print(
            "[red]--conversations takes positive integers (1,4,16); "
            "--summarizer extractive or model"
        )
        raise typer.Exit(2)
    if embedder not in ("minilm", "hash"):
        console.print(f"[red]unknown embedder {embedder!r}; known: minilm, hash")
        raise typer.Exit(2)
    if via not in ("http", "kafka"):
        console.print(f"[red]--via takes http or kafka, not {via!r}")
        raise typer.Exit(2)
    stdout = sys.stdout
    setup_logging(False)
    layout = bench_layout(separate_inference)
    with redirect_stdout(sys.stderr if as_json else stdout):
        work = benchmark.scripts(max(sizes), turns)
        # The response cache off: runs replay the same prompts, and a cached answer
        # from an earlier run would skip the engine being measured.
        overrides = {
            "KONTEXT_SUMMARIZER": summarizer,
            "KONTEXT_CACHE_TTL_S": "0",
            "KONTEXT_EMBEDDER": embedder,
            # Tracing off unless --trace (whatever this shell exports).
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        }
        tracing_label = "tracing 100% sampled (local OTLP receiver)" if trace else "tracing off"
        base = settings_for([engine], 0).model_copy(
            update={"summarizer": summarizer, "cache_ttl_s": 0.0, "embedder": embedder}
        )
        results: list[dict[str, object]] = []
        interrupted = False
        with embedded(base) as settings:

            async def main(stop: asyncio.Event) -> None:
                nonlocal interrupted
                await prepare(settings)
                key = await keys.mint(settings.dsn)
                direct = await load_engine(engine, settings)
                pool = await create_pool(settings, max_size=2)

                async def measure(api_url: str, metrics_url: str, meter: CpuMeter) -> None:
                    with Progress(console=console, refresh_per_second=2) as progress:
                        async with KontextClient(
                            api_url, settings.bootstrap, topics=settings.topics, api_key=key
                        ) as client:
                            await benchmark.warm_up(client, direct, engine, max_tokens)
                            for size in sizes:
                                result = await benchmark.measure(
                                    settings,
                                    pool,
                                    client,
                                    direct,
                                    work[:size],
                                    max_tokens,
                                    progress,
                                    metrics_url,
                                    meter,
                                    over_kafka=via == "kafka",
                                )
                                result["layout"] = " | ".join(", ".join(g) for g in layout)
                                result["tracing"] = tracing_label
                                result["submitted_over"] = via
                                results.append(result)

                try:
                    async with AsyncExitStack() as exits:
                        env = dict(overrides)
                        if trace:
                            receiver = await exits.enter_async_context(otlp.sink())
                            env.update(
                                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                                OTEL_TRACES_SAMPLER="parentbased_always_on",
                            )
                        children = await exits.enter_async_context(spawned(settings, layout, env))
                        inference = children.running("inference")
                        assert inference is not None and children.api_url is not None
                        roots = stack_roots()
                        roots |= {", ".join(c.services): c.pid for c in children.all}
                        work_done = measure(
                            children.api_url, inference.metrics_url, CpuMeter(roots)
                        )
                        try:
                            await until_stopped(children.guard(work_done), stop)
                        except Stopped:
                            interrupted = True
                finally:
                    await pool.close()
                    await direct.close()

            run_until_signal(main)
        command = (
            f"kontext bench --engine {engine} --conversations {conversations} "
            f"--turns {turns} --max-tokens {max_tokens} --embedder {embedder}"
            + (" --separate-inference" if separate_inference else "")
            + (" --via kafka" if via == "kafka" else "")
            + (" --trace" if trace else "")
        )
        if not results:
            console.print("[red]the benchmark stopped before it measured anything")
            raise typer.Exit(1)
        if interrupted:
            console.print(f"[yellow]stopped: {len(results)} of {len(sizes)} runs measured")
        body, plot = benchmark.publish(results, settings, command)
    if as_json:
        output = results[0] if len(results) == 1 else {"runs": results, "plot": str(plot)}
        print(json.dumps(output), file=stdout, flush=True)
    else:
        print(body)


def bench_policies_command(
    requests: Annotated[int, typer.Option(min=10, help="Requests per run.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 8,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of chain off, then on.")] = 2,
) -> None:
    """Per-request overhead of the full policy chain: off vs on, same workload, null engine."""
    import json

    from kontext.bench import policies as bench_policies

    setup_logging(False)
    with embedded(settings_for(["null"], 0)) as settings:
        out: dict[str, object] = {}

        async def main(stop: asyncio.Event) -> None:
            await prepare(settings)
            load = [os.getloadavg()[0]]
            try:
                runs = await until_stopped(
                    bench_policies.measure(settings, requests, concurrency, rounds), stop
                )
            except Stopped:
                return
            load.append(os.getloadavg()[0])
            micro = await bench_policies.hooks()
            body, summary = bench_policies.report(runs, micro)
            command = (
                f"kontext bench-policies --requests {requests} --concurrency {concurrency} "
                f"--rounds {rounds}"
            )
            bench_policies.publish(body, requests, concurrency, rounds, command, load)
            out.update(summary=summary, body=body)

        run_until_signal(main)
    if not out:
        console.print("[red]the benchmark stopped before it measured anything")
        raise typer.Exit(1)
    print(out.get("body", ""))
    print(json.dumps(out.get("summary", {})))
