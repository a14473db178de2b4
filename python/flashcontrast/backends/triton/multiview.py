"""MV-InfoNCE / MV-DHEL negatives (objectives.md section 3) as Triton kernels.

Contract (the same as backends/blockwise/multiview.py, which spells it out)::

    selfsim_rowlse_forward(u, scale, per_view, groups) -> row_lse (V, N) fp32
    selfsim_rowlse_backward(u, scale, per_view, groups, row_lse, grad_rows)
        -> (du (V, N, D) in u's dtype, dscale 0-d fp32)

u (V, N, D) float32/float16/bfloat16 with any strides (read in place: row (l, i) lives at
l * stride_v + i * stride_n, no stacking copy); logits scale * <u_li, u_mj> in fp32; the
diagonal (and, with groups, columns j != i with groups[j] == groups[i]) masked to -inf.
per_view=False: one segment, the whole (V N, V N) stack (MV-InfoNCE); per_view=True: V
segments, the (N, N) per-view blocks (MV-DHEL).

Kernels, grid (row blocks of a segment, segments): a program owns one row block and sweeps
every column block of its segment, so no two programs write the same output (no atomics,
no partial buffers, deterministic).

``_selfsim_fwd_kernel`` (1 GEMM-equivalent): X = U[rows] @ U[cols]^T, S = s X with the
    excluded entries -inf, online (max, sumexp) per row; row_lse = m + log l (-inf for a
    row with no allowed column).
``_selfsim_bwd_kernel`` (2 GEMM-equivalents): the allowed set is symmetric, so
    d/du_r sum_q g_q lse_q = s sum_c T_rc u_c with T_rc = g_r P_rc + g_c P_cr, and
    P_cr = exp(S_rc - lse_c) (S symmetric): each tile needs only its row and column LSEs.
    du[rows] += s T @ U[cols] stays on chip (D in one chunk) or in the program's own rows
    of an fp32 (V N, D) buffer (D in chunks, read-modify-write, no atomics);
    dscale = 1/2 sum T * X (each unordered pair is seen from both of its rows), one
    partial per program. T / max|g| (values in [-2, 2]) is what goes to tl.dot in the
    input dtype, so fp16 never sees tiny gradients; max|g| * s is applied to the fp32
    product. Compared with CLIP's 3 backward GEMMs this is 2: symmetry removes the dB GEMM.

Excluded entries are -inf; every -inf max or LSE is replaced by 0 before it is subtracted
(inf - inf never occurs): temperatures down to 0.01 and many views stay finite.

Interpreter (TRITON_INTERPRET=1, CPU tensors): bf16 tiles are upcast to fp32 before
tl.dot (``_dot_setup``) and tiles default to 32 x 32; ``_plan.override_tiles`` forces them.
GPU tile sizes are untuned heuristics (never run on a GPU yet).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _INTERPRET,
    _TORCH_TO_TL,
    _check_runnable,
    _dot_setup,
    _guard,
    _index_64,
    _lse_finish,
    _online_lse,
    _tile_logits,
    _widen,
)
from ._plan import _OVERRIDE  # the one tile-override registry (_plan.override_tiles)

__all__ = ["selfsim_rowlse_backward", "selfsim_rowlse_forward"]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_offsets(local, seg, SEG_LEN, n, stride_v, stride_n, INDEX_64: tl.constexpr):
    """(element offset, sample id, global row) of local rows of segment seg."""
    r = _widen(seg * SEG_LEN + local, INDEX_64)
    sample = r % n
    return (r // n) * stride_v + sample * stride_n, sample, r


@triton.jit
def _allowed(rows, cols, rmask, cmask, sr, sc, g_ptr, HAS_GROUPS: tl.constexpr):
    """Tile mask of the allowed (row, column) pairs: valid, off the diagonal and, with
    groups, not two different samples of one group."""
    ok = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
    if HAS_GROUPS:
        gr = tl.load(g_ptr + sr, mask=rmask, other=0)
        gc = tl.load(g_ptr + sc, mask=cmask, other=0)
        same = (gr[:, None] == gc[None, :]) & (sr[:, None] != sc[None, :])
        ok = ok & (same == 0)
    return ok


# Forward: for each column block cb of the segment,
#   X = U[rows] @ U[cols]^T, S = s X (excluded entries -inf),
#   m' = max(m, max_c S), l' = l e^{m - m'} + sum_c e^{S - m'};  row_lse = m + log l.
@triton.jit
def _selfsim_fwd_kernel(
    u_ptr,
    scale_ptr,
    g_ptr,
    lse_ptr,  # (V N,) fp32
    n,
    D,
    SEG_LEN,
    stride_v,
    stride_n,
    stride_d,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rb = tl.program_id(0)
    seg = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < SEG_LEN
    roff, sr, r = _row_offsets(rows, seg, SEG_LEN, n, stride_v, stride_n, INDEX_64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for cb in range(0, tl.cdiv(SEG_LEN, BLOCK_N)):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < SEG_LEN
        coff, sc, _ = _row_offsets(cols, seg, SEG_LEN, n, stride_v, stride_n, INDEX_64)
        x = _tile_logits(
            u_ptr, u_ptr, roff, coff, rmask, cmask, D, 1, stride_d, 1, stride_d,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        ok = _allowed(rows, cols, rmask, cmask, sr, sc, g_ptr, HAS_GROUPS)
        s = tl.where(ok, x * scale, float("-inf"))
        m_i, l_i = _online_lse(m_i, l_i, s, 1)
    tl.store(lse_ptr + r, _lse_finish(m_i, l_i, rmask), mask=rmask)


# Backward: for each column block cb of the segment,
#   recompute X, S;  T = g_r e^{S - lse_r} + g_c e^{S - lse_c} (0 where excluded)
#   du[rows] += (s gmax) (T / gmax) @ U[cols];  dscale += 1/2 sum T * X
@triton.jit
def _selfsim_bwd_kernel(
    u_ptr,
    scale_ptr,
    g_ptr,
    lse_ptr,  # (V N,) fp32, -inf already replaced by 0
    grad_ptr,  # (V N,) fp32
    gmax_ptr,  # 0-d fp32: max |grad| (1 if all 0)
    du_ptr,  # (V N, D) fp32, contiguous, zeros
    part_ptr,  # (programs,) fp32: dscale partials
    n,
    D,
    SEG_LEN,
    stride_v,
    stride_n,
    stride_d,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rb = tl.program_id(0)
    seg = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    gmax = tl.load(gmax_ptr)
    inv_gmax = 1.0 / gmax
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < SEG_LEN
    roff, sr, r = _row_offsets(rows, seg, SEG_LEN, n, stride_v, stride_n, INDEX_64)
    lse_r = tl.load(lse_ptr + r, mask=rmask, other=0.0)
    g_r = tl.load(grad_ptr + r, mask=rmask, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    if ONE_CHUNK:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds_acc = 0.0
    for cb in range(0, tl.cdiv(SEG_LEN, BLOCK_N)):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < SEG_LEN
        coff, sc, c = _row_offsets(cols, seg, SEG_LEN, n, stride_v, stride_n, INDEX_64)
        lse_c = tl.load(lse_ptr + c, mask=cmask, other=0.0)
        g_c = tl.load(grad_ptr + c, mask=cmask, other=0.0)
        x = _tile_logits(
            u_ptr, u_ptr, roff, coff, rmask, cmask, D, 1, stride_d, 1, stride_d,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        ok = _allowed(rows, cols, rmask, cmask, sr, sc, g_ptr, HAS_GROUPS)
        s = tl.where(ok, x * scale, float("-inf"))
        t = g_r[:, None] * tl.exp(s - lse_r[:, None]) + g_c[None, :] * tl.exp(s - lse_c[None, :])
        t = tl.where(ok, t, 0.0)
        ds_acc += tl.sum(tl.sum(t * x, axis=1), axis=0)
        t_lo = (t * inv_gmax).to(DOT_DTYPE)
        if ONE_CHUNK:
            uc = tl.load(
                u_ptr + coff[:, None] + offs_d[None, :] * stride_d,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            acc = tl.dot(t_lo, uc, acc, input_precision=DOT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask_c = dd < D
                uc = tl.load(
                    u_ptr + coff[:, None] + dd[None, :] * stride_d,
                    mask=cmask[:, None] & dmask_c[None, :],
                    other=0.0,
                ).to(DOT_DTYPE)
                part = tl.dot(t_lo, uc, input_precision=DOT_PRECISION)
                ptrs = du_ptr + r[:, None] * D + dd[None, :]
                m2 = rmask[:, None] & dmask_c[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + part, mask=m2)
                # The next visit re-reads these rows: make the stores visible to every
                # thread of the program (a replicated layout may load elsewhere).
                tl.debug_barrier()
    out = scale * gmax
    if ONE_CHUNK:
        tl.store(
            du_ptr + r[:, None] * D + offs_d[None, :],
            acc * out,
            mask=rmask[:, None] & dmask[None, :],
        )
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            m2 = rmask[:, None] & (dd < D)[None, :]
            ptrs = du_ptr + r[:, None] * D + dd[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) * out, mask=m2)
    pid = seg * tl.num_programs(0) + rb
    tl.store(part_ptr + pid, 0.5 * ds_acc)


# ----------------------------------------------------------------------------- planning


def _plan(d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_d, num_warps). Untuned GPU heuristics: 64 x 64 tiles; the
    D chunk covers D up to 128 (16-bit) / 64 (fp32) so the backward keeps du on chip."""
    d_pad = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        bm, bn, bd, warps = 32, 32, min(d_pad, 64), 4
    else:
        bm, bn, warps = 64, 64, 4
        bd = min(d_pad, 64 if dtype == torch.float32 else 128)
    return (
        _OVERRIDE.get("block_m", bm),
        _OVERRIDE.get("block_n", bn),
        _OVERRIDE.get("block_d", bd),
        warps,
    )


