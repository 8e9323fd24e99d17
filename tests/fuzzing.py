"""How many cases the fuzz tests run, and where ``make fuzz`` records what they found."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kontext.chaos import report

CASES = int(os.environ.get("KONTEXT_FUZZ_CASES", "0"))
"""Cases per fuzzer; 0: the small default count of each test."""
RECORD = os.environ.get("KONTEXT_FUZZ_RECORD") == "1"


@dataclass
class Tally:
    """Cases run by one fuzzer and what each kind of outcome counted."""

    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def record(self, title: str, setup: str) -> None:
        """Append the counts to docs/reliability.md when ``make fuzz`` asks for it."""
        if not RECORD:
            return
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(self.outcomes.items()))
        body = f"{self.cases} cases.\n\n| outcome | cases |\n|---|---:|\n{rows}"
        report.record(title, setup, body)
