"""A roofline cost model: flops, bytes and exponentials of each objective x path, and the
time they predict on a device from its measured rates.

Every number here is a PREDICTION. The device rates are measurements (H200: docs/hardware.md,
measured on this project's H200 machines); the per-path efficiencies are
assumptions with their basis written beside them (a static review of the sm_90a output,
or plain arithmetic), until a GPU run of ``python -m flashcontrast.bench --gpu-report``
replaces them with measured rows. The benchmark's ``--dry-run`` uses this model for its
time estimates.

Counting (one training step = forward + backward, N rows, D features, bf16 inputs unless
said otherwise): a GEMM-equivalent is 2 N^2 D flops. CLIP and SigLIP take 4 of them (S
forward; S again, dS B and dS^T A backward). A tiled kernel's time is the largest of its
tensor-core time (flops over rate x efficiency), its memory time (bytes over the copy
bandwidth) and its exponential time (exps over the MUFU rate): the roofline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Device:
    """Rates of one device, as measured (``basis`` says where)."""

    name: str
    bf16_flops: float  # dense bf16 GEMM, flop/s
    fp32_flops: float  # fp32 GEMM without tensor cores (SIMT FFMA), flop/s
    copy_bytes: float  # device-to-device copy, bytes read + written per second
    exp_per_s: float  # exponentials per second (MUFU ex2)
    basis: str


H200 = Device(
    name="NVIDIA H200",
    bf16_flops=780e12,  # 769-798 TFLOP/s at 8192^3 on random data (docs/hardware.md)
    fp32_flops=50e12,  # datasheet 67 TFLOP/s FFMA; cuBLAS SGEMM reaches about 3/4 of it
    copy_bytes=4.3e12,  # measured, counting read + write (docs/hardware.md)
    exp_per_s=4.2e12,  # 16 per clock per SM x 132 SMs x 1.98 GHz (docs/hardware.md)
    basis="H200 rates measured on this project's H200 machines (docs/hardware.md), "
    "fp32 FFMA from the datasheet",
)


@dataclass(frozen=True)
class Cost:
    """What one forward + backward of an objective moves and computes."""

    flops: float  # tensor-core (or FFMA, for fp32 paths) floating-point operations
    bytes: float  # bytes through device memory, atomics counted as read + write
    exps: float  # exponentials (and logs, softplus: one MUFU op each)
    fp32_gemm: bool = False  # the GEMMs run as fp32 FFMA, not on tensor cores


#: Fraction of the tensor-core (or FFMA) rate each path's GEMM-shaped work reaches: the
#: assumption and its basis. Replaced by measured rows once a GPU report exists.
EFFICIENCY = {
    "matmul": (0.95, "cuBLAS at these shapes: the measured 8192^3 rate is the roof"),
    "reference": (0.70, "cuBLAS GEMMs of the materializing reference"),
    "openclip": (0.70, "cuBLAS GEMMs of OpenCLIP's dense loss"),
    "torch": (0.70, "cuBLAS fp32 GEMMs of the blockwise torch backend (it upcasts to fp32)"),
    "triton": (
        0.12,
        "static review of today's sm_90a Triton CLIP kernels: 10-20% backward (fp32 "
        "atomics for every tile and D-chunk), ~55% forward; 12-25% in all (the low end)",
    ),
    "cuda": (
        0.03,
        "static review of today's CUDA kernels: WMMA (mma.sync) with scalar, "
        "single-buffered operand loads: 3-6% (the low end)",
    ),
}


def gemm_equivalents(objective: str, m: int = 3) -> float:
    """GEMM-equivalents (2 N^2 D flops each) of one forward + backward, as the kernels
    implement it today (not the floor): CLIP / SigLIP 4; GRAM 7 K (K = M - 1, triton/
    gram.py); MV losses 4 over the (V N) rows counted by the caller; Symile "n" 4."""
    if objective in ("clip", "siglip", "symile-n", "mv-infonce", "mv-dhel"):
        return 4.0
    if objective == "gram":
        return 7.0 * (m - 1)
    raise ValueError(f"no GEMM count for {objective!r}")


def pair_cost(
    objective: str, path: str, n: int, d: int, elem_bytes: int = 2, rows: Optional[int] = None
) -> Cost:
    """Cost of one forward + backward of a pairwise objective at N = ``n`` (``rows`` for
    the self-similarity losses: V N), D = ``d``, features of ``elem_bytes`` bytes."""
    r = rows or n
    g = gemm_equivalents(objective)
    flops = g * 2.0 * r * r * d
    feature_bytes = 4 * r * d * elem_bytes  # read A, B; write dA, dB (once each)
    exps = 3.0 * r * r  # forward exp, backward two softmaxes
    if path in ("reference", "openclip"):
        # logits, softmax(es) and their gradient, N^2 each, written and read back
        return Cost(flops, feature_bytes + 8 * r * r * 4, exps)
    if path == "torch":
        # fp32 blocks of (rows x N): S, exp passes and dS, each written and read
        return Cost(flops, feature_bytes + 10 * r * r * 4, exps, fp32_gemm=True)
    if path == "triton":
        # backward fp32 atomics: dA and dB chunks per tile (read + write, 16 B each)
        atomics = 2 * 2 * (r / 64) * r * d * 4
        return Cost(flops, feature_bytes + atomics, exps)
    if path == "cuda":
        return Cost(flops, feature_bytes + 2 * (r / 64) * r * d * 4, exps)
    if path == "matmul":
        return Cost(2.0 * r * r * d, 3 * r * d * elem_bytes, 0.0)
    raise ValueError(f"unknown path {path!r}")


def predict_seconds(cost: Cost, path: str, device: Device = H200) -> float:
    """The roofline time of ``cost`` on ``device`` at ``path``'s assumed efficiency."""
    eff = EFFICIENCY[path][0]
    rate = device.fp32_flops if cost.fp32_gemm else device.bf16_flops
    return max(
        cost.flops / (rate * eff),
        cost.bytes / device.copy_bytes,
        cost.exps / device.exp_per_s,
    )


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    return flops / seconds / 1e12 if seconds > 0 else math.nan