# ----------------------------------------------------------------------------- launchers


def _prepare(u: Tensor, scale: Tensor, groups: Optional[Tensor]) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (V, N, D), got {tuple(u.shape)}")
    if u.dtype not in _TORCH_TO_TL:
        raise TypeError(
            f"Triton multiview kernels take float32, float16 or bfloat16, got {u.dtype}"
        )
    _check_runnable(u.device, "flashcontrast.backends.triton.multiview")
    for name, t in (("scale", scale), ("groups", groups)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device}, u on {u.device}")
    if scale.numel() != 1:
        raise ValueError("scale must be a single-element tensor")
    if groups is not None and groups.shape != (u.shape[1],):
        raise ValueError(f"groups must be (N,), got {tuple(groups.shape)}")
    if groups is not None and (groups.is_floating_point() or groups.dtype == torch.bool):
        raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")


def _geometry(u: Tensor, per_view: bool, block_m: int) -> tuple[int, int, int]:
    """(segment length, segments, row blocks per segment)."""
    v, n, _ = u.shape
    seg_len, segs = (n, v) if per_view else (v * n, 1)
    return seg_len, segs, triton.cdiv(seg_len, block_m)


def selfsim_rowlse_forward(
    u: Tensor, scale: Tensor, per_view: bool, groups: Optional[Tensor]
) -> Tensor:
    """(V, N) fp32 row LSEs over the allowed columns (contract above)."""
    _prepare(u, scale, groups)
    groups = None if groups is None else groups.contiguous()  # (N,): no copy normally
    v, n, d = u.shape
    lse = torch.empty(v * n, dtype=torch.float32, device=u.device)
    bm, bn, bd, warps = _plan(d, u.dtype, u.device)
    seg_len, segs, num_rb = _geometry(u, per_view, bm)
    dot_dtype, precision = _dot_setup(u.dtype, u.device)
    with _guard(u.device):
        _selfsim_fwd_kernel[(num_rb, segs)](
            u, scale, groups if groups is not None else scale, lse,
            n, d, seg_len, u.stride(0), u.stride(1), u.stride(2),
            HAS_GROUPS=groups is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            INDEX_64=_index_64(u),
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            num_warps=warps, num_stages=1 if _INTERPRET else 2,
        )  # fmt: skip
    return lse.view(v, n)


