"""The embedded broker the project starts for tests, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext.app.embedded import EmbeddedBroker

WORKER_NAMES = ("tokio-rt-worker", "tokio-runtime-w")
"""What tokio names a runtime worker thread (the second: an older name, cut to 15 bytes)."""


def _runtime_workers(pid: int) -> int:
    """The broker's runtime worker threads (tokio-rt-worker, as tokio names them)."""
    return sum(
        1
        for task in Path(f"/proc/{pid}/task").iterdir()
        if (task / "comm").read_text().strip() in WORKER_NAMES
    )


@pytest.mark.parametrize(("configured", "expected"), [(None, 1), ("3", 3)])
def test_the_broker_runs_one_runtime_thread_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str | None, expected: int
) -> None:
    if configured is None:
        monkeypatch.delenv("TOKIO_WORKER_THREADS", raising=False)
    else:
        monkeypatch.setenv("TOKIO_WORKER_THREADS", configured)
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    try:
        assert broker.pid is not None
        assert _runtime_workers(broker.pid) == expected
    finally:
        broker.stop()
