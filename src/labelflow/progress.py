"""A progress line for long passes over images, without a progress-bar dependency.

On a terminal the line is redrawn in place (carriage return) at most a few times a second;
anywhere else (a Snakemake job's log, a pipe) a plain line is written every 30
seconds, so logs stay readable and short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_S = 0.2  # terminal redraws are capped: printing is not free
LOG_EVERY_S = 30.0  # two lines a minute in a log, however long the pass


class Progress:
    """Counts items done out of ``total`` and reports the count and rate to ``stream``."""

    def __init__(self, total: int, what: str = "images", stream: TextIO | None = None, every_s: float | None = None):
        """``every_s``: seconds between reports (default: REDRAW_S on a terminal, LOG_EVERY_S elsewhere)."""
        self.total = total
        self.what = what
        # resolved now, not at import: a Snakemake job sends sys.stderr to its log first
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else REDRAW_S if self.interactive else LOG_EVERY_S
        self.started = time.perf_counter()
        self.reported = self.started
        self.done = 0

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.done}/{self.total} {self.what}{share}, {self.done / elapsed:.0f} {self.what}/s"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.reported >= self.every_s:
            self.reported = now
            self._write()

    def close(self) -> None:
        """The final count (on a terminal, ends the redrawn line)."""
        self._write()
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()

    def _write(self) -> None:
        if self.interactive:
            self.stream.write("\r" + self.line() + "\033[K")  # clear what a longer line left
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
