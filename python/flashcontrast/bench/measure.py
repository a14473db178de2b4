"""Forward, backward and total time and peak memory of one objective, backend and size.

Each objective is a :class:`Case`: how to make its inputs, how to call it, and how many
flops a forward+backward counts as (where a GEMM count is meaningful). Each repeat times
the forward, then ``.backward()`` of that loss, and the two together: with CUDA events on
a GPU (one stream, three events, so no host clock is involved) and ``perf_counter`` on the
CPU. The baselines an implementation may be besides a backend are in ``baselines.py``.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import functional
from .memory import memory_use


@dataclass
class Row:
    """One measurement: an implementation at one (N, D, dtype) on one device."""

    objective: str
    backend: str
    n: int
    d: int
    dtype: str
    device: str
    fwd_ms_median: float
    fwd_ms_p20: float
    fwd_ms_p80: float
    bwd_ms_median: Optional[float]  # None: nothing to differentiate (the matmul row)
    bwd_ms_p20: Optional[float]
    bwd_ms_p80: Optional[float]
    ms_median: float  # total: forward + backward
    ms_p20: float
    ms_p80: float
    peak_mib: float
    flops: Optional[float]  # what a forward+backward counts as; None: not meaningful

    @property
    def tflops(self) -> Optional[float]:
        """Achieved TFLOP/s by the case's flop count (the same for every implementation)."""
        return None if self.flops is None else self.flops / (self.ms_median * 1e-3) / 1e12


@dataclass(frozen=True)
class Case:
    """An objective as the benchmark runs it."""

    name: str  # the objective's name for the dispatcher (backend_for)
    modalities: int  # feature matrices it takes
    scale: float  # the logit scale it runs at (CLIP: OpenCLIP's cap, GRAM: 1 / 0.07)
    call: Callable[[Sequence[torch.Tensor], torch.Tensor, str], torch.Tensor]
    flops: Optional[Callable[[int, int], float]] = None
    # Bytes the materializing reference needs, roughly; None: N^2 floats suffice to say.
    reference_bytes: Optional[Callable[[int, int], float]] = None


CASES = {
    # 4 GEMM-equivalents of 2 N^2 D: S forward; S, dS B, dS^T A backward.
    "clip": Case(
        "clip",
        2,
        100.0,
        lambda x, s, be: functional.clip_loss(x[0], x[1], s, backend=be),
        flops=lambda n, d: 8 * n * n * d,
    ),
    "siglip": Case(
        "siglip",
        2,
        10.0,
        lambda x, s, be: functional.siglip_loss(x[0], x[1], s, -10.0, backend=be),
        flops=lambda n, d: 8 * n * n * d,  # the same 4 GEMM-equivalents as CLIP
    ),
    # 2 of CLIP's 4 GEMM-equivalents per direction: one direction only
    "infonce": Case(
        "infonce",
        2,
        20.0,
        lambda x, s, be: functional.infonce_loss(x[0], x[1], s, backend=be),
        flops=lambda n, d: 4 * n * n * d,
    ),
    # two views, four samples a class: the (2 N, 2 N) self-similarity
    "supcon-v2": Case(
        "supcon",
        2,
        1 / 0.07,
        lambda x, s, be: functional.supcon_loss(
            list(x), torch.arange(x[0].shape[0], device=x[0].device) // 4, 1 / s, backend=be
        ),
        flops=lambda n, d: 4 * (2 * n) ** 2 * d,  # rows only: S forward; S, dS Z backward
        reference_bytes=lambda n, d: 6 * (2 * n) ** 2 * 4,
    ),
    # 1-to-K, K = 2: N anchors against 2 N candidates (two stacked batches); one "softmax"
    # sweep of N x 2 N entries, 8 n m D (S forward; S, dS B, dS^T A backward)
    "multi-positive-k2": Case(
        "infonce",
        3,
        20.0,
        lambda x, s, be: functional.multi_positive_infonce_loss(
            x[0], torch.cat(list(x[1:])), s, backend=be
        ),
        flops=lambda n, d: 8 * n * (2 * n) * d,
        reference_bytes=lambda n, d: 6 * n * (2 * n) * 4,
    ),
    # CWCL: CLIP's sweep without positives (8 N^2 D) and the soft targets' (D, D) products,
    # ~24 N D^2 forward and backward (the frozen embeddings x[2] have D features too)
    "cwcl": Case(
        "clip",
        3,
        100.0,
        lambda x, s, be: functional.cwcl_loss(x[0], x[1], s, weight_features=x[2], backend=be),
        flops=lambda n, d: 8 * n * n * d + 24 * n * d * d,
        reference_bytes=lambda n, d: 8 * n * n * 4,
    ),
    # L_CUAXU: CLIP's sweep (8 N^2 D) and three uniformity "rows" sweeps of (D + 2)-column
    # rows, 8 N^2 (D + 2) each (S forward; S, dS B, dS^T A backward)
    "contrastive-gap-cuaxu": Case(
        "uniformity",
        2,
        100.0,
        lambda x, s, be: functional.contrastive_gap_loss(
            x[0], x[1], s, variant="cuaxu", backend=be
        ),
        flops=lambda n, d: 8 * n * n * d + 3 * 8 * n * n * (d + 2),
        reference_bytes=lambda n, d: 10 * n * n * 4,
    ),
    "mv-infonce-v4": Case(
        "multiview",
        4,
        10.0,
        lambda x, s, be: functional.multiview_infonce_loss(list(x), s, backend=be),
        reference_bytes=lambda n, d: 6 * (4 * n) ** 2 * 4,
    ),
    "mv-dhel-v4": Case(
        "multiview",
        4,
        10.0,
        lambda x, s, be: functional.multiview_dhel_loss(list(x), s, backend=be),
        reference_bytes=lambda n, d: 6 * (4 * n) ** 2 * 4,
    ),
    "gram-m4": Case(
        "gram",
        4,
        1 / 0.07,
        lambda x, s, be: functional.gram_loss(x[0], x[1:], s, label_smoothing=0.1, backend=be),
        reference_bytes=lambda n, d: 8 * n * n * 16 * 4,
    ),
    "symile-n": Case(
        "symile",
        3,
        10.0,
        lambda x, s, be: functional.symile_loss(list(x), s, backend=be),
    ),
    "symile-n2": Case(
        "symile",
        3,
        10.0,
        lambda x, s, be: functional.symile_loss(
            list(x), s, negative_sampling="n_squared", backend=be
        ),
        reference_bytes=lambda n, d: 4 * n**3 * 4 + 3 * n * n * d * 4,
    ),
}


