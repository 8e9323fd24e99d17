"""CPU time of every process of a benchmark's stack, read from the kernel (psutil).

CPU seconds per turn, summed over every process (API, workers, broker, Postgres
and the load generator), is the figure to steer by on a shared machine: unlike
turns per second it does not move with what else the machine runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

LOAD_GENERATOR = "load generator"


def _tree_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants: living ones, and the exited ones it
    has reaped (a Postgres server's finished backends)."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total: float = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                mine = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += mine.user + mine.system
    except psutil.NoSuchProcess:
        return 0.0
    return total


def stack_roots() -> dict[str, int]:
    """The embedded broker and Postgres server this process started, by label (none
    when the stack points at external ones)."""
    labels = {"tansu": "broker", "postgres": "postgres"}
    found: dict[str, int] = {}
    for child in psutil.Process(os.getpid()).children():
        try:
            label = labels.get(child.name())
        except psutil.NoSuchProcess:
            continue
        if label is not None:
            found[label] = child.pid
    return found


def _own_seconds() -> float:
    """This process's own CPU seconds (not its children's: they are measured apart)."""
    times = psutil.Process(os.getpid()).cpu_times()
    own: float = times.user + times.system
    return own


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds by process label at one moment."""

    seconds: dict[str, float]

    def since(self, before: CpuReading) -> dict[str, float]:
        return {k: v - before.seconds.get(k, 0.0) for k, v in self.seconds.items()}


class CpuMeter:
    """Reads the CPU time of labelled process trees, plus this process (the load
    generator). ``roots``: label -> pid; each tree is counted under its root's label."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)

    def read(self) -> CpuReading:
        seconds = {label: _tree_seconds(pid) for label, pid in self.roots.items()}
        seconds[LOAD_GENERATOR] = _own_seconds()
        return CpuReading(seconds)


def per_turn_ms(used: Mapping[str, float], turns: int) -> dict[str, object]:
    """CPU milliseconds per turn: the total and by process, largest first."""
    if turns <= 0:
        return {"total": 0.0, "by_process": {}}
    by = {k: round(v * 1000 / turns, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}
    return {"total": round(sum(used.values()) * 1000 / turns, 3), "by_process": by}
