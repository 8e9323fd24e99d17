"""The ``kontext`` command: a thin Typer app mounting each room's commands."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError

from kontext.app.children import ChildExited
from kontext.app.embedded import DataDirInUse
from kontext.bench import cli as bench
from kontext.cli import backfill, keys, serve, webhooks
from kontext.connections import Unreachable
from kontext.ports import CannotListen
from kontext.settings import BadSetting, Settings, bad_settings

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
    """The ``kontext`` console script: a setting that cannot be used (exit code 2),
    Postgres or Kafka out of reach, a child process that exited, a data directory
    another stack runs on, or a port that cannot be bound (exit code 1), is one line
    on stderr, not a traceback."""
    try:
        app()
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise  # not the environment's: a fault of Kontext's own
        _fail(bad_settings(exc), 2)
    except BadSetting as exc:
        _fail(exc, 2)
    except (Unreachable, ChildExited, DataDirInUse, CannotListen) as exc:
        _fail(exc, 1)


def _fail(error: Exception, code: int) -> NoReturn:
    typer.echo(f"kontext: {error}", err=True)
    raise SystemExit(code) from None
