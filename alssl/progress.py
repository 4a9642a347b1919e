"""Honest time for long jobs: a progress bar whose ETA works at any step time, and one line with the projected wall
time once the first steps are measured ("≈ 70 min at 22 img/s").

rich's ETA averages the speed over its last `speed_estimate_period` seconds (30 by default): with steps slower than
that (a 26 s CPU fine-tune step) it never has two samples and shows `-:--:--`. Here the window is an hour and the bar is
updated every step.
"""

from __future__ import annotations

import sys
import time

PROJECT_AFTER = 3  # steps measured (after the first, which pays for warm-up) before the projection line
MIN_SECONDS = 60.0  # jobs projected to take less than this get no line


def progress_bar(label: str, total: int, start: int, *, quiet: bool, fields: dict | None = None):
    """(rich Progress, task id), or (None, None) when quiet or there is nothing to do. `fields`: extra columns."""
    if quiet or total == 0:
        return None, None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    cols += [TextColumn(f"{k} {{task.fields[{k}]}}") for k in (fields or {})]
    progress = Progress(*cols, TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        speed_estimate_period=3600.0)
    task = progress.add_task(label, total=total, completed=start, **(fields or {}))
    return progress, task


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Projection:
    """Prints, once, the projected wall time of the steps left, measured over steps 2..after+1 of this process (or
    1..after when `skip_first` is False: steps long enough that warm-up does not matter, e.g. curve cells).

    `per_step`: images (or another unit) per step, for the rate in the line; `unit` names it; `item` names a step."""

    def __init__(self, what: str, total: int, start: int, *, per_step: float | None = None, unit: str = "img",
                 item: str = "step", after: int = PROJECT_AFTER, skip_first: bool = True, hint: str = "",
                 min_seconds: float = MIN_SECONDS, stream=None):
        self.what, self.total, self.start, self.per_step, self.unit = what, total, start, per_step, unit
        self.item, self.after, self.hint, self.min_seconds, self.stream = item, after, hint, min_seconds, stream
        self.t_first: float | None = None if skip_first else time.perf_counter()
        self.done_first = start
        self.said: str | None = None

    def step(self, done: int) -> str | None:
        """Call after each finished step with the number of steps done so far; returns the line when it is printed."""
        if self.said is not None or done >= self.total:
            return None
        now = time.perf_counter()
        if self.t_first is None:  # the first step of this process pays for warm-up: measure from its end
            self.t_first, self.done_first = now, done
            return None
        measured = done - self.done_first
        if measured < self.after:
            return None
        per = (now - self.t_first) / measured  # seconds a step
        left = per * (self.total - done)
        self.said = ""
        if left + (now - self.t_first) < self.min_seconds:
            return None
        rate = (f" at {self.per_step / per:.0f} {self.unit}/s" if self.per_step
                else f" at {format_duration(per)} a {self.item}")
        self.said = (f"# {self.what}: {self.total - done} {self.item}s left ≈ {format_duration(left)}{rate} "
                     f"(measured over {measured} {self.item}s){self.hint}")
        print(self.said, file=self.stream or sys.stderr, flush=True)
        return self.said
