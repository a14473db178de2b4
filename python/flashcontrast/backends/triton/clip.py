"""CLIP InfoNCE (objectives.md section 1) as Triton kernels: O(N D) memory, 4 GEMMs.

Contract: flashcontrast/backends/__init__.py. With S = s * A @ B^T + b (fp32 accumulation),

    clip_forward  -> row_lse_i = LSE_j S_ij, col_lse_j = LSE_i S_ij, diag_i = S_ii
    clip_backward -> dA = s dS @ B, dB = s dS^T @ A, ds = sum dS * (A @ B^T), db = sum dS
                     dS = grad / (2N) * (P_row + P_col - 2 I)

GEMM count (one GEMM-equivalent = 2 N^2 D flops): forward 1 (S) + backward 3 (recompute
S, dP @ B, dP^T @ A) = **4**, the floor named in objectives.md. ds and db cost no GEMM: they
are tile-local elementwise sums of dP * (A @ B^T) and dP, where A @ B^T is the fp32
accumulator the backward already holds to recompute S. Nothing of size N x N is ever
allocated: the extra memory is O((G + H) N) in the forward and O(N D) in the backward.

Kernels
-------
``_clip_fwd_kernel``, grid (G, H): program (g, h) owns row blocks g, g+G, ... and column
blocks h, h+H, ...; it sweeps the tiles (rb, cb) of that product once, keeping for each of
its row blocks an online (max, sumexp) in registers and, for each of its column blocks, an
online (max, sumexp) in row g of a (G, N) fp32 partial buffer. No two programs touch the
same partial entries (rows are exclusive in h, columns in g), so the kernel needs no
atomics, no locks and no zero-fill (a program's first visit writes, later visits
read-modify-write) and is deterministic. The diagonal comes from the tile that holds it.
``_lse_combine_kernel`` then folds the H row partials and the G column partials into
row_lse and col_lse (O((G + H) N) work, one launch).

Why not locks (Triton's layer-norm tutorial) or one partial row per row block? Locks
serialise the column updates and make the result depend on arrival order; per-row-block
partials are O(N^2 / BLOCK_M). (G, H) is the pair with G * H <= the programs the GPU
runs at once (SMs x programs per SM) that minimises the tiles of the busiest program
(``_plan._forward_grid``): for large N that is H = 1 or a few, for small N the column split
keeps the GPU busy where there are too few row blocks. No program ever waits on another,
so any G * H is safe.

``_clip_bwd_kernel``, grid (number of column blocks, SPLIT): program (cb, p) keeps its
B column block (and, when D fits one chunk, its dB accumulator) on chip, and visits the
row blocks rb = p (mod SPLIT), starting at a different one per cb so that concurrent
programs add into different rows of dA. dA partials go through fp32 atomics into an
(N, D) buffer. dB goes through the same kind of buffer: with one D chunk, one add per
program at the end (SPLIT = 1: a single add per element onto zeros); with several, one
add per tile and chunk. ds and db partials go to a (2, programs) buffer summed by torch.
SPLIT > 1 only when there are too few column blocks to fill the GPU
(``_plan._backward_split``). The forward is deterministic; dA (and dB when SPLIT > 1 or D
spans chunks) are sums of fp32 atomics, equal run to run only up to rounding.

Precision: every tile product accumulates in fp32. fp32 inputs use IEEE fp32 products
unless torch allows TF32 (``torch.set_float32_matmul_precision("high")``). In the
backward dP = P_row + P_col - 2 I (values in [-2, 2]) is cast to the input dtype for the
two tensor-core GEMMs and grad / (2N) * s is applied to their fp32 results, so fp16 never
sees the tiny values of dS itself. Forward and backward chunk D identically and load
their operands the same way, so the recomputed logits equal the forward's and
exp(S - lse) sums to 1 up to the float32 rounding of lse itself. That rounding (relative
|lse| 2^-24 in every P) is the one error dense torch does not have: at s = 1e4 it makes
the gradients ~10x less accurate than a dense fp32 softmax (still ~1e-3 relative). Fixing
it needs a contract change (e.g. saving the row/column max next to the LSE).
Groups (``groups``: optional (N,) int32/int64 ids, HAS_GROUPS constexpr): both kernels
load the ids of a tile's rows and columns (BLOCK_M + BLOCK_N integers per tile, no N x N
mask anywhere) and set S_ij = -inf where i != j and groups_i == groups_j, before the
forward's online LSEs and before the backward's recomputed P (so P = 0 there); the
diagonal always stays, so every row and column keeps at least one finite logit. Without
groups (HAS_GROUPS=False) the compiled kernels are the ungrouped ones, bit for bit.
Masked logits are -inf; every online max that can be -inf (padded rows/columns of tail
tiles, e.g. N = 1) is replaced by 0 before it is subtracted, so inf - inf never occurs
and extreme scales stay finite.

Interpreter (TRITON_INTERPRET=1, CPU tensors): read once, at import. There bf16 tl.dot is
wrong in Triton <= 3.9, so bf16 tiles are upcast to fp32 before every tl.dot, and the
tiles default to 32 x 32 with a small program count (``_plan.override_tiles``, which
tests use to force tile sizes and program counts). On a GPU the tile sizes come from
``_plan._forward_plan`` / ``_plan._backward_plan``: heuristics by dtype, D and N (no
autotuning, so the first call compiles one kernel and never times anything).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _TORCH_TO_TL,
    _bwd_program,
    _bwd_row_block,
    _check_groups,
    _check_runnable,
    _col_lse_rmw,
    _combine_lse,
    _fwd_program,
    _group_keep,
    _guard,
    _index_64,
    _load_rows,
    _load_rows_t,
    _lse_init,
    _online_lse,
    _seen_columns,
    _store_diag,
    _tile_logits,
    _widen,
)

# The planning lives in _plan.py; gram.py still imports the names it plans with from here.
from ._plan import (  # noqa: F401
    _backward_grid_for,
    _backward_plan,
    _block_d,
    _forward_grid_for,
    _forward_plan,
    _launch_kwargs,
    _Tiles,
    _with_override,
)

__all__ = ["clip_backward", "clip_forward"]


# ----------------------------------------------------------------------------- kernels


# Forward, one sweep, 1 GEMM-equivalent: for every tile (rb, cb) owned by this program,
#   X = A[rb] @ B[cb]^T  (2 BM BN D flops; summed over all tiles: 2 N^2 D = 1 GEMM)
#   S = s X + b, masked entries -inf
#   rows:    m_i' = max(m_i, max_j S_ij),  l_i' = l_i e^{m_i - m_i'} + sum_j e^{S_ij - m_i'}
#   columns: the same along i, on the (G, N) partials of this program
#   diag:    S_ii from the tile that holds (i, i)
@triton.jit
def _clip_fwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    groups_ptr,  # (N,) int32/int64 group ids (a dummy pointer without HAS_GROUPS)
    ws_m_ptr,  # (H + G, N) fp32: running max; rows [0, H) row partials, [H, H+G) columns
    ws_l_ptr,  # (H + G, N) fp32: running sum of exp(S - max)
    diag_ptr,  # (N,) fp32
    N,
    D,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    HAS_BIAS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK_D: keep the A row block in registers
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_g, pid_h, G, H, num_rb, num_cb = _fwd_program(N, BLOCK_M, BLOCK_N)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row_part = pid_h * N
    col_part = (H + pid_g) * N

    for rb in range(pid_g, num_rb, G):
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        rows = _widen(rows, INDEX_64)
        if ONE_CHUNK:
            a_tile = _load_rows(a_ptr, rows, rmask, offs_d, dmask, stride_an, stride_ad, DOT_DTYPE)
        m_i, l_i = _lse_init(BLOCK_M)
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
            valid = rmask[:, None] & cmask[None, :]
            if HAS_GROUPS:  # same group, i != j: not a negative
                valid = valid & _group_keep(groups_ptr, rows, cols, rmask, cmask)
            s = tl.where(valid, x * scale + bias, float("-inf"))

            # Diagonal: only the tile(s) crossing i == j.
            _store_diag(diag_ptr, s, rows, cols, rmask, rb, cb, BLOCK_M, BLOCK_N)

            # Rows: online logsumexp in registers.
            m_i, l_i = _online_lse(m_i, l_i, s, 1)

            # Columns: this program's partial, read-modify-write. Entries are exclusive to
            # the program; its first row block writes without reading.
            seen = _seen_columns(cols, rb, pid_g, N)
            _col_lse_rmw(ws_m_ptr + col_part + cols, ws_l_ptr + col_part + cols, seen, cmask, s)

        tl.store(ws_m_ptr + row_part + rows, m_i, mask=rmask)
        tl.store(ws_l_ptr + row_part + rows, l_i, mask=rmask)
        # The next row block re-reads this program's column partials. A replicated
        # layout may load an element in a thread other than the one that stored it: one
        # CTA barrier per row block makes those stores visible (and nothing is hoisted
        # above it).
        tl.debug_barrier()


# Backward, 3 GEMM-equivalents: for every tile (rb, cb),
#   X  = A[rb] @ B[cb]^T                       recompute    (1 GEMM over all tiles)
#   dP = e^{sX+b - row_lse} + e^{sX+b - col_lse} - 2 [i == j]     (masked entries 0)
#   dA[rb] += (c s) dP @ B[cb]                  fp32 atomics (1 GEMM)
#   dB[cb] += (c s) dP^T @ A[rb]                on chip      (1 GEMM)
#   ds += c sum(dP * X),  db += c sum(dP)       elementwise, no GEMM      (c = grad / 2N)
@triton.jit
def _clip_bwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    grad_ptr,
    groups_ptr,  # (N,) int32/int64 group ids (a dummy pointer without HAS_GROUPS)
    row_lse_ptr,
    col_lse_ptr,
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
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK_D: B block and dB accumulator stay on chip
    INDEX_64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cb, sp, SPLIT, count = _bwd_program(N, BLOCK_M)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    coef = tl.load(grad_ptr).to(tl.float32) * (0.5 / N)
    out_scale = coef * scale

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    col_lse = tl.load(col_lse_ptr + cols, mask=cmask, other=0.0)
    cols = _widen(cols, INDEX_64)
    if ONE_CHUNK:
        # Loaded as (BLOCK_D, BLOCK_N) like in the forward, so the recomputed S tile
        # goes through the very same tl.dot as the forward's (bitwise equal logits).
        bt = _load_rows_t(b_ptr, cols, cmask, offs_d, dmask, stride_bn, stride_bd, DOT_DTYPE)
        db_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    ds_acc = 0.0
    dbias_acc = 0.0

    for t in range(0, count):
        rb = _bwd_row_block(t, cb, sp, count, SPLIT)
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        row_lse = tl.load(row_lse_ptr + rows, mask=rmask, other=0.0)
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
        valid = rmask[:, None] & cmask[None, :]
        if HAS_GROUPS:
            valid = valid & _group_keep(groups_ptr, rows, cols, rmask, cmask)
        s = tl.where(valid, x * scale + bias, float("-inf"))  # as in the forward
        dp = tl.exp(s - row_lse[:, None]) + tl.exp(s - col_lse[None, :])  # 0 where masked
        dp = tl.where((rows[:, None] == cols[None, :]) & rmask[:, None], dp - 2.0, dp)
        ds_acc += tl.sum(tl.sum(dp * x, axis=1), axis=0)
        dbias_acc += tl.sum(tl.sum(dp, axis=1), axis=0)
        dp_lo = dp.to(DOT_DTYPE)

        if ONE_CHUNK:
            db_acc = tl.dot(tl.trans(dp_lo), a_tile, db_acc, input_precision=DOT_PRECISION)
            da = tl.dot(dp_lo, tl.trans(bt), input_precision=DOT_PRECISION)
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
                db_c = tl.dot(tl.trans(dp_lo), a_c, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    db_ptr + cols[:, None] * D + dd[None, :],
                    db_c * out_scale,
                    mask=cmask[:, None] & dmask_c[None, :],
                    sem="relaxed",
                )
                da_c = tl.dot(dp_lo, b_c, input_precision=DOT_PRECISION)
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
    tl.store(part_ptr + pid, ds_acc * coef)
    tl.store(part_ptr + num_programs + pid, dbias_acc * coef)


# ----------------------------------------------------------------------------- launchers


def _prepare(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], groups: Optional[Tensor] = None
):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _TORCH_TO_TL:
        raise TypeError(
            f"Triton CLIP kernels take float32, float16 or bfloat16 a and b of one dtype, "
            f"got {a.dtype} and {b.dtype}"
        )
    device = a.device
    _check_runnable(device, "flashcontrast.backends.triton.clip")
    for name, t in (("b", b), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, a on {device}")
    if scale.numel() != 1 or (bias is not None and bias.numel() != 1):
        raise ValueError("scale and bias must be single-element tensors")
    _check_groups(groups, a.shape[0], device)


def clip_forward(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], groups: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(row_lse, col_lse, diag), each (N,) float32, of S = scale * a @ b^T + bias (with
    groups: S_ij = -inf where i != j and groups_i == groups_j)."""
    _prepare(a, b, scale, bias, groups)
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    row_lse, col_lse, diag = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    if n == 0:
        return row_lse, col_lse, diag
    if d == 0 and groups is not None:  # S = bias on the kept entries: count them
        b0 = bias.float().reshape(()) if bias is not None else torch.zeros((), **f32)
        srt = groups.sort().values  # kept_i = N - |group of i| + 1, without an N x N mask
        size = torch.searchsorted(srt, groups, right=True) - torch.searchsorted(srt, groups)
        row_lse.copy_(b0 + (n + 1 - size).to(torch.float32).log())
        col_lse.copy_(row_lse)
        diag.copy_(b0.expand(n))
        return row_lse, col_lse, diag
    if d == 0:  # S = bias everywhere
        b0 = bias.float().reshape(()) if bias is not None else torch.zeros((), **f32)
        row_lse.copy_(b0 + torch.log(torch.full((), float(n), **f32)))
        col_lse.copy_(row_lse)
        diag.copy_(b0)
        return row_lse, col_lse, diag
    tiles, g, h = _forward_plan(n, d, a.dtype, a.device)
    ws = torch.empty((2, h + g, n), **f32)
    groups = None if groups is None else groups.contiguous()  # (N,): no copy normally
    with _guard(a.device):
        _clip_fwd_kernel[(g, h)](
            a, b, scale, bias if bias is not None else scale,
            groups if groups is not None else scale,
            ws[0], ws[1], diag,
            n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None,
            HAS_GROUPS=groups is not None,
            ONE_CHUNK=d <= tiles.block_d,
            INDEX_64=_index_64(a, b),
            **_launch_kwargs(tiles, a.dtype, a.device),
        )  # fmt: skip
        _combine_lse(ws[0], ws[1], row_lse, col_lse, n, h, g)
    return row_lse, col_lse, diag


