"""SigLIP (objectives.md section 2) as Triton kernels: O(N D) memory, 4 GEMMs.

Contract (as ``flashcontrast/backends/blockwise/siglip.py``)::

    siglip_forward(a, b, scale, bias) -> total
        a, b: (N, D) float32, float16 or bfloat16, one dtype, same device, any strides.
        scale: 0-d (s, already exp'd); bias: 0-d or None (0). S = scale * a @ b^T + bias
        accumulated in fp32, z_ij = +1 if i == j else -1.
        total: 0-d fp32, sum_ij -log sigmoid(z_ij S_ij) (stable softplus, any scale).
    siglip_backward(a, b, scale, bias, grad) -> (da, db, dscale, dbias)
        for L = total / N with upstream scalar grad:
        dS_ij = -(grad / N) z_ij sigmoid(-z_ij S_ij) = (grad / N) (sigmoid(S_ij) - [i == j])
        da = s dS @ B, db = s dS^T @ A (input dtype); dscale = sum dS * (A @ B^T),
        dbias = sum dS (0-d fp32).

GEMM count (one GEMM-equivalent = 2 N^2 D flops): forward 1 (S) + backward 3 (recompute
S, Q @ B, Q^T @ A) = **4**, the floor. No logits are stored: the forward is a pure tile
sum and the backward needs no saved statistics at all.

Kernels
-------
``_siglip_fwd_kernel``, grid (G, H) as CLIP's forward (the same planner): program (g, h)
sums softplus(-z S) over the tiles (rb, cb) with rb = g (mod G), cb = h (mod H) and
writes its one fp32 partial to a (G * H,) buffer, summed by torch. No atomics: the total
is deterministic run to run.

``_siglip_bwd_kernel``, grid (column blocks, SPLIT), CLIP's backward with
Q = sigmoid(S) - I in place of P_row + P_col - 2I: program (cb, p) keeps its B column
block (and, when D fits one chunk, its dB accumulator) on chip, visits row blocks
rb = p (mod SPLIT), and adds dA partials through fp32 atomics into an (N, D) buffer (dB
too, per tile, when D spans several chunks). ds and db partials go to a (2, programs)
buffer summed by torch. dA (and dB when SPLIT > 1 or D spans chunks) are sums of fp32
atomics, equal run to run only up to rounding.

Numerics: softplus(t) = max(t, 0) + log1p(exp(-|t|)) with log1p written as
log(u) * e / (u - 1), u = 1 + e (exact to a few ulps for tiny e; Triton has no
portable log1p), so S = +-1e4 is finite and exact. Q in [-1, 1] with the diagonal
computed as -sigmoid(-S_ii) (no cancellation where sigmoid(S_ii) rounds to 1); Q is cast
to the input dtype for the two tensor-core GEMMs and (grad / N) * s is applied to their
fp32 results. Masked (padded) entries contribute 0 to every sum.

Tiles, program counts, the D chunk and the interpreter handling (bf16 tiles upcast to
fp32 before tl.dot under TRITON_INTERPRET=1) are CLIP's: see
``flashcontrast.backends.triton.clip`` and ``_plan.py``, whose ``override_tiles`` also
governs these kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _TORCH_TO_TL,
    _check_runnable,
    _dot_setup,
    _guard,
    _index_64,
    _load_rows,
    _load_rows_t,
    _sigmoid,
    _softplus,
    _tile_logits,
    _widen,
)
from ._plan import _backward_plan, _forward_plan

__all__ = ["siglip_backward", "siglip_forward"]


# ----------------------------------------------------------------------------- kernels


# Forward, one sweep, 1 GEMM-equivalent: for every tile (rb, cb) owned by this program,
#   X = A[rb] @ B[cb]^T,  S = s X + b
#   acc += sum_ij softplus(-z_ij S_ij)      (-z S = S off the diagonal, -S on it; 0 masked)
@triton.jit
def _siglip_fwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    part_ptr,  # (G * H,) fp32: one partial total per program
    N,
    D,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_h = tl.program_id(1)
    G = tl.num_programs(0)
    H = tl.num_programs(1)
    num_rb = tl.cdiv(N, BLOCK_M)
    num_cb = tl.cdiv(N, BLOCK_N)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for rb in range(pid_g, num_rb, G):
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        rows = _widen(rows, INDEX_64)
        if ONE_CHUNK:
            a_tile = _load_rows(a_ptr, rows, rmask, offs_d, dmask, stride_an, stride_ad, DOT_DTYPE)
        for cb in range(pid_h, num_cb, H):
            cols = cb * BLOCK_N + offs_n
            cmask = cols < N
            cols = _widen(cols, INDEX_64)
            if ONE_CHUNK:
                bt = _load_rows_t(
                    b_ptr, cols, cmask, offs_d, dmask, stride_bn, stride_bd, DOT_DTYPE
                )
                x = tl.dot(a_tile, bt, input_precision=DOT_PRECISION)
            else:
                x = _tile_logits(
                    a_ptr, b_ptr, rows, cols, rmask, cmask, D,
                    stride_an, stride_ad, stride_bn, stride_bd,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
                )  # fmt: skip
            s = x * scale + bias
            t = tl.where(rows[:, None] == cols[None, :], -s, s)  # -z S
            valid = rmask[:, None] & cmask[None, :]
            acc += tl.sum(tl.where(valid, _softplus(t), 0.0), axis=1)

    tl.store(part_ptr + pid_g * H + pid_h, tl.sum(acc, axis=0))


# Backward, 3 GEMM-equivalents: for every tile (rb, cb),
#   X  = A[rb] @ B[cb]^T                      recompute    (1 GEMM over all tiles)
#   Q  = sigmoid(sX + b) - [i == j]           (masked entries 0)
#   dA[rb] += (c s) Q @ B[cb]                 fp32 atomics (1 GEMM)
#   dB[cb] += (c s) Q^T @ A[rb]               on chip      (1 GEMM)
#   ds += c sum(Q * X),  db += c sum(Q)       elementwise, no GEMM      (c = grad / N)
@triton.jit
def _siglip_bwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    grad_ptr,
    da_ptr,  # (N, D) fp32, contiguous, zeros
    db_ptr,  # (N, D) fp32, contiguous, zeros
    part_ptr,  # (2, programs) fp32: ds and db partials
    N,
    D,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    SPLIT = tl.num_programs(1)
    num_rb = tl.cdiv(N, BLOCK_M)
    count = tl.cdiv(num_rb - sp, SPLIT)  # row blocks rb = sp (mod SPLIT); sp < num_rb

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    coef = tl.load(grad_ptr).to(tl.float32) / N
    out_scale = coef * scale

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    cols = _widen(cols, INDEX_64)
    if ONE_CHUNK:
        bt = _load_rows_t(b_ptr, cols, cmask, offs_d, dmask, stride_bn, stride_bd, DOT_DTYPE)
        db_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for t in range(0, count):
        rb = sp + ((t + cb) % count) * SPLIT  # staggered: neighbours hit different rows
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        rows = _widen(rows, INDEX_64)
        if ONE_CHUNK:
            a_tile = _load_rows(a_ptr, rows, rmask, offs_d, dmask, stride_an, stride_ad, DOT_DTYPE)
            x = tl.dot(a_tile, bt, input_precision=DOT_PRECISION)
        else:
            x = _tile_logits(
                a_ptr, b_ptr, rows, cols, rmask, cmask, D,
                stride_an, stride_ad, stride_bn, stride_bd,
                BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
        s = x * scale + bias
        on_diag = rows[:, None] == cols[None, :]
        q = _sigmoid(tl.where(on_diag, -s, s))
        q = tl.where(on_diag, -q, q)  # sigmoid(S) - 1 = -sigmoid(-S) on the diagonal
        q = tl.where(rmask[:, None] & cmask[None, :], q, 0.0)
        ds_acc += tl.sum(q * x, axis=1)
        dbias_acc += tl.sum(q, axis=1)
        q_lo = q.to(DOT_DTYPE)

        if ONE_CHUNK:
            db_acc = tl.dot(tl.trans(q_lo), a_tile, db_acc, input_precision=DOT_PRECISION)
            da = tl.dot(q_lo, tl.trans(bt), input_precision=DOT_PRECISION)
            tl.atomic_add(
                da_ptr + rows[:, None] * D + offs_d[None, :],
                da * out_scale,
                mask=rmask[:, None] & dmask[None, :],
                sem="relaxed",
            )
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask_c = dd < D
                a_c = _load_rows(a_ptr, rows, rmask, dd, dmask_c, stride_an, stride_ad, DOT_DTYPE)
                b_c = _load_rows(b_ptr, cols, cmask, dd, dmask_c, stride_bn, stride_bd, DOT_DTYPE)
                db_c = tl.dot(tl.trans(q_lo), a_c, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    db_ptr + cols[:, None] * D + dd[None, :],
                    db_c * out_scale,
                    mask=cmask[:, None] & dmask_c[None, :],
                    sem="relaxed",
                )
                da_c = tl.dot(q_lo, b_c, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    da_ptr + rows[:, None] * D + dd[None, :],
                    da_c * out_scale,
                    mask=rmask[:, None] & dmask_c[None, :],
                    sem="relaxed",
                )

    if ONE_CHUNK:
        tl.atomic_add(
            db_ptr + cols[:, None] * D + offs_d[None, :],
            db_acc * out_scale,
            mask=cmask[:, None] & dmask[None, :],
            sem="relaxed",
        )
    pid = cb * SPLIT + sp
    num_programs = tl.num_programs(0) * SPLIT
    tl.store(part_ptr + pid, tl.sum(ds_acc, axis=0) * coef)
    tl.store(part_ptr + num_programs + pid, tl.sum(dbias_acc, axis=0) * coef)


# ----------------------------------------------------------------------------- launchers


def _prepare(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _TORCH_TO_TL:
        raise TypeError(
            f"Triton SigLIP kernels take float32, float16 or bfloat16 a and b of one dtype, "
            f"got {a.dtype} and {b.dtype}"
        )
    device = a.device
    _check_runnable(device, "flashcontrast.backends.triton.siglip")
    for name, t in (("b", b), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, a on {device}")
    if scale.numel() != 1 or (bias is not None and bias.numel() != 1):
        raise ValueError("scale and bias must be single-element tensors")


def siglip_forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """total = sum_ij -log sigmoid(z_ij S_ij), 0-d float32."""
    _prepare(a, b, scale, bias)
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    if n == 0:
        return torch.zeros((), **f32)
    if d == 0:  # S = bias everywhere: N softplus(-b) + (N^2 - N) softplus(b)
        b0 = bias.float().reshape(()) if bias is not None else torch.zeros((), **f32)
        sp = torch.nn.functional.softplus
        return n * sp(-b0, threshold=1e9) + (n * n - n) * sp(b0, threshold=1e9)
    tiles, g, h = _forward_plan(n, d, a.dtype, a.device)
    dot_dtype, precision = _dot_setup(a.dtype, a.device)
    part = torch.empty(g * h, **f32)
    with _guard(a.device):
        _siglip_fwd_kernel[(g, h)](
            a, b, scale, bias if bias is not None else scale, part,
            n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
            ONE_CHUNK=d <= tiles.block_d,
            INDEX_64=_index_64(a, b),
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return part.sum()


def siglip_backward(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], grad: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(da, db, dscale, dbias) of L = total / N for dL = grad; da/db in the input dtype."""
    _prepare(a, b, scale, bias)
    if grad.device != a.device:
        raise ValueError(f"grad is on {grad.device}, a on {a.device}")
    if grad.numel() != 1:
        raise ValueError("grad must be a single element")
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    da = torch.zeros((n, d), **f32)
    db = torch.zeros((n, d), **f32)
    if n == 0 or d == 0:
        zero = torch.zeros((), **f32)
        if n and bias is not None:  # d == 0: dbias = grad/N (N^2 sigmoid(b) - N)
            dbias = grad.float().reshape(()) * (n * torch.sigmoid(bias.float().reshape(())) - 1)
            return da.to(a.dtype), db.to(b.dtype), zero, dbias
        return da.to(a.dtype), db.to(b.dtype), zero, zero.clone()
    tiles, num_cb, split = _backward_plan(n, d, a.dtype, a.device)
    dot_dtype, precision = _dot_setup(a.dtype, a.device)
    part = torch.empty((2, num_cb * split), **f32)
    with _guard(a.device):
        _siglip_bwd_kernel[(num_cb, split)](
            a, b, scale, bias if bias is not None else scale, grad,
            da, db, part,
            n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
            ONE_CHUNK=d <= tiles.block_d,
            INDEX_64=_index_64(a, b, da),
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    dscale = part[0].sum()
    dbias = part[1].sum()
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
