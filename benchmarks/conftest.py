"""pytest-benchmark suite options: ``--bench-large`` for GPU sizes, device-event timing.

Not part of the default ``pytest`` run (testpaths = ["tests"]); run it with
``pytest benchmarks`` (see README.md here).
"""

from __future__ import annotations

import time

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--bench-large",
        action="store_true",
        help="GPU sizes (N from 4096, D = 512, bfloat16) instead of the small default",
    )


class CudaEventClock:
    """A pytest-benchmark timer on the GPU's timeline: seconds between CUDA events.

    Each reading records an event on the current stream and waits for it, so the time
    between two readings is what the device spent on the work queued between them.
    """

    def __init__(self):
        self._origin = None

    def __call__(self) -> float:
        if self._origin is None:
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return self._origin.elapsed_time(event) * 1e-3

    def __repr__(self) -> str:
        return "CudaEventClock"


def pytest_collection_modifyitems(config, items):
    """CUDA cases use device events as their timer; CPU cases the host clock."""
    clock = CudaEventClock()
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("device") == "cuda":
            item.add_marker(pytest.mark.benchmark(timer=clock))
        else:
            item.add_marker(pytest.mark.benchmark(timer=time.perf_counter))
