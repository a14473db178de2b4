"""PNG plots of a run: per objective, time and peak memory against N, log-log.

One line per implementation (and per D and dtype where a run has several). Needs
matplotlib (``pip install "flashcontrast[bench]"``); without it the runner prints a note
and writes no plots.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from .measure import Row


def _series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows of one objective grouped into lines, each sorted by N."""
    several = len({(r.d, r.dtype) for r in rows}) > 1
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        label = f"{r.backend} D={r.d} {r.dtype}" if several else r.backend
        lines[label].append(r)
    return {k: sorted(v, key=lambda r: r.n) for k, v in lines.items()}


def write_plots(
    rows: Sequence[Row], folder: Path, stem: str, note: Callable[[str], None] = print
) -> list[Path]:
    """Write <folder>/<stem>-<objective>.png for each objective; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # not installed, or no usable backend
        note(f"plots skipped: matplotlib does not import ({type(e).__name__})")
        return []
    by_objective: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_objective[r.objective].append(r)
    paths = []
    for objective, obj_rows in by_objective.items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        device = obj_rows[0].device
        for label, line in _series(obj_rows).items():
            ns = [r.n for r in line]
            ax_t.plot(ns, [r.ms_median for r in line], marker="o", label=label)
            ax_m.plot(ns, [max(r.peak_mib, 1e-3) for r in line], marker="o", label=label)
        ax_t.set_ylabel("forward+backward time, median (ms)")
        ax_m.set_ylabel("peak memory beyond the inputs (MiB)")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch size)")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{objective} on {device}")
        fig.tight_layout()
        path = folder / f"{stem}-{objective}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
