"""The ``kontext`` command: run the stack, one worker, migrations, or the demo."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar, cast
from uuid import UUID

import typer
from rich.console import Console
from rich.logging import RichHandler

from kontext import keys_cli
from kontext.runtime import SERVICES, Runtime, embedded, prepare, run_while
from kontext.settings import Settings

app = typer.Typer(help="Kontext: an event-driven LLM job pipeline.", no_args_is_help=True)
console = Console(stderr=True)
T = TypeVar("T")

EngineOption = Annotated[
    list[str] | None,
    typer.Option("--engine", "-e", help="Model to serve (repeatable). Default: KONTEXT_ENGINES."),
]
PortOption = Annotated[int | None, typer.Option("--port", "-p", help="API port (0: any free one).")]


def _logging(verbose: bool) -> None:
    # Model loads print tqdm bars per weight file; the CLI reports its own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("aiokafka", "faust", "mode", "kafka", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


SeparateInference = Annotated[
    bool,
    typer.Option(
        "--separate-inference",
        help="Run the inference worker in its own process, as production does "
        "(`kontext worker inference`).",
    ),
]


def _without_inference(separate: bool) -> list[str]:
    """The services of this process: all, or all but inference when it runs apart."""
    return [s for s in SERVICES if not (separate and s == "inference")]


def _settings(engines: list[str] | None, port: int | None) -> Settings:
    settings = Settings()
    updates: dict[str, object] = {}
    if engines:
        updates["engines"] = engines
    if port is not None:
        updates["api_port"] = port
    return settings.model_copy(update=updates)


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM asks it to stop."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(wrapper())


def _run_work(
    settings: Settings,
    work: Callable[[Runtime, str], Awaitable[T]],
    services: Sequence[str] = SERVICES,
) -> T:
    """Run ``work`` against the services of this process (``run_while``), until it ends
    or SIGINT/SIGTERM; a failure is one red line and exit code 1, not a traceback."""
    result: list[T] = []

    async def main(stop: asyncio.Event) -> None:
        result.append(await run_while(settings, work, stop, services))

    try:
        _run(main)
    except RuntimeError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    return result[0]


async def _serve(settings: Settings, services: Sequence[str], stop: asyncio.Event) -> None:
    runtime = Runtime(settings)

    def ready(rt: Runtime) -> None:
        port = rt.api_port
        api = f"API http://{settings.api_host}:{port}" if port is not None else "no API"
        print(
            f"Kontext ready: {api}; services {', '.join(services)}; "
            f"models {', '.join(settings.engines)}; Kafka {settings.kafka_bootstrap_servers}",
            flush=True,
        )

    try:
        await runtime.start(services)
        await runtime.run(stop, ready)
    finally:
        console.print("Kontext stopped.")


@app.command()
def up(engine: EngineOption = None, port: PortOption = None, verbose: bool = False) -> None:
    """Run the API and every worker in one process.

    Starts an embedded Kafka broker and PostgreSQL unless KAFKA_BOOTSTRAP_SERVERS
    and DATABASE_URL are set; creates topics and applies migrations.
    """
    _logging(verbose)
    with embedded(_settings(engine, port)) as settings:

        async def main(stop: asyncio.Event) -> None:
            await prepare(settings)
            key = await keys_cli.mint(settings.dsn)
            print(f"Dev API key (tenant default): {key}", flush=True)
            await _serve(settings, SERVICES, stop)

        _run(main)


@app.command()
def worker(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    engine: EngineOption = None,
    port: PortOption = None,
    verbose: bool = False,
) -> None:
    """Run one service against external Kafka and Postgres (how production scales out)."""
    _logging(verbose)
    if name not in SERVICES:
        console.print(f"[red]unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    settings = _settings(engine, port)
    if not settings.kafka_bootstrap_servers or not settings.database_url:
        console.print("[red]kontext worker needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL")
        raise typer.Exit(2)
    _run(lambda stop: _serve(settings, [name], stop))


@app.command("health")
def health_command(
    max_age: Annotated[float, typer.Option(help="Oldest heartbeat that passes, in seconds.")] = 30,
) -> None:
    """Exit 0 if this machine's worker process is alive (its KONTEXT_HEALTH_FILE is fresh)."""
    from kontext.health import age_s

    path = Settings().health_file
    if path is None:
        console.print("[red]KONTEXT_HEALTH_FILE is not set")
        raise typer.Exit(2)
    age = age_s(path)
    if age is None or age > max_age:
        seen = "no heartbeat" if age is None else f"last heartbeat {age:.0f}s ago"
        console.print(f"[red]unhealthy: {seen} ({path})")
        raise typer.Exit(1)
    console.print(f"healthy: heartbeat {age:.1f}s ago")


