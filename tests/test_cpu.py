"""The bench's CPU meter on real processes: each labelled process tree's CPU time,
its descendants' included, counted under its label and no other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kontext.bench.cpu import LOAD_GENERATOR, CpuMeter

BURN = """
import time
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
time.sleep(60)
"""
PARENT = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {BURN!r}])
time.sleep(60)
"""


def _spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_the_meter_counts_each_process_tree_under_its_label() -> None:
    busy = _spawn(PARENT)  # a child that starts a grandchild burning 0.3 s of CPU
    idle = _spawn("import time; time.sleep(60)")
    try:
        meter = CpuMeter({"busy": busy.pid, "idle": idle.pid})
        before = meter.read()
        deadline = time.monotonic() + 30
        used = meter.read().since(before)
        while used["busy"] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
            used = meter.read().since(before)
    finally:
        for process in (busy, idle):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert set(used) == {"busy", "idle", LOAD_GENERATOR}
    assert used["busy"] >= 0.3  # the grandchild's burn, under its root's label
    assert used["idle"] < 0.1
