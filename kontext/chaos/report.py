"""The chaos table, and dated sections in docs/reliability.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kontext.app import report
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


def record(title: str, setup: str, body: str, path: Path = DOC) -> None:
    """Append a dated section to docs/reliability.md."""
    heading = "# Reliability\n\nFigures from `make chaos` (fault injection) and `make fuzz`.\n"
    report.append(path, heading, title, setup, body)