@app.command("migrate")
def migrate_command() -> None:
    """Apply database migrations to DATABASE_URL."""
    settings = Settings()
    if not settings.database_url:
        console.print("[red]DATABASE_URL is not set")
        raise typer.Exit(2)
    asyncio.run(prepare(settings))
    console.print("database is at the latest migration")


webhooks_app = typer.Typer(help="Webhook deliveries: list them, redeliver one.")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(keys_cli.app, name="keys")


def _database_settings() -> Settings:
    settings = Settings()
    if not settings.database_url:
        console.print("[red]DATABASE_URL is not set")
        raise typer.Exit(2)
    return settings


@webhooks_app.command("list")
def webhooks_list(
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
    job_id: Annotated[str | None, typer.Option("--job-id")] = None,
    limit: int = 20,
) -> None:
    """Print recent deliveries as JSON lines, with their attempts."""
    from kontext import deliveries
    from kontext.connections import create_pool
    from schemas.webhooks import DeliveryStatus

    settings = _database_settings()
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


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    delivery_id: Annotated[str, typer.Argument(help="The delivery id.")],
) -> None:
    """Queue a delivery for an attempt now, with a fresh retry schedule (even when dead)."""
    from kontext import deliveries
    from kontext.connections import create_pool

    settings = _database_settings()
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


