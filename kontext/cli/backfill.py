"""``kontext backfill``: run an OpenAI Batch file through a Kontext API, resumably."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from kontext import stackfile
from kontext.app.process import console, run_until_signal

DEFAULT_API = "http://127.0.0.1:8000"


def backfill(
    source: Annotated[Path, typer.Argument(help="OpenAI Batch input file (JSONL).", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (OpenAI Batch JSONL).")],
    errors: Annotated[
        Path | None,
        typer.Option(help="Error file (bad lines and failed requests). Default: OUT.errors.jsonl"),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            help="Kontext API URL. Default: KONTEXT_API_URL, else the running `kontext up`'s "
            f"(its stack file), else {DEFAULT_API}.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="KONTEXT_API_KEY", help="API key (kx_...).", show_default=False
        ),
    ] = None,
) -> None:
    """Run a batch file through a Kontext API at low priority, with progress; rerun to resume."""
    from producers.backfill import Backfill

    found = stackfile.settings()
    api = api or found.api_url or DEFAULT_API
    if api_key is None and found.api_key is not None:
        api_key = found.api_key.get_secret_value()

    runner = Backfill(
        api, source, out, errors or out.with_suffix(".errors.jsonl"), console, api_key=api_key
    )
    code = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        code = await runner.run(stop)

    run_until_signal(main)
    raise typer.Exit(code)
