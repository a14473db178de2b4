"""``python -m flashcontrast.bench.st_losses``: the loss step of sentence-transformers'
MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss against the
flashcontrast drop-ins (``flashcontrast.compat.sentence_transformers``), given the
embeddings.

The loss step is what a training step spends beyond the encoder: for MNRL,
``compute_loss_from_embeddings`` and its backward into the embeddings; for the cached
(GradCache) loss, ``calculate_loss(reps, with_backward=True)``, which fills the
embeddings' gradient cache (the package in ``mini_batch_size`` row slices of the
(N, N (1 + H)) score matrix, the drop-in in one fused call over the whole batch). Inputs:
N queries, N positives and H hard negatives per query, unit-norm (N, D) float32 (bfloat16
on a GPU), scale 20 (the package's default), cosine similarity.

Each row: median and p20-p80 of the step's wall time over ``--repeats`` (after one
warm-up), and the peak memory allocated beyond the inputs (``bench/memory.py``). A row
whose predicted memory (the package's MNRL: its (N, N (1 + H)) scores, their softmax and
their gradient in float32) exceeds ``--memory-gib``, or whose predicted time exceeds
``--seconds`` per step, is skipped with the prediction, not run.

    python -m flashcontrast.bench.st_losses                      # N = 1024 .. 16384, H = 1
    python -m flashcontrast.bench.st_losses --sizes 1024 4096 --hard-negatives 0 1
    python -m flashcontrast.bench.st_losses --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .memory import memory_use
from .report import Report, device_name

SCALE = 20.0
_COLUMNS = f"{'implementation':>34} {'N':>7} {'H':>2} {'ms':>10} {'p20-p80':>21} {'peak MiB':>10}"


class _Encoder(nn.Module):
    """The losses need a SentenceTransformer to construct; none of it runs here."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, features: dict) -> dict:
        features["sentence_embedding"] = self.lin(features["x"])
        return features


def _losses(mini_batch: int) -> dict[str, tuple[object, bool]]:
    """name -> (loss object, cached?) for the four implementations."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st

    from ..compat import sentence_transformers as fc

    model = SentenceTransformer(modules=[_Encoder()], device="cpu")
    return {
        "sentence-transformers MNRL": (st.MultipleNegativesRankingLoss(model, scale=SCALE), False),
        f"sentence-transformers Cached (mb {mini_batch})": (
            st.CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=mini_batch),
            True,
        ),
        "flashcontrast MNRL": (fc.MultipleNegativesRankingLoss(model, scale=SCALE), False),
        "flashcontrast Cached": (
            fc.CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=mini_batch),
            True,
        ),
    }


def _step(loss, cached: bool, embeddings: list[torch.Tensor], mini_batch: int) -> Callable:
    """One loss step: the loss and its gradient into the embeddings' ``.grad``."""

    def run() -> None:
        for e in embeddings:
            e.grad = None
        if cached:
            reps = [list(e.split(mini_batch)) for e in embeddings]
            loss.calculate_loss(reps, with_backward=True)
        else:
            loss.compute_loss_from_embeddings(embeddings, None).backward()

    return run


def predicted(name: str, n: int, h: int, d: int, unit_s: float) -> tuple[float, float]:
    """(bytes, seconds) a row is expected to take: the dense MNRL keeps its scores, their
    softmax and their gradient (3 x 4 N^2 (1 + H) bytes); every implementation does the
    same 6 N^2 (1 + H) D flops of score GEMMs (forward and backward), timed by ``unit_s``
    (seconds per such flop, from the implementation's own last row)."""
    cells = n * n * (1 + h)
    mem = 12.0 * cells if name == "sentence-transformers MNRL" else 8.0 * n * d * (2 + h)
    return mem, 6.0 * cells * d * unit_s


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashcontrast.bench.st_losses", description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--hard-negatives", type=int, nargs="+", default=[1])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--mini-batch", type=int, default=32, help="the cached losses' mini_batch_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-gib", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=60.0, help="skip rows predicted slower")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the table as Markdown into this folder")
    return p


def _embeddings(n: int, h: int, d: int, device: torch.device) -> list[torch.Tensor]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(n + h)
    return [
        torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        .to(device, dtype)
        .requires_grad_()
        for _ in range(2 + h)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    report = Report(
        device, "python -m flashcontrast.bench.st_losses " + " ".join(argv or sys.argv[1:])
    )
    report.print_header()
    lines = [_COLUMNS]
    print(lines[0], flush=True)
    losses = _losses(args.mini_batch)
    unit_s: dict = {}  # name -> seconds per score-GEMM flop, from its last row
    for h in args.hard_negatives:
        for n in sorted(args.sizes):
            xs = _embeddings(n, h, args.dim, device)
            for name, (loss, cached) in losses.items():
                if name in unit_s:
                    mem, sec = predicted(name, n, h, args.dim, unit_s[name])
                    if mem > args.memory_gib * 2**30 or sec > args.seconds:
                        lines.append(
                            f"{name:>34} {n:>7} {h:>2}   skipped: predicted {mem / 2**30:.1f} GiB, "
                            f"{sec:.0f} s a step (limits {args.memory_gib} GiB, {args.seconds} s)"
                        )
                        print(lines[-1], flush=True)
                        continue
                step = _step(loss, cached, xs, args.mini_batch)
                step()  # warm-up
                times = []
                for _ in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    times.append(1e3 * (time.perf_counter() - t0))
                peak = memory_use(step, device).peak_bytes / 2**20
                ms = statistics.median(times)
                p20, p80 = np.percentile(times, [20, 80])
                unit_s[name] = 1e-3 * min(times) / (6.0 * n * n * (1 + h) * args.dim)
                lines.append(
                    f"{name:>34} {n:>7} {h:>2} {ms:>10.1f} {p20:>10.1f}-{p80:<10.1f} {peak:>10.1f}"
                )
                print(lines[-1], flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = report.started[:16].replace(":", "")
        path = args.out / f"st-losses-{stamp}.md"
        text = ["# sentence-transformers loss step: the package against the drop-ins", ""]
        text += [f"- {x}" for x in report.header()]
        text += [
            f"- embeddings: N queries, N positives, H hard negatives, D = {args.dim}, "
            f"{'bfloat16' if device.type == 'cuda' else 'float32'}, scale {SCALE}, cosine; "
            "ms: one loss step (loss + gradient into the embeddings), median and p20-p80 "
            f"of {args.repeats}; peak: memory allocated beyond the inputs",
            "",
            "```",
            *lines,
            "```",
            "",
        ]
        path.write_text("\n".join(text))
        print(f"wrote {path} ({device_name(device)}, {datetime.date.today()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