Call = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


class _Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        end.synchronize()
        return start.elapsed_time(end)


def _times_ms(
    fn: Call,
    xs: list[torch.Tensor],
    scale: torch.Tensor,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
) -> tuple[list[float], list[float], list[float]]:
    """(forward, backward, total) times of ``fn`` after ``warmup`` untimed calls."""
    clock = _Clock(device)
    fwd: list[float] = []
    bwd: list[float] = []
    total: list[float] = []
    for i in range(warmup + repeats):
        for t in (*xs, scale):
            t.grad = None
        t0 = clock.mark()
        loss = fn(xs, scale)
        t1 = clock.mark()
        loss.backward()
        t2 = clock.mark()
        if i >= warmup:
            fwd.append(clock.ms(t0, t1))
            bwd.append(clock.ms(t1, t2))
            total.append(clock.ms(t0, t2))
    return fwd, bwd, total


def _quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    times = list(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3]


def _release(device: torch.device) -> None:
    """Hand cached blocks back after an out-of-memory, so later rows start clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(objective, backend, n, d, dtype, device, times, peak_bytes, flops) -> Row:
    fwd, bwd, total = times
    name = str(dtype).replace("torch.", "")
    b = _quantiles(bwd) if bwd else (None, None, None)
    return Row(
        objective,
        backend,
        n,
        d,
        name,
        str(device),
        *_quantiles(fwd),
        *b,
        *_quantiles(total),
        peak_bytes / 2**20,
        flops,
    )


def measure_matmul(n: int, d: int, device: torch.device, repeats: int) -> Optional[Row]:
    """The speed-of-light row: one plain bfloat16 torch matmul (N, D) @ (D, N), forward only."""
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    clock = _Clock(device)
    try:
        torch.mm(a, b.t())
        times = []
        for _ in range(repeats):
            t0 = clock.mark()
            torch.mm(a, b.t())
            times.append(clock.ms(t0, clock.mark()))
        mem = memory_use(lambda: torch.mm(a, b.t()), device)
    except torch.OutOfMemoryError:
        _release(device)
        return None
    return _row(
        "matmul",
        "matmul-bf16",
        n,
        d,
        torch.bfloat16,
        device,
        (times, [], times),
        mem.peak_bytes,
        2 * n * n * d,
    )


def reference_too_big(objective: str, n: int, d: int, device: torch.device) -> Optional[str]:
    """On the CPU, a sentence if the materializing reference would not fit in memory.

    A CUDA out-of-memory is an exception the runner catches; on the CPU it can take the
    process down instead, so the reference is skipped there by its known footprint.
    """
    if device.type != "cpu":
        return None
    estimate = CASES[objective].reference_bytes or (lambda n, d: 6 * n * n * 4)
    need = estimate(n, d)
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.5 * pages:
        return f"reference skipped: needs ~{need / 2**30:.0f} GiB, {pages / 2**30:.0f} GiB free"
    return None


def make_inputs(
    objective: str, n: int, d: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unit-norm (N, D) features, one per modality, and the case's logit scale."""
    case = CASES[objective]
    xs = [
        torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
        .to(dtype)
        .requires_grad_()
        for _ in range(case.modalities)
    ]
    return xs, torch.tensor(case.scale, device=device, requires_grad=True)


def backend_call(objective: str, backend: str) -> Call:
    """``objective`` through the dispatcher with ``backend``: fn(features, scale) -> loss."""
    case = CASES[objective]
    return lambda xs, scale: case.call(xs, scale, backend)


def measure(
    objective: str,
    backend: str,
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    fn: Optional[Call] = None,
) -> Optional[Row]:
    """Times and peak memory of one configuration; None if it ran out of memory.

    ``fn`` (features, scale) -> loss replaces the dispatcher's ``backend`` (a baseline).
    """
    case = CASES[objective]
    fn = fn or backend_call(objective, backend)
    xs, scale = make_inputs(objective, n, d, dtype, device)

    def step() -> None:
        for t in (*xs, scale):
            t.grad = None
        fn(xs, scale).backward()

    try:
        times = _times_ms(fn, xs, scale, device, repeats, warmup)
        mem = memory_use(step, device)
    except torch.OutOfMemoryError:
        _release(device)
        return None
    flops = case.flops(n, d) if case.flops else None
    return _row(objective, backend, n, d, dtype, device, times, mem.peak_bytes, flops)
