"""The ``kontext`` command: a thin Typer app mounting each room's commands."""

from __future__ import annotations

import typer

from kontext.app.children import ChildExited
from kontext.bench import cli as bench
from kontext.cli import backfill, keys, serve, webhooks
from kontext.connections import Unreachable

app = typer.Typer(help="Kontext: an event-driven LLM job pipeline.", no_args_is_help=True)

app.command()(serve.up)
app.command()(serve.worker)
app.command("health")(serve.health_command)
app.command("migrate")(serve.migrate_command)
app.command()(serve.demo)
app.command()(backfill.backfill)
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(keys.app, name="keys")
app.command("bench")(bench.bench_command)
app.command("bench-memory")(bench.bench_memory)
app.command("bench-embeddings")(bench.bench_embeddings)
app.command("bench-lanes")(bench.bench_lanes)
app.command("bench-policies")(bench.bench_policies_command)


def main() -> None:
    """The ``kontext`` console script: Postgres or Kafka out of reach, or a child process
    that exited, is one line on stderr and exit code 1, not a traceback."""
    try:
        app()
    except (Unreachable, ChildExited) as exc:
        typer.echo(f"kontext: {exc}", err=True)
        raise SystemExit(1) from None
