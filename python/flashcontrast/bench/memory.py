"""Peak memory of a call, measured on the CPU allocator or the CUDA caching allocator.

On the CPU, torch.profiler's memory events carry a running total of live bytes; its peak
over the call, less its value just before the call's first allocation, and the largest
single allocation, are what a call costs beyond its inputs. On CUDA the caching allocator keeps
its own peak counter.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class MemoryUse:
    """Bytes a call allocated beyond what was live when it started."""

    peak_bytes: int
    largest_allocation: Optional[int]  # None where the allocator does not say (CUDA)


def _cpu_memory_use(fn: Callable[[], object]) -> MemoryUse:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = [e for e in events if e.get("name") == "[memory]"]
    cpu = [
        e["args"]
        for e in sorted(memory, key=lambda e: e["ts"])
        if e["args"].get("Device Type") == 0
    ]
    if not cpu:
        return MemoryUse(peak_bytes=0, largest_allocation=0)
    # The running total is the profiler's count of live bytes it has seen allocated, which
    # includes blocks from earlier profiling sessions that are still alive: measure from
    # the total just before this call's first event.
    baseline = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    peak = max(a["Total Allocated"] for a in cpu) - baseline
    largest = max(a["Bytes"] for a in cpu)
    return MemoryUse(peak_bytes=max(peak, 0), largest_allocation=max(largest, 0))


def _cuda_memory_use(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return MemoryUse(peak_bytes=peak, largest_allocation=None)


def memory_use(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    """Peak bytes allocated by ``fn()`` on ``device`` (CPU or CUDA), beyond the baseline.

    ``largest_allocation``, the biggest single allocation, is reported on the CPU only.
    """
    if device.type == "cuda":
        return _cuda_memory_use(fn, device)
    return _cpu_memory_use(fn)
