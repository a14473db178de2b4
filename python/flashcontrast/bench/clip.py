"""CLIP InfoNCE forward+backward: time and peak memory per backend and batch size."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import functional
from .memory import memory_use


@dataclass
class Row:
    """One measurement: an implementation at one (N, D, dtype) on one device."""

    backend: str
    n: int
    d: int
    dtype: str
    device: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    peak_mib: float
    gemms: int = 4  # GEMM-equivalents of 2 N^2 D flops the row's work counts as

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s: a forward+backward counts as 8 N^2 D flops (4 GEMMs of
        2 N^2 D), whatever an implementation actually spends; a matmul row as 2 N^2 D."""
        return self.gemms * 2 * self.n**2 * self.d / (self.ms_median * 1e-3) / 1e12


def _step(backend: str, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> Callable:
    def step() -> None:
        a.grad = b.grad = scale.grad = None
        functional.clip_loss(a, b, scale, backend=backend).backward()

    return step


def _times_ms(step: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Wall times of ``step`` after one warm-up; CUDA work timed with device events."""
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


def _row(backend, n, d, dtype, device, times, peak_bytes, gemms=4) -> Row:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    name = str(dtype).replace("torch.", "")
    median = statistics.median(times)
    return Row(backend, n, d, name, str(device), median, q[0], q[3], peak_bytes / 2**20, gemms)


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
    return _row("matmul-bf16", n, d, torch.bfloat16, device, times, mem.peak_bytes, gemms=1)


def measure(
    backend: str, n: int, d: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> Optional[Row]:
    """Time and peak memory of one configuration; None if it ran out of memory."""
    a = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
    a = a.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    step = _step(backend, a, b, scale)
    try:
        times = _times_ms(step, device, repeats)
        mem = memory_use(step, device)
    except torch.OutOfMemoryError:
        _release(device)
        return None
    return _row(backend, n, d, dtype, device, times, mem.peak_bytes)
