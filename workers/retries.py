"""The webhook retry schedule: a delay before each attempt, with jitter, and a limit."""

from __future__ import annotations

import random
from collections.abc import Sequence


class RetryPolicy:
    """``schedule[n]`` is the delay before attempt n + 1; past its end the last one repeats."""

    def __init__(
        self, schedule: Sequence[float], max_attempts: int | None = None, jitter: float = 0.0
    ) -> None:
        if not schedule:
            raise ValueError("a retry schedule needs at least one delay")
        self.schedule = list(schedule)
        self.max_attempts = max_attempts or len(self.schedule)
        self.jitter = jitter

    @property
    def first_delay(self) -> float:
        return self.schedule[0]

    def delay_after(self, attempt: int) -> float | None:
        """The delay before the next attempt once ``attempt`` (1-based) failed; None: no more."""
        if attempt >= self.max_attempts:
            return None
        base = self.schedule[min(attempt, len(self.schedule) - 1)]
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)
