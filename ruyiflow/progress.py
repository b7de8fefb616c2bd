"""Progress bars on stderr, one convention for every command (tqdm): count, rate, elapsed, ETA,
and named values (loss, tokens/s, stage) as the postfix.

On a terminal the bar redraws in place. Into a file or a pipe (a log, CI, `ruyiflow up > log`)
it writes whole lines instead, one at the start, one every `LOG_INTERVAL_S` and one at the end,
so a long job shows it is alive without flooding its log.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 60.0  # between two lines of a bar that is not on a terminal
# No bar graphics in a log: the numbers are what a reader of a log looks for.
LOG_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _LogLines:
    """What tqdm writes, as whole lines: a redraw is '\\r' + text + padding, so each redraw
    becomes one line and the padding (and the newline of `close`) disappears."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bar(tqdm):
    """A tqdm bar whose updates never force a redraw: postfix values are set quietly and shown
    at the next redraw tqdm allows (`set_postfix` alone would redraw on every call)."""

    def advance(self, n: float = 1, **values: Any) -> None:
        if values:
            self.set_postfix(values, refresh=False)
        self.update(n)

    def advance_to(self, done: float, **values: Any) -> None:
        """Move to the absolute count `done` (callers that count totals themselves)."""
        self.advance(done - self.n, **values)

    def report(self, stage: str, fraction: float) -> None:
        """A `(stage, fraction done)` callback (the ONNX export's) for a bar of total 100."""
        self.advance_to(round(100 * min(max(fraction, 0.0), 1.0)), stage=stage)


def progress_bar(
    total: float | None,
    desc: str,
    unit: str = "it",
    *,
    initial: float = 0,
    disable: bool = False,
    file: TextIO | None = None,
    **kwargs: Any,
) -> Bar:
    """A bar on `file` (default stderr) for `total` units; `initial` work done before (a resumed
    run: the rate counts only this run's work); `disable` makes every call a no-op (`--quiet`).
    Further keyword arguments go to tqdm."""
    stream = file if file is not None else sys.stderr
    common = dict(total=total, desc=desc, unit=unit, initial=initial, disable=disable)
    if is_terminal(stream):
        return Bar(file=stream, dynamic_ncols=True, **common, **kwargs)
    options: dict[str, Any] = dict(
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,  # tqdm's monitor thread would otherwise redraw every 10 s
        bar_format=LOG_FORMAT if total else None,  # {percentage} needs a total
    )
    return Bar(file=_LogLines(stream), **common, **(options | kwargs))
