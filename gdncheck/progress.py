"""Progress of long steps: ``n/N``, elapsed time and ETA, on a terminal or in a CI log.

On a terminal it is a rich progress bar; elsewhere (CI logs, pipes) one plain line at most every
``every_s`` seconds and at the end, never carriage-return redraws or markup.
"""
from __future__ import annotations

import sys
import time


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``with Progress("run", total) as p: p.advance(note)``. ``enabled=False`` prints nothing."""

    def __init__(self, what: str, total: int, *, enabled: bool = True, every_s: float = 30.0, stream=None):
        self.what, self.total, self.enabled, self.every_s = what, total, enabled, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled and self.total and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                            console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total, note="")
        return self

    def line(self) -> str:
        el = time.perf_counter() - self._t0
        eta = el / self.done * (self.total - self.done) if self.done else None
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.what}: {self.done}/{self.total}{pct}, {_hms(el)} elapsed"
                + (f", ETA {_hms(eta)}" if eta is not None and self.done < self.total else ""))

    def advance(self, note: str = "", n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, note=note[:60])
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
