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
bandwidth) and its exponential time (exps over the MUFU rate): the roofline. A path made
of several kernels in sequence (the panel paths: cuBLAS GEMMs and memory-bound epilogues)
is a list of :class:`Stage` s, each timed by its own roofline and the times summed: no
overlap between kernels is assumed.

``python -m flashcontrast.costmodel`` prints the README's table of predictions.
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
    memory: float  # device memory, bytes (the panel paths' default panel size)
    basis: str


H200 = Device(
    name="NVIDIA H200",
    bf16_flops=780e12,  # 769-798 TFLOP/s at 8192^3 on random data (docs/hardware.md)
    fp32_flops=50e12,  # datasheet 67 TFLOP/s FFMA; cuBLAS SGEMM reaches about 3/4 of it
    copy_bytes=4.3e12,  # measured, counting read + write (docs/hardware.md)
    exp_per_s=4.2e12,  # 16 per clock per SM x 132 SMs x 1.98 GHz (docs/hardware.md)
    memory=139 * 2**30,  # about 139 GiB usable (the device machine's description)
    basis="H200 rates measured on this project's H200 machines (docs/hardware.md), "
    "fp32 FFMA from the datasheet",
)


@dataclass(frozen=True)
class Stage:
    """One kernel (or one run of like kernels) of a multi-kernel path."""

    name: str
    flops: float
    bytes: float
    exps: float = 0.0


@dataclass(frozen=True)
class Cost:
    """What one forward + backward of an objective moves and computes."""

    flops: float  # tensor-core (or FFMA, for fp32 paths) floating-point operations
    bytes: float  # bytes through device memory, atomics counted as read + write
    exps: float  # exponentials (and logs, softplus: one MUFU op each)
    fp32_gemm: bool = False  # the GEMMs run as fp32 FFMA, not on tensor cores
    stages: tuple[Stage, ...] = ()  # kernels in sequence: each its own roofline, summed


