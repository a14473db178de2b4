"""A time budget, a plan of estimated steps, and output that survives being killed.

The GPU report runs under a hard limit (a lent machine for minutes), so everything it
measures is written the moment it exists: :class:`Log` appends each line to its file and
flushes, :class:`RowWriter` writes one CSV row at a time and flushes. A run killed at its
limit leaves every line and row it had produced (flushed to the kernel, which keeps them
when the process dies).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO


class Budget:
    """Seconds left of ``total_s`` since ``start`` (a ``time.monotonic()`` value; the
    default is now)."""

    def __init__(self, total_s: float, start: Optional[float] = None) -> None:
        self.total_s = float(total_s)
        self.start = time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more still end inside the budget."""
        return seconds <= self.remaining()


@dataclass
class Step:
    """One step of a plan: what it does, its estimated seconds and what that rests on."""

    key: str
    title: str
    estimate_s: float
    basis: str
    run: Optional[Callable[[], None]] = None
    detail: list[str] = field(default_factory=list)


def format_plan(steps: Sequence[Step], budget_s: Optional[float] = None) -> list[str]:
    """The plan as printable lines: one per step with its estimate, its basis and detail,
    then the sum (and the budget it must fit)."""
    lines = []
    total = 0.0
    for i, step in enumerate(steps, 1):
        total += step.estimate_s
        lines.append(f"{i}. {step.title}: ~{step.estimate_s:.0f} s")
        lines.append(f"     estimate: {step.basis}")
        lines += [f"     {d}" for d in step.detail]
    tail = f"total: ~{total:.0f} s"
    if budget_s is not None:
        verdict = "fits" if total <= budget_s else "DOES NOT FIT"
        tail += f" of a {budget_s:.0f} s budget ({verdict})"
    lines.append(tail)
    return lines


class Log:
    """Print a line and append it to a file at once (flushed: kept if the run dies)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self._f: Optional[TextIO] = open(path, "a", buffering=1) if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self._f is not None:
            self._f.write(text + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class RowWriter:
    """A CSV file written one row at a time, each flushed as it is written."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        fresh = not path.exists() or path.stat().st_size == 0
        self._f = open(path, "a", newline="", buffering=1)
        self._w = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")
        if fresh:
            self._w.writeheader()
            self._f.flush()
        self.rows = 0

    def write(self, row: dict) -> None:
        self._w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        self._f.flush()
        self.rows += 1

    def close(self) -> None:
        self._f.close()
