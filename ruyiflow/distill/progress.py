"""A one-line progress bar on stderr: count, named values, rate and ETA, redrawn in place on a
terminal and printed as plain lines (about every 10%) when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, unit: str = "", stream: TextIO | None = None):
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.first_done: int | None = None
        self.last_draw = 0.0
        self.last_decile = -1

    def update(self, done: int, **values: float | str) -> None:
        now = time.perf_counter()
        if self.first_done is None:  # resumed runs: rate counts only this run's work
            self.first_done, self.started = done, now
            return self._draw(done, values, now, force=True)
        finished = done >= self.total and self.last_decile < 10
        self._draw(done, values, now, force=finished)

    def _draw(self, done: int, values: dict, now: float, force: bool) -> None:
        decile = 10 * done // self.total
        if self.is_tty and not force and now - self.last_draw < 0.2:
            return
        if not self.is_tty and not force and decile == self.last_decile:
            return
        self.last_draw, self.last_decile = now, decile
        elapsed = now - self.started
        worked = done - (self.first_done or 0)
        rate = worked / elapsed if elapsed > 0 and worked > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        fields = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        pct = 100 * done / self.total
        line = (
            f"[{self.label}] {done}/{self.total}{self.unit} ({pct:3.0f}%) {fields} "
            f"{rate:.3g}{self.unit}/s elapsed {_clock(elapsed)} ETA {_clock(eta)}"
        )
        self.stream.write(("\r" + line + "\x1b[K") if self.is_tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.is_tty:
            self.stream.write("\n")
            self.stream.flush()