def selfsim_rowlse_backward(
    u: Tensor,
    scale: Tensor,
    per_view: bool,
    groups: Optional[Tensor],
    row_lse: Tensor,
    grad_rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """(du in u's dtype, dscale 0-d fp32) of sum grad_rows * row_lse (contract above)."""
    _prepare(u, scale, groups)
    groups = None if groups is None else groups.contiguous()
    v, n, d = u.shape
    if row_lse.shape != (v, n) or grad_rows.shape != (v, n):
        raise ValueError("row_lse and grad_rows must be (V, N)")
    lse = row_lse.to(torch.float32).reshape(-1)
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # empty rows: P = 0
    g = grad_rows.to(torch.float32).reshape(-1).contiguous()
    gmax = g.abs().amax()
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    du = torch.zeros((v * n, d), dtype=torch.float32, device=u.device)
    bm, bn, bd, warps = _plan(d, u.dtype, u.device)
    seg_len, segs, num_rb = _geometry(u, per_view, bm)
    part = torch.empty(num_rb * segs, dtype=torch.float32, device=u.device)
    dot_dtype, precision = _dot_setup(u.dtype, u.device)
    with _guard(u.device):
        _selfsim_bwd_kernel[(num_rb, segs)](
            u, scale, groups if groups is not None else scale, lse, g, gmax, du, part,
            n, d, seg_len, u.stride(0), u.stride(1), u.stride(2),
            HAS_GROUPS=groups is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            ONE_CHUNK=d <= bd,
            INDEX_64=_index_64(u, du),
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            num_warps=warps, num_stages=1 if _INTERPRET else 2,
        )  # fmt: skip
    return du.view(v, n, d), part.sum()
