"""Peak memory of a call, measured on the CPU allocator or the CUDA caching allocator.

On the CPU, torch.profiler's memory events carry a running total of live bytes; its peak
over the call, less its value just before the call's first allocation, and the largest
single allocation, are what a call costs beyond its inputs. On CUDA the caching allocator keeps
its own peak counter.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class MemoryUse:
    """Bytes a call allocated beyond what was live when it started."""

    peak_bytes: int
    largest_allocation: Optional[int]  # None where the allocator does not say (CUDA)


@contextlib.contextmanager
def _quiet_native_output():
    """Send the process's stdout and stderr file descriptors to /dev/null for a while.

    torch.profiler's native side prints "profiler_start" / "profiler_stop" lines and a
    CPUAllocator warning straight to the file descriptors, past Python's sys.stdout, on
    every profiled call; they would land between the benchmark's rows. Python exceptions
    are unaffected (they propagate, and are printed after the descriptors are restored).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _cpu_memory_use(fn: Callable[[], object]) -> MemoryUse:
    with _quiet_native_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's own Python warnings, if any
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
