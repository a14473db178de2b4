"""The record of which kernels have passed on a GPU: what ``backend="auto"`` may pick.

A GPU kernel computes a user's loss unasked only once it has passed the correctness smoke
of ``python -m flashcontrast.bench --gpu-report`` on that class of device: every shape of
the smoke (odd N, D not a multiple of 16, N^2 > 2^31) in that dtype, against the float64
reference by the verification rule. The report writes what passed to
``benchmarks/results/<device>/verification-<date>.json``; ``python -m
flashcontrast.bench.record FILE`` adds it to ``verified_gpu.json`` beside this module,
which is committed and shipped in the wheel. Until an entry for (device class, objective,
backend, dtype) is there, ``auto`` on CUDA tensors picks "torch" (blockwise PyTorch,
cuBLAS GEMMs: correct wherever torch is).

Device class: the compute capability, "sm_90" for an H100 or H200: the kernels and the
code Triton generates depend on it, not on the product name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

RECORD = Path(__file__).with_name("verified_gpu.json")


def _load(path: Path) -> frozenset:
    """{(device_class, objective, backend, dtype)} of every record in ``path``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return frozenset()
    entries = set()
    for record in data.get("records", []):
        for objective, backend, dtype in record.get("passed", []):
            entries.add((record["device_class"], objective, backend, dtype))
    return frozenset(entries)


#: Loaded once, at import: a constant while torch.compile traces.
VERIFIED: frozenset = _load(RECORD)


def device_class(device: torch.device) -> Optional[str]:
    """ "sm_90" for a CUDA device of compute capability 9.0; None for other devices."""
    if device.type != "cuda":
        return None
    return _cuda_class(-1 if device.index is None else device.index)


@torch.compiler.assume_constant_result
def _cuda_class(index: int) -> str:
    # A fact of the machine, asked while tracing: Dynamo runs it and keeps the answer.
    if not torch.cuda.is_available():
        return "no-cuda-device"
    major, minor = torch.cuda.get_device_capability(None if index < 0 else index)
    return f"sm_{major}{minor}"


def is_verified(device: torch.device, objective: str, backend: str, dtype: torch.dtype) -> bool:
    """Whether a GPU report has passed ``backend``'s ``objective`` kernels in ``dtype`` on
    this class of device."""
    cls = device_class(device)
    name = str(dtype).replace("torch.", "")
    return cls is not None and (cls, objective, backend, name) in VERIFIED