@app.command()
def backfill(
    source: Annotated[Path, typer.Argument(help="OpenAI Batch input file (JSONL).", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (OpenAI Batch JSONL).")],
    errors: Annotated[
        Path | None,
        typer.Option(help="Error file (bad lines and failed requests). Default: OUT.errors.jsonl"),
    ] = None,
    api: Annotated[str, typer.Option(help="Kontext API URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="KONTEXT_API_KEY", help="API key (kx_...).", show_default=False
        ),
    ] = None,
) -> None:
    """Run a batch file through a Kontext API at low priority, with progress; rerun to resume."""
    from kontext.backfill import Backfill

    runner = Backfill(
        api, source, out, errors or out.with_suffix(".errors.jsonl"), console, api_key=api_key
    )
    code = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        code = await runner.run(stop)

    _run(main)
    raise typer.Exit(code)


DEMO_TURNS = (
    "Hi! My name is Ada and I live in Lisbon. Please remember that.",
    "Suggest one hobby for a rainy afternoon, in one sentence.",
    "What is my name, and in which city do I live?",
)


@app.command()
def demo(engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2") -> None:
    """Start everything on the embedded defaults and run a scripted 3-turn conversation."""
    from producers.client import KontextClient

    _logging(False)
    with embedded(_settings([engine], 0)) as settings:

        async def conversation(runtime: Runtime, url: str) -> None:
            key = await keys_cli.mint(settings.dsn)
            async with KontextClient(
                url, settings.bootstrap, topics=settings.topics, api_key=key
            ) as client:
                conversation_id = None
                for number, text in enumerate(DEMO_TURNS, 1):
                    began = time.perf_counter()
                    reply = await client.chat(
                        model=engine,
                        messages=[{"role": "user", "content": text}],
                        conversation_id=conversation_id,
                        max_tokens=48,
                        timeout=120,
                    )
                    elapsed = (time.perf_counter() - began) * 1000
                    conversation_id = reply.conversation_id
                    if reply.result is None:
                        raise RuntimeError(f"turn {number} failed: {reply.error}")
                    answer = reply.result.choices[0].message.content.strip()
                    context = reply.result.context
                    earlier = len(context.turns) if context else 0
                    print(f"\n[turn {number}] user: {text}")
                    print(f"[turn {number}] assistant: {answer}")
                    print(f"[turn {number}] {elapsed:.0f} ms, {earlier} earlier turns in context")
            print(f"\nconversation {conversation_id}: {len(DEMO_TURNS)} turns", flush=True)

        _run_work(settings, conversation)


@app.command("bench-memory")
def bench_memory(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2",
    turns: Annotated[str, typer.Option(help="Conversation lengths, comma-separated.")] = "10,20,40",
    runs: Annotated[int, typer.Option(help="Conversations per length.")] = 1,
    max_tokens: Annotated[int, typer.Option()] = 16,
) -> None:
    """Kontext's server-side memory against naive full-history resend, same engine, same run."""
    from kontext import bench
    from producers.client import KontextClient

    _logging(False)
    lengths = [int(n) for n in turns.split(",")]
    # No response cache: repeated runs of the same script must reach the engine.
    base = _settings([engine], 0).model_copy(update={"cache_ttl_s": 0})
    with embedded(base) as settings:

        async def measure(runtime: Runtime, url: str) -> list[bench.Row]:
            key = await keys_cli.mint(settings.dsn)
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

        rows = _run_work(settings, measure)
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


@app.command("bench-lanes")
def bench_lanes(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "tiny",
    probes: Annotated[int, typer.Option(min=10, help="Interactive jobs per phase.")] = 100,
    lines: Annotated[int, typer.Option(min=1, help="Lines in the background backfill.")] = 10_000,
    max_tokens: Annotated[int, typer.Option(min=1)] = 16,
    separate_inference: SeparateInference = False,
) -> None:
    """Interactive p50/p95/p99 latency without, then during, a large batch backfill."""
    import httpx

    from kontext import bench, bench_lanes
    from kontext.bench_process import inference_process

    _logging(False)
    # No response cache: every probe and line must reach the engine.
    base = _settings([engine], 0).model_copy(update={"cache_ttl_s": 0})
    with embedded(base) as settings:

        async def measure(url: str, metrics_urls: list[str]) -> bench_lanes.Result:
            key = await keys_cli.mint(settings.dsn)
            auth = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as http:
                return await bench_lanes.run(http, engine, probes, lines, max_tokens, metrics_urls)

        async def work(runtime: Runtime, url: str) -> bench_lanes.Result:
            if not separate_inference:
                return await measure(url, [])
            log_path = settings.data_dir / "bench-inference.log"
            overrides = {"KONTEXT_CACHE_TTL_S": "0"}
            async with inference_process(settings, engine, log_path, overrides) as child:
                return await child.guard(measure(url, [child.metrics_url]))

        result = _run_work(settings, work, _without_inference(separate_inference))
    body = bench_lanes.table(result)
    print(body)
    where = "its own process" if separate_inference else "the same process as the rest"
    bench.record(
        "Interactive latency during a batch backfill",
        f"Engine `{engine}`, max_tokens {max_tokens}, interactive jobs one at a time, "
        f"background share {settings.background_share}, pacing window "
        f"{settings.pacing_window_ms} ms, batch max size {settings.batch_max_size}, "
        f"inference worker in {where}; command: "
        f"`kontext bench-lanes --engine {engine} --probes {probes} --lines {lines}"
        + (" --separate-inference`." if separate_inference else "`."),
        body,
    )


@app.command("bench")
def bench_command(
    engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2",
    conversations: Annotated[
        str, typer.Option(help="Concurrent conversations; a comma list sweeps them (1,4,16).")
    ] = "16",
    turns: Annotated[int, typer.Option(min=2, help="Turns per conversation.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    summarizer: Annotated[str, typer.Option(help="extractive or model.")] = "extractive",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout; logs on stderr.")
    ] = False,
    separate_inference: SeparateInference = False,
) -> None:
    """Steve Min TPS: C conversations x T turns through the pipeline, with baselines."""
    import json
    from contextlib import redirect_stdout

    from rich.progress import Progress

    from kontext import benchmark
    from kontext.bench_process import inference_process
    from producers.client import KontextClient
    from workers.engines import ENGINE_NAMES, load_engine

    try:
        sizes = [int(n) for n in conversations.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or summarizer not in ("extractive", "model"):
        console.print(
            "[red]--conversations takes positive integers (1,4,16); "
            "--summarizer extractive or model"
        )
        raise typer.Exit(2)
    if engine not in ENGINE_NAMES:
        console.print(f"[red]unknown engine {engine!r}; known: {', '.join(ENGINE_NAMES)}")
        raise typer.Exit(2)
    stdout = sys.stdout
    _logging(False)
    with redirect_stdout(sys.stderr if as_json else stdout):
        work = benchmark.scripts(max(sizes), turns)
        # The response cache off: runs replay the same prompts, and a cached answer
        # from an earlier run would skip the engine being measured.
        base = _settings([engine], 0).model_copy(
            update={"summarizer": summarizer, "cache_ttl_s": 0.0}
        )
        results: list[dict[str, object]] = []
        with embedded(base) as settings:

            async def measure(runtime: Runtime, url: str, metrics_url: str | None) -> None:
                key = await keys_cli.mint(settings.dsn)
                direct = runtime.engines[0] if runtime.engines else None
                direct = direct or await load_engine(engine, settings)
                with Progress(console=console) as progress:
                    async with KontextClient(
                        url, settings.bootstrap, topics=settings.topics, api_key=key
                    ) as client:
                        await benchmark.warm_up(client, direct, engine, max_tokens)
                        for size in sizes:
                            results.append(
                                await benchmark.measure(
                                    runtime,
                                    client,
                                    direct,
                                    work[:size],
                                    max_tokens,
                                    progress,
                                    metrics_url,
                                )
                            )

            async def run(runtime: Runtime, url: str) -> None:
                if not separate_inference:
                    return await measure(runtime, url, None)
                overrides = {"KONTEXT_SUMMARIZER": summarizer, "KONTEXT_CACHE_TTL_S": "0"}
                log_path = settings.data_dir / "bench-inference.log"
                async with inference_process(settings, engine, log_path, overrides) as child:
                    return await child.guard(measure(runtime, url, child.metrics_url))

            _run_work(settings, run, _without_inference(separate_inference))
        command = (
            f"kontext bench --engine {engine} --conversations {conversations} "
            f"--turns {turns} --max-tokens {max_tokens}"
            + (" --separate-inference" if separate_inference else "")
        )
        body, plot = benchmark.publish(results, settings, command)
    if as_json:
        output = results[0] if len(results) == 1 else {"runs": results, "plot": str(plot)}
        print(json.dumps(output), file=stdout, flush=True)
    else:
        print(body)


@app.command("bench-policies")
def bench_policies_command(
    requests: Annotated[int, typer.Option(min=10, help="Requests per run.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 8,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of chain off, then on.")] = 2,
) -> None:
    """Per-request overhead of the full policy chain: off vs on, same workload, null engine."""
    import json

    from kontext import bench_policies

    _logging(False)
    with embedded(_settings(["null"], 0)) as settings:
        out: dict[str, object] = {}

        async def main(stop: asyncio.Event) -> None:
            await prepare(settings)
            load = [os.getloadavg()[0]]
            runs = await bench_policies.measure(settings, requests, concurrency, rounds)
            load.append(os.getloadavg()[0])
            micro = await bench_policies.hooks()
            body, summary = bench_policies.report(runs, micro)
            command = (
                f"kontext bench-policies --requests {requests} --concurrency {concurrency} "
                f"--rounds {rounds}"
            )
            bench_policies.publish(body, requests, concurrency, rounds, command, load)
            out.update(summary=summary, body=body)

        _run(main)
    print(out.get("body", ""))
    print(json.dumps(out.get("summary", {})))


if __name__ == "__main__":  # pragma: no cover
    app()