#: Fraction of the tensor-core (or FFMA) rate each path's GEMM-shaped work reaches: the
#: assumption and its basis. Replaced by measured rows once a GPU report exists.
EFFICIENCY = {
    "matmul": (0.95, "cuBLAS at these shapes: the measured 8192^3 rate is the roof"),
    "reference": (0.70, "cuBLAS GEMMs of the materializing reference"),
    "openclip": (0.70, "cuBLAS GEMMs of OpenCLIP's dense loss"),
    "torch": (
        0.70,
        "cuBLAS GEMMs of the blockwise torch backend (bf16 ones at the panel shapes for "
        "16-bit CLIP / SigLIP; fp32 for the other objectives, which upcast)",
    ),
    "panel": (
        0.90,
        "cuBLAS bf16 GEMMs at the panel shapes (thousands of rows x N x D, K = D, N or "
        "R): the large-GEMM regime of the measured 8192^3 rate, less 5% for the shapes; "
        "the Triton epilogues are memory-bound stages of their own",
    ),
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
    implement it today: CLIP / SigLIP 4; GRAM 4 K (K = M - 1, triton/gram.py: K forward,
    K recomputed, 2 K gradients, the contract's floor); MV losses 4 over the (V N) rows
    counted by the caller; Symile "n" 4."""
    if objective in ("clip", "siglip", "symile-n", "mv-infonce", "mv-dhel"):
        return 4.0
    if objective == "gram":
        return 4.0 * (m - 1)
    raise ValueError(f"no GEMM count for {objective!r}")


#: Bytes per logit the panel paths' epilogues move besides their GEMMs, forward and
#: backward. "panel" (triton/panel.py): the statistics kernel reads X (4), the gradient
#: kernel reads X and writes dS in 16 bits (4 + 2). "torch" (blockwise/pair.py, counted
#: pass by pass for CLIP): forward S = s X (4 + 4), per direction amax, S - max, exp, sum
#: (4 + 8 + 8 + 4); backward S again (8), zeros (4), per direction S - max, - log sum,
#: exp, times the coefficients, added to dS (8 + 8 + 8 + 8 + 12), sum dS (4), sum dS X
#: (8), dS rounded to 16 bits (4 + 2).
EPILOGUE_BYTES = {"panel": (4, 6), "torch": (56, 118)}


def panel_bytes_per_entry(path: str, elem_bytes: int = 2) -> int:
    """Bytes per (row, column) entry a panel holds: the torch backend's
    ``PANEL_BYTES_PER_ENTRY``; the Triton panel's X in float32 and dS in the input dtype."""
    from .backends.blockwise import PANEL_BYTES_PER_ENTRY

    return 4 + elem_bytes if path == "panel" else PANEL_BYTES_PER_ENTRY


def default_panel_rows(
    m: int, path: str = "panel", elem_bytes: int = 2, device: Device = H200
) -> int:
    """Rows per panel against ``m`` columns with the default budget on ``device``
    (``backends.blockwise.PANEL_FRACTION`` of its memory, :func:`panel_bytes_per_entry`)."""
    from .backends.blockwise import PANEL_FRACTION

    per_entry = panel_bytes_per_entry(path, elem_bytes)
    return max(1, int(device.memory * PANEL_FRACTION) // per_entry // max(m, 1))


def panel_stages(path: str, r: int, d: int, elem_bytes: int, panel: int) -> tuple[Stage, ...]:
    """The kernels of one forward + backward on a panel path ("panel" or "torch"), r x r
    logits in panels of ``panel`` rows: four GEMMs (X forward, X again, dA = dS B,
    dB += dS^T A) and the epilogues of :data:`EPILOGUE_BYTES`."""
    logits, gemm = float(r) * r, 2.0 * r * r * d
    panels = math.ceil(r / panel)
    fwd, bwd = EPILOGUE_BYTES[path]
    x_bytes = 4 * logits + panels * r * d * elem_bytes + r * d * elem_bytes  # X out, B, A in
    return (
        Stage("X = A B^T (forward)", gemm, x_bytes),
        Stage("statistics", 0.0, fwd * logits, logits),
        Stage("X = A B^T (backward)", gemm, x_bytes),
        Stage("dS", 0.0, bwd * logits, 2 * logits),
        # dS in 16 bits read once per product; dA written; dB read and written per panel
        Stage("dA = dS B", gemm, 2 * logits + panels * r * d * elem_bytes + 4 * r * d),
        Stage("dB += dS^T A", gemm, 2 * logits + r * d * elem_bytes + panels * 8 * r * d),
    )


def pair_cost(
    objective: str,
    path: str,
    n: int,
    d: int,
    elem_bytes: int = 2,
    rows: Optional[int] = None,
    panel: Optional[int] = None,
) -> Cost:
    """Cost of one forward + backward of a pairwise objective at N = ``n`` (``rows`` for
    the self-similarity losses: V N), D = ``d``, features of ``elem_bytes`` bytes;
    ``panel``: rows per panel on the panel paths (None: :func:`default_panel_rows`)."""
    r = rows or n
    g = gemm_equivalents(objective)
    flops = g * 2.0 * r * r * d
    feature_bytes = 4 * r * d * elem_bytes  # read A, B; write dA, dB (once each)
    exps = 3.0 * r * r  # forward exp, backward two softmaxes
    if path in EPILOGUE_BYTES:
        rows_per_panel = panel or default_panel_rows(r, path, elem_bytes)
        stages = panel_stages(path, r, d, elem_bytes, rows_per_panel)
        return Cost(
            sum(st.flops for st in stages),
            sum(st.bytes for st in stages),
            sum(st.exps for st in stages),
            fp32_gemm=elem_bytes == 4,
            stages=stages,
        )
    if path in ("reference", "openclip"):
        # the GEMMs, then the logits, softmax(es) and their gradient, N^2 float32 each,
        # written and read back by kernels of their own
        passes = 8 * r * r * 4
        stages = (Stage("GEMMs", flops, feature_bytes), Stage("softmaxes", 0.0, passes, exps))
        return Cost(flops, feature_bytes + passes, exps, stages=stages)
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

    def roofline(flops: float, nbytes: float, exps: float) -> float:
        return max(flops / (rate * eff), nbytes / device.copy_bytes, exps / device.exp_per_s)

    if cost.stages:
        return sum(roofline(st.flops, st.bytes, st.exps) for st in cost.stages)
    return roofline(cost.flops, cost.bytes, cost.exps)


def gemm_fraction(objective: str, path: str, n: int, d: int, device: Device = H200) -> float:
    """The predicted fraction of ``device``'s GEMM rate (the issue's measure: 8 N^2 D flops
    of CLIP / SigLIP over the time, over the measured bf16 rate), bf16 features."""
    seconds = predict_seconds(pair_cost(objective, path, n, d), path, device)
    return 4 * 2.0 * n * n * d / seconds / device.bf16_flops


def choose_pair_path(
    n: int, m: int, d: int, elem_bytes: int, device: Device = H200, fused: str = "triton"
) -> str:
    """ "panel" or "fused": the faster path for an (n x m) sweep at D = ``d`` by this model
    (CLIP's counts, the square of n m's geometric mean), the fused path being ``fused``'s
    kernels ("triton" or "cuda"), until measured rows replace it."""
    side = max(1, round(math.sqrt(n * m)))
    fused_s = predict_seconds(pair_cost("clip", fused, side, d, elem_bytes), fused, device)
    panel = predict_seconds(pair_cost("clip", "panel", side, d, elem_bytes), "panel", device)
    return "panel" if panel < fused_s else "fused"


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    return flops / seconds / 1e12 if seconds > 0 else math.nan


#: The README's table: CLIP / SigLIP forward + backward at N = 65,536 in bf16.
TABLE_PATHS = ("reference", "torch", "triton", "panel", "cuda")
_LABELS = {"reference": "dense reference", "torch": "torch backend", "triton": "Triton fused",
           "panel": "Triton panel", "cuda": "CUDA tiles"}  # fmt: skip


def table(n: int = 65536, dims: tuple[int, ...] = (256, 512, 1024)) -> str:
    """A Markdown table of predicted times and GEMM-rate fractions on an H200."""
    head = "| objective | D | " + " | ".join(_LABELS[p] for p in TABLE_PATHS) + " | Triton `auto` |"
    lines = [head, "|" + "---|" * (len(TABLE_PATHS) + 3)]
    for objective in ("clip", "siglip"):
        for d in dims:
            cells = []
            for path in TABLE_PATHS:
                ms = predict_seconds(pair_cost(objective, path, n, d), path) * 1e3
                cells.append(f"{ms:,.0f} ms ({gemm_fraction(objective, path, n, d):.0%})")
            pick = choose_pair_path(n, n, d, 2)
            lines.append(f"| {objective} | {d} | " + " | ".join(cells) + f" | {pick} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"PREDICTED (flashcontrast.costmodel, {H200.name}, N = 65,536, bf16):\n")
    print(table())
