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

    @property
    def tflops(self) -> float:
        """8 N^2 D flops per forward+backward (4 GEMM-equivalents of 2 N^2 D)."""
        return 8 * self.n**2 * self.d / (self.ms_median * 1e-3) / 1e12


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
        return None
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Row(
        backend,
        n,
        d,
        str(dtype).replace("torch.", ""),
        str(device),
        statistics.median(times),
        q[0],
        q[3],
        mem.peak_bytes / 2**20,
    )
