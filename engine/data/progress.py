"""A progress line for long data steps (reading, tokenizing): rows/s and the time left.

Quiet for a step that ends within ``after`` seconds, so small datasets print nothing; then at most one
line every ``every`` seconds, through :func:`sft.core.notices.notice` (rank 0 only, stderr).
"""

from __future__ import annotations

import time
from typing import Callable

from sft.core.notices import notice

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Reports ``update(fraction, rows)`` calls of one step as ``what: N rows (R rows/s), about T left``.

    ``fraction`` is how much of the step is done (bytes read of all files, rows tokenized of all rows):
    the time left is extrapolated from it, while the rate counts rows, what users size their data in.
    """

    def __init__(self, what: str, *, after: float = 5.0, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = notice):
        self.what = what
        self.every = every
        self.clock = clock
        self.say = say
        self.start = clock()
        self.next = self.start + after

    def update(self, fraction: float, rows: int, detail: str = "") -> None:
        now = self.clock()
        if now < self.next or fraction <= 0:
            return
        self.next = now + self.every
        elapsed = now - self.start
        left = elapsed * (1 - fraction) / fraction if fraction < 1 else 0.0
        extra = f", {detail}" if detail else ""
        self.say(f"{self.what}: {rows:,} rows ({rows / elapsed:,.0f} rows/s){extra}, about {_duration(left)} left")