def clip_backward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    row_lse: Tensor,
    col_lse: Tensor,
    grad: Tensor,
    groups: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(da, db, dscale, dbias) for dL/dL_clip = grad; da/db in the input dtype (with
    groups: P = 0 where i != j and groups_i == groups_j, as in the forward)."""
    _prepare(a, b, scale, bias, groups)
    for name, t in (("row_lse", row_lse), ("col_lse", col_lse), ("grad", grad)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device}, a on {a.device}")
    if row_lse.shape != (a.shape[0],) or col_lse.shape != (a.shape[0],) or grad.numel() != 1:
        raise ValueError("row_lse and col_lse must be (N,) and grad a single element")
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    da = torch.zeros((n, d), **f32)
    db = torch.zeros((n, d), **f32)
    if n == 0 or d == 0:
        zero = torch.zeros((), **f32)
        return da.to(a.dtype), db.to(b.dtype), zero, zero.clone()
    tiles, num_cb, split = _backward_plan(n, d, a.dtype, a.device)
    part = torch.empty((2, num_cb * split), **f32)
    row_lse = row_lse.to(torch.float32).contiguous()  # (N,): no copy in the normal case
    col_lse = col_lse.to(torch.float32).contiguous()
    groups = None if groups is None else groups.contiguous()
    with _guard(a.device):
        _clip_bwd_kernel[(num_cb, split)](
            a, b, scale, bias if bias is not None else scale, grad,
            groups if groups is not None else scale,
            row_lse, col_lse, da, db, part,
            n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None,
            HAS_GROUPS=groups is not None,
            ONE_CHUNK=d <= tiles.block_d,
            INDEX_64=_index_64(a, b, da),
            **_launch_kwargs(tiles, a.dtype, a.device),
        )  # fmt: skip
    dscale = part[0].sum()
    dbias = part[1].sum()
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
