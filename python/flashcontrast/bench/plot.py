"""Plots of a run: per objective, time and peak memory against N, log-log.

One line per implementation (and per D and dtype where a run has several). Each plot is
written twice: a PNG for looking at, and an SVG (text, with its text kept as text) that the
repository commits beside the CSV it was drawn from, so the README can show it. Needs
matplotlib (``pip install "flashcontrast[bench]"``); without it the runner prints a note and
writes no plots.

Redraw the plots of a committed CSV without rerunning the benchmark::

    python -m flashcontrast.bench.plot benchmarks/results/cpu/bench-2026-11-25T1858.csv
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

from .measure import Row

FORMATS = ("png", "svg")


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
    """Write <folder>/<stem>-<objective>.png and .svg for each objective; return their
    paths. Rows without a backward (the matmul speed-of-light row) are plotted like the
    others: their total is the forward."""
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
    # svg.hashsalt and no date: the same rows give the same SVG, so a redraw is no diff.
    style = {"svg.fonttype": "none", "svg.hashsalt": "flashcontrast"}
    for objective, obj_rows in by_objective.items():
        with plt.rc_context(style):
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
            for fmt in FORMATS:
                path = folder / f"{stem}-{objective}.{fmt}"
                fig.savefig(path, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
                paths.append(path)
            plt.close(fig)
    return paths


def read_rows(path: Path) -> list[Row]:
    """The rows of a CSV written by ``python -m flashcontrast.bench --out``."""
    text_fields = {"objective", "backend", "dtype", "device"}
    int_fields = {"n", "d"}
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            values: dict = {}
            for name in (x.name for x in fields(Row)):
                raw = rec[name]
                if name in text_fields:
                    values[name] = raw
                elif raw == "":
                    values[name] = None  # e.g. the matmul row's backward, CLIP-only flops
                else:
                    values[name] = int(raw) if name in int_fields else float(raw)
            out.append(Row(**values))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flashcontrast.bench.plot",
        description="Redraw the PNG and SVG plots of benchmark CSVs, beside each CSV.",
    )
    p.add_argument("csv", type=Path, nargs="+")
    args = p.parse_args(argv)
    for path in args.csv:
        for out in write_plots(read_rows(path), path.parent, path.stem):
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
