"""Dated sections appended to the project's docs (benchmarks, reliability), each with
the machine it was measured on."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path


def machine() -> str:
    """This machine in one line: OS, architecture, cores, Python, and a GPU if torch
    (already loaded by a model engine) sees one."""
    line = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    torch = sys.modules.get("torch")  # never imported for this
    if torch is not None and torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return line


def append(path: Path, heading: str, title: str, setup: str, body: str) -> None:
    """Append ``## title — date`` with the machine, ``setup`` and ``body`` to ``path``
    (created with ``heading`` as its first lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(heading)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as out:
        out.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}. {setup}\n\n{body}\n")
