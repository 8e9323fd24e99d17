"""``kontext demo``: README's first command, end to end on the embedded defaults."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import run_cli


def test_demo_holds_a_three_turn_conversation_with_its_context(tmp_path: Path) -> None:
    done = run_cli(["demo", "--engine", "tiny"], tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each turn is answered, and each later turn's prompt carried the earlier ones.
    earlier = [int(n) for n in re.findall(r"(\d+) earlier turns in context", done.stdout)]
    assert earlier == [0, 2, 4]
    assert re.search(r"conversation \S+: 3 turns", done.stdout)
    # The last turn's prompt carried what the first told, whatever the model made of it.
    assert "[turn 3] memory: its prompt carried turn 1's Ada and Lisbon: yes." in done.stdout
    assert "Traceback" not in done.stderr
