"""The chaos table, and dated sections in docs/reliability.md."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kontext.chaos.scenarios import Row

DOC = Path("docs/reliability.md")


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | submitted | answered | lost | answered twice | recovery | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        recovery = f"{r.recovery_s:.1f} s" if r.recovery_s is not None else "never"
        lines.append(
            f"| {r.scenario} | {r.submitted} | {r.answered} | {r.lost} | {r.answered_twice} "
            f"| {recovery} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def record(title: str, setup: str, body: str, path: Path = DOC) -> None:
    """Append a dated section, with the machine it ran on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(
            "# Reliability\n\nFigures from `make chaos` (fault injection) and `make fuzz`.\n"
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as out:
        out.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}. {setup}\n\n{body}\n")
