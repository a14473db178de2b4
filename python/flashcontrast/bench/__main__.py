"""``python -m flashcontrast.bench``: forward, backward and total time of each objective.

Objectives: CLIP InfoNCE, SigLIP, MV-InfoNCE and MV-DHEL with 4 views, GRAM with M = 4,
Symile "n" and "n_squared" with M = 3. On a
GPU: every available backend at N from 4096 up (Symile "n_squared", N^3 D work, from
1024), with a plain bf16 torch matmul as CLIP's speed-of-light row; on the CPU: small N,
the reference and the torch backend (the Triton interpreter is a test tool, not a
contender). Baselines besides the reference: torch.compile of the reference, and Inf-CL's
cal_inf_loss for CLIP on a GPU (see baselines.py); each is skipped with a note where it
cannot run. Prints a table of median forward, backward and total time (total with
p20-p80), peak memory beyond the inputs and, on a GPU, CLIP's TFLOP/s. Where the
reference cannot fit, its row says so. ``--quick`` runs fewer sizes and repeats (about a
minute on a 2-core CPU).

``--out DIR`` also writes the rows as CSV, the table as Markdown, headed by the date,
versions, device and command, and (when matplotlib imports) one plot per objective, as PNG
and SVG: time and peak memory against N, log-log (``python -m flashcontrast.bench.plot
CSV`` redraws them from a CSV). The run says at the start how many rows it will measure
and about how long that takes (``estimate.py``), and prints its progress as it goes.

``--gpu-report`` is the budgeted first-contact report for a machine with a GPU
(``first_contact.py``: environment and roofline, build, correctness smoke, CLIP and SigLIP
timings, the other objectives, the GPU tests, within ``--budget-s``); ``--dry-run`` prints
its plan and estimates without running anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .._dispatch import backend_for
from . import estimate
from .baselines import COMPILED, INF_CL, baseline_call, inf_cl_unavailable
from .measure import CASES, measure, measure_matmul, reference_too_big
from .plot import write_plots
from .report import Report

GPU_SIZES = {"default": [4096, 8192, 16384, 32768, 65536, 131072], "symile-n2": [512, 1024, 2048]}
# The CPU run finishes in a few minutes on 2 cores: the multi-view (4 N rows) and GRAM
# (N^2 M^2) references grow fastest, Symile "n_squared" is N^3 D.
CPU_SIZES = {
    "default": [256, 1024, 4096],
    "mv-infonce-v4": [256, 1024, 2048],
    "mv-dhel-v4": [256, 1024, 2048],
    "gram-m4": [256, 1024, 2048],
    "symile-n2": [32, 128, 256],
}
CPU_REPEATS, GPU_REPEATS = 5, 10
QUICK_SIZES = 2  # --quick: the smallest sizes only
QUICK_REPEATS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _available_backends(
    objective: str, device: torch.device, quick: bool
) -> tuple[list[str], list[str]]:
    """The implementations to run, and notes on the baselines that will not."""
    names, notes = ["reference"], []
    if quick:
        notes.append(f"{COMPILED} skipped under --quick: each size compiles, ~10 s on a CPU")
    else:
        names.append(COMPILED)
    for name in ("torch", "triton", "cuda"):
        if device.type == "cpu" and name == "triton":
            continue
        try:
            backend_for(CASES[objective].name, device, name)
        except RuntimeError:
            continue
        names.append(name)
    if objective == "clip":
        reason = inf_cl_unavailable(objective, device)
        if reason is None:
            names.append(INF_CL)
        else:
            notes.append(f"{INF_CL} skipped: {reason}")
    return names, notes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashcontrast.bench", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--objectives", choices=sorted(CASES), nargs="+")
    p.add_argument("--sizes", type=int, nargs="+", help="batch sizes N")
    p.add_argument("--dims", type=int, nargs="+", help="feature dimensions D")
    p.add_argument("--dtypes", choices=sorted(DTYPES), nargs="+")
    p.add_argument("--backends", nargs="+", help="subset of backends to run")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed calls per row (default 10 on a GPU, 5 on the CPU; --quick: 3)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--quick", action="store_true", help="the two smallest sizes, 3 repeats")
    p.add_argument("--out", type=Path, help="also write CSV, Markdown and PNG/SVG plots here")
    p.add_argument(
        "--gpu-report",
        action="store_true",
        help="the budgeted first-contact GPU report (first_contact.py) into --out "
        "(default benchmarks/results/<device>/)",
    )
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="--gpu-report: seconds for the whole run"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="--gpu-report: print the plan and its estimates, run nothing (no GPU needed)",
    )
    p.add_argument("--smoke-workers", type=int, help="--gpu-report: smoke worker processes")
    p.add_argument(
        "--smoke-case-timeout",
        type=float,
        default=180.0,
        help="--gpu-report: seconds without a smoke result before a worker counts as hung",
    )
    p.add_argument(
        "--smoke-tiny", action="store_true", help="--gpu-report: toy smoke sizes (tests)"
    )
    # set by the report itself when it restarts after building _C
    p.add_argument("--stamp", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    if args.gpu_report:
        from . import first_contact

        # --dry-run plans for a GPU whether or not this machine has one
        device = torch.device("cuda" if args.dry_run else args.device)
        args.argv = [a for a in raw]
        args.command = "python -m flashcontrast.bench " + " ".join(raw)
        return first_contact.run(args, device)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    default_repeats = GPU_REPEATS if on_gpu else CPU_REPEATS
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else default_repeats)
    objectives = args.objectives or list(CASES)
    dims = args.dims or [512 if on_gpu else 256]
    dtypes = args.dtypes or ["bfloat16" if on_gpu else "float32"]

    report = Report(device, "python -m flashcontrast.bench " + " ".join(raw))
    report.print_header()
    sections = []
    for objective in objectives:
        table = GPU_SIZES if on_gpu else CPU_SIZES
        sizes = args.sizes or table.get(objective, table["default"])
        sizes = sizes[:QUICK_SIZES] if args.quick else sizes
        backends, notes = _available_backends(objective, device, args.quick)
        backends = args.backends or backends
        for d in dims:
            for dtype_name in dtypes:
                sections.append((objective, sizes, backends, d, dtype_name, notes))
    progress = _Progress(sections, device, args)
    for objective, sizes, backends, d, dtype_name, notes in sections:
        _run_section(report, objective, sizes, backends, d, dtype_name, args, progress)
        for text in notes if not args.backends else []:
            report.note(text)
    print(f"measured {progress.done} rows in {time.perf_counter() - progress.t0:.0f} s", flush=True)
    if args.out:
        paths = report.write(args.out)
        paths += write_plots(report.rows, args.out, paths[0].stem, report.note)
        for path in paths:
            print(f"wrote {path}")
    return 0


class _Progress:
    """Says at the start how many rows there are and about how long they take (CPU:
    ``estimate.py``; on a GPU the count only), then one line per row as it starts."""

    def __init__(self, sections, device: torch.device, args) -> None:
        self.t0 = time.perf_counter()
        self.done = 0
        rows = [(o, b, n, d) for o, sizes, backends, d, _, _ in sections for n in sizes
                for b in backends]  # fmt: skip
        self.total = len(rows)
        calls = args.warmup + args.repeats + 1  # warm-up, timed, memory
        if device.type == "cpu":
            unit = estimate.calibrate(device)
            self.eta = sum(estimate.row_seconds(*r, calls, unit) for r in rows)
            how = (
                f"about {self.eta / 60:.1f} min (from a {unit * 1e3:.1f} ms calibration call "
                "and the committed CPU run's relative costs; see bench/estimate.py)"
            )
        else:
            self.eta, how = None, "no estimate on a GPU (see --gpu-report --dry-run)"
        print(f"plan: {self.total} rows at most (fewer where memory runs out), {how}", flush=True)

    def step(self, objective: str, backend: str, n: int, d: int) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        left = f", ~{max(0.0, self.eta - elapsed):.0f} s left" if self.eta is not None else ""
        print(
            f"  [{self.done}/{self.total}] {objective} {backend} N={n} D={d} "
            f"({elapsed:.0f} s{left})",
            flush=True,
        )


def _run_section(report, objective, sizes, backends, d, dtype_name, args, progress) -> None:
    """One table: ``objective`` at every N for every backend, at one D and dtype."""
    device, repeats = report.device, args.repeats
    report.section(f"{objective}, D={d}, {dtype_name}, median of {repeats}")
    out_of_memory: set[str] = set()  # and baselines that failed
    for n in sizes:
        if objective == "clip" and device.type == "cuda":
            report.add(measure_matmul(n, d, device, repeats))
        for backend in backends:
            if backend in out_of_memory:
                continue
            progress.step(objective, backend, n, d)
            too_big = reference_too_big(objective, n, d, device)
            if backend in ("reference", COMPILED) and too_big:
                report.note(f"{backend} N={n}: {too_big}")
                continue
            baseline = backend in (COMPILED, INF_CL)
            # torch.compile: the first call compiles, the second may still specialize
            warmup = max(args.warmup, 2) if backend == COMPILED else args.warmup
            try:
                fn = baseline_call(backend, objective) if baseline else None
                row = measure(
                    objective, backend, n, d, DTYPES[dtype_name], device, repeats, warmup, fn
                )
            except Exception as e:
                if not baseline:  # flashcontrast's own backends must not fail
                    raise
                out_of_memory.add(backend)
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                report.note(f"{backend} skipped: {type(e).__name__}: {reason}")
                continue
            if row is None:
                out_of_memory.add(backend)
                report.note(f"{backend} N={n}: out of memory; larger N skipped")
            else:
                report.add(row)
        if len(out_of_memory) == len(backends):
            break


if __name__ == "__main__":
    sys.exit(main())
