"""A Kontext process tunes Python's collector for a long-running service."""

from __future__ import annotations

import json
import subprocess
import sys

from kontext.app.process import GC_YOUNG_THRESHOLD


def test_a_service_collects_young_objects_less_often_and_freezes_startup() -> None:
    """What was allocated at startup is frozen (never scanned again), and the youngest
    generation is collected every ``GC_YOUNG_THRESHOLD`` allocations, not every 700;
    the older generations keep their defaults, so cycles are still collected."""
    probe = (
        "import gc, json; defaults = gc.get_threshold();"
        "from kontext.app.process import tune_gc; tune_gc();"
        "print(json.dumps([defaults, gc.get_threshold(), gc.get_freeze_count()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    defaults, tuned, frozen = json.loads(done.stdout)
    assert tuned == [GC_YOUNG_THRESHOLD, defaults[1], defaults[2]]
    assert frozen > 10_000  # the modules and schemas a service imports
