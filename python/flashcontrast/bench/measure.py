"""Forward+backward time and peak memory of one objective, backend and size.

Each objective is a :class:`Case`: how to make its inputs, how to call it, and how many
flops a forward+backward counts as (where a GEMM count is meaningful).
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
    ms_median: float
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


def _step(case: Case, backend: str, xs: list[torch.Tensor], scale: torch.Tensor) -> Callable:
    def step() -> None:
        for t in (*xs, scale):
            t.grad = None
        case.call(xs, scale, backend).backward()

    return step


def _times_ms(
    step: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1
) -> list[float]:
    """Wall times of ``step`` after ``warmup`` untimed calls; CUDA work timed with events."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _release(device: torch.device) -> None:
    """Hand cached blocks back after an out-of-memory, so later rows start clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(objective, backend, n, d, dtype, device, times, peak_bytes, flops) -> Row:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    name = str(dtype).replace("torch.", "")
    median = statistics.median(times)
    return Row(
        objective, backend, n, d, name, str(device), median, q[0], q[3], peak_bytes / 2**20, flops
    )


def measure_matmul(n: int, d: int, device: torch.device, repeats: int) -> Optional[Row]:
    """The speed-of-light row: one plain bfloat16 torch matmul (N, D) @ (D, N)."""
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    try:
        times = _times_ms(lambda: torch.mm(a, b.t()), device, repeats)
        mem = memory_use(lambda: torch.mm(a, b.t()), device)
    except torch.OutOfMemoryError:
        _release(device)
        return None
    return _row(
        "matmul", "matmul-bf16", n, d, torch.bfloat16, device, times, mem.peak_bytes, 2 * n * n * d
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


def measure(
    objective: str,
    backend: str,
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
) -> Optional[Row]:
    """Time and peak memory of one configuration; None if it ran out of memory."""
    case = CASES[objective]
    xs = [
        torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
        .to(dtype)
        .requires_grad_()
        for _ in range(case.modalities)
    ]
    scale = torch.tensor(case.scale, device=device, requires_grad=True)
    step = _step(case, backend, xs, scale)
    try:
        times = _times_ms(step, device, repeats, warmup)
        mem = memory_use(step, device)
    except torch.OutOfMemoryError:
        _release(device)
        return None
    flops = case.flops(n, d) if case.flops else None
    return _row(objective, backend, n, d, dtype, device, times, mem.peak_bytes, flops)
