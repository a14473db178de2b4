"""GRAM volume loss (objectives.md section 4) as Triton kernels: O(K N D) memory.

Contract: flashcontrast/backends/__init__.py, in the rectangular form of
``backends/blockwise/gram.py``: anchor rows T (n, D) against the columns of others O
(K, m, D), row i's own column at ROW_OFFSET + i (its diagonal term; none where that is
outside [0, m)), partial row / column statistics the caller merges, the backward's
1/(2N) and eps/N with N = TOTAL (default m). Below, N stands for either length; the
single-process loss is n = m, ROW_OFFSET = 0. Per-column constants det_h (m,), adj_h
(m, K, K) (symmetric), tt_i = |t_i|^2. Derivation:

    u_ij[r] = <t_i, o^r_j>,  v_ij[r] = sum_s adj_h_j[r, s] u_ij[s],
    det_ij  = det_h_j tt_i - sum_r u_ij[r] v_ij[r]            (Schur complement)

A program holds all K tiles u^r of its (BLOCK_M, BLOCK_N) tile at once (u0 ... u4: Triton
has no list of tiles, so K <= MAX_OTHERS), made by one pass over D that loads each t chunk
once for the K products; v and det are then elementwise, O(K^2) per logit.

With V = sqrt(det) above the degeneracy floor det_ij > tt_i floor_h_j (else det * 0: 0, or
NaN for a NaN det), L = -s V, dL = g/(2N)(P_row + P_col - 2(1-eps) I - 2 eps/N) and
w_ij = dL_ij (-s) / (2 V_ij) above the floor (else 0), d det / d t_i = 2 det_h t_i - 2 sum_r
v[r] o^r and d det / d o^r_j = -2 v[r] t_i, so

    d_anchor_i        = 2 t_i sum_j w_ij det_h_j - 2 sum_r sum_j (w_ij v_ij[r]) o^r_j
    d_others_u[r]_j   = -2 sum_i (w_ij v_ij[r]) t_i                  fp32 atomics
    col_uu_j[r, s]    = sum_i w_ij u_ij[r] u_ij[s],   col_tt_j = sum_i w_ij tt_i,
    dscale            = sum_ij dL_ij (-V_ij)

GEMM count (one GEMM-equivalent = 2 N^2 D flops): forward K (the u tiles); backward K
(recompute u) + K (d_anchor) + K (d_others_u) = 3K; in all 4K, e.g. 12 for M = 4: the
floor for this contract (the kernels before held two tiles and formed W_r = sum_s adj_h[:,
r, s] o^s to make v a tile product too: 7K). Nothing N x N is allocated: extra memory
O((G + H) N) forward, O(K N D) backward (the fp32 outputs).

Kernels: ``_gram_fwd_kernel`` on the (G, H) forward grid of ``_plan.py`` (programs own
row blocks g (mod G) and column blocks h (mod H); column statistics live in per-program
partial rows, so no atomics; the pair engine's forward, triton/pair.py, works the same
way); the LSE partials are folded by ``_common._lse_combine_kernel`` and the
row/column-sum partials by torch. ``_gram_bwd_kernel`` on ``_plan.py``'s backward grid
(column block, row split); d_anchor, d_others_u, col_tt and col_uu are fp32 atomics (sums
equal run to run up to rounding).

Precision: the u tiles take the shared dot setup (``_common._dot_setup``: the input dtype
with fp32 accumulation, so for 16-bit inputs each u is the fp32 dot of the rounded inputs
on tensor cores; fp32 IEEE unless TF32 is allowed); v, det and the weights are fp32
elementwise. The backward's gradient products (w v^r against o^r and t) run in fp32 (the
coefficients span many magnitudes and d_anchor's two terms cancel as det -> 0: rounding
them to 16 bits is not done here). Masked logits are -inf and online maxima of -inf are
replaced by 0 before subtraction, as in the pair engine.
Offsets are int32 unless a tensor spans 2^31 elements (INDEX_64); the offset of the r-th
of the K others (r * stride, r * N * D) is int64 always (``_common._plane_offset``).
Interpreter (TRITON_INTERPRET=1): tiles 32 x 32 (``_plan.override_tiles``
applies here too); bf16 upcast before tl.dot.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..gram import GramBlock, GramCoefs
from ._common import (
    _bwd_program,
    _bwd_row_block,
    _check_features,
    _col_lse_rmw,
    _combine_lse,
    _dot_setup,
    _fwd_program,
    _guard,
    _index_64,
    _load_rows,
    _load_rows_t,
    _lse_init,
    _online_lse,
    _plane_offset,
    _seen_columns,
    _store_diag,
    _widen,
)
from ._plan import (
    _backward_grid_for,
    _block_d,
    _forward_grid_for,
    _launch_kwargs,
    _Tiles,
    _with_override,
)

__all__ = ["MAX_OTHERS", "gram_backward", "gram_forward"]

#: Others (K = M - 1) the kernels take: a program keeps the K fp32 tiles u^r in registers
#: (u0 ... u4 below); objectives.gram.KERNEL_MAX_OTHERS, the CUDA kernels' limit too. More
#: run on "torch" (``_dispatch.VARIANTS["gram_many_others"]``).
MAX_OTHERS = 5


@triton.jit
def _u_step(
    u, t, o_ptr, r: tl.constexpr, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
    K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """u + t @ o^r[cols, dd]^T for r < K (u unchanged, nothing loaded, for r >= K)."""
    if r < K:
        o_t = _load_rows_t(
            o_ptr + _plane_offset(r, stride_ok, 1), cols, cmask, dd, dmask,
            stride_on, stride_od, DOT_DTYPE,
        )  # fmt: skip
        u = tl.dot(t, o_t, u, input_precision=DOT_PRECISION)
    return u


@triton.jit
def _u_tiles(
    t_ptr, o_ptr, rows, cols, rmask, cmask, D, stride_tn, stride_td, stride_ok,
    stride_on, stride_od, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(u0, ..., u4): u^r_ij = <t_i, o^r_j> (BLOCK_M, BLOCK_N) fp32 for r < K, zeros (never
    computed) for r >= K; one pass over D, each t chunk loaded once for the K products."""
    offs_d = tl.arange(0, BLOCK_D)
    u0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u4 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < D
        t = _load_rows(t_ptr, rows, rmask, dd, dmask, stride_tn, stride_td, DOT_DTYPE)
        u0 = _u_step(
            u0, t, o_ptr, 0, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
            K, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        u1 = _u_step(
            u1, t, o_ptr, 1, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
            K, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        u2 = _u_step(
            u2, t, o_ptr, 2, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
            K, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        u3 = _u_step(
            u3, t, o_ptr, 3, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
            K, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        u4 = _u_step(
            u4, t, o_ptr, 4, cols, cmask, dd, dmask, stride_ok, stride_on, stride_od,
            K, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    return u0, u1, u2, u3, u4


@triton.jit
def _pick(r: tl.constexpr, u0, u1, u2, u3, u4):
    """u^r of (u0, ..., u4), r a constexpr (no run-time indexing: Triton has no tile lists)."""
    u = u0
    if r == 1:
        u = u1
    if r == 2:
        u = u2
    if r == 3:
        u = u3
    if r == 4:
        u = u4
    return u


@triton.jit
def _adj_u(r: tl.constexpr, adj_ptr, cols, cmask, u0, u1, u2, u3, u4, K: tl.constexpr):
    """v^r_ij = sum_s adj_h_j[r, s] u^s_ij (BLOCK_M, BLOCK_N) fp32, elementwise (adj_h
    (m, K, K) fp32 contiguous)."""
    base = adj_ptr + cols * (K * K) + r * K
    v = tl.load(base, mask=cmask, other=0.0)[None, :] * u0
    for s in tl.static_range(1, K):
        a = tl.load(base + s, mask=cmask, other=0.0)
        v += a[None, :] * _pick(s, u0, u1, u2, u3, u4)
    return v


@triton.jit
def _volume(det, tt, floor):
    """(keep, V): keep = det above the degeneracy floor tt_i floor_h_j; V = sqrt(det)
    there, else sqrt(det * 0) (0, or NaN for a NaN or infinite det: NaN reaches the loss)."""
    keep = det > tt[:, None] * floor[None, :]
    return keep, tl.sqrt(tl.where(keep, det, det * 0.0))


@triton.jit
def _logit_tile(
    adj_ptr, tt, deth, floor, scale, rmask, cols, cmask, u0, u1, u2, u3, u4, K: tl.constexpr
):
    """(keep, V, valid, L) (BLOCK_M, BLOCK_N) of the tile from its u tiles: det = tt_i det_h_j
    - sum_r u^r v^r, :func:`_volume`'s keep and V, valid = in bounds, L = -scale V (-inf out
    of bounds). One function, so the backward's recomputed logits are the forward's."""
    q = u0 * _adj_u(0, adj_ptr, cols, cmask, u0, u1, u2, u3, u4, K)
    for r in tl.static_range(1, K):
        q += _pick(r, u0, u1, u2, u3, u4) * _adj_u(r, adj_ptr, cols, cmask, u0, u1, u2, u3, u4, K)
    keep, vol = _volume(tt[:, None] * deth[None, :] - q, tt, floor)
    valid = rmask[:, None] & cmask[None, :]
    return keep, vol, valid, tl.where(valid, -scale * vol, float("-inf"))


@triton.jit
def _row_block(tt_ptr, rb, N, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr):
    """(rows (BLOCK_M,) widened, rmask, tt = |t_i|^2 of those rows) of row block rb."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    tt = tl.load(tt_ptr + rows, mask=rmask, other=0.0)
    return _widen(rows, INDEX_64), rmask, tt


@triton.jit
def _column_block(deth_ptr, floor_ptr, cb, NC, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr):
    """(cols (BLOCK_N,) widened, cmask, det_h, floor_h of those columns) of column block cb:
    the per-column constants both kernels load once per column block."""
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NC
    deth = tl.load(deth_ptr + cols, mask=cmask, other=0.0)
    floor = tl.load(floor_ptr + cols, mask=cmask, other=0.0)
    return _widen(cols, INDEX_64), cmask, deth, floor


@triton.jit
def _store_own(
    diag_ptr, s, rows, cols, rmask, rb, cb, ROW_OFFSET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """diag[i] = s[i, ROW_OFFSET + i] for the rows of tile (rb, cb) whose own column is in
    it (``_common._store_diag`` at an offset); only the tile(s) crossing it store."""
    lo = cb * BLOCK_N
    first = rb * BLOCK_M + ROW_OFFSET
    if (first < lo + BLOCK_N) & (lo < first + BLOCK_M):
        own = rows + ROW_OFFSET
        on_diag = own[:, None] == cols[None, :]
        d_val = tl.sum(tl.where(on_diag, s, 0.0), axis=1)
        tl.store(diag_ptr + rows, d_val, mask=rmask & (own >= lo) & (own < lo + BLOCK_N))


# Forward, one sweep, K GEMM-equivalents: per tile, the K u tiles, det, V, L = -s V; rows:
# online (max, sumexp) and sum in registers; columns: the same in this program's partial
# rows; diagonal from the tile that holds it.
@triton.jit
def _gram_fwd_kernel(
    t_ptr, o_ptr, adj_ptr, tt_ptr, deth_ptr, floor_ptr, scale_ptr,
    ws_m_ptr, ws_l_ptr, ws_s_ptr,  # (H + G, L) fp32 partials: max, sumexp, sum
    diag_ptr,  # (N,) fp32 zeros
    N, NC, L, ROW_OFFSET, D, stride_tn, stride_td, stride_ok, stride_on, stride_od,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEX_64: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SQUARE: tl.constexpr,
):  # fmt: skip
    pid_g, pid_h, G, H, num_rb, num_cb = _fwd_program(N, BLOCK_M, BLOCK_N)
    if not SQUARE:
        num_cb = tl.cdiv(NC, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    row_part = pid_h * L
    col_part = (H + pid_g) * L

    for rb in range(pid_g, num_rb, G):
        rows, rmask, tt = _row_block(tt_ptr, rb, N, BLOCK_M, INDEX_64)
        m_i, l_i = _lse_init(BLOCK_M)
        s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for cb in range(pid_h, num_cb, H):
            cols, cmask, deth, floor = _column_block(deth_ptr, floor_ptr, cb, NC, BLOCK_N, INDEX_64)
            u0, u1, u2, u3, u4 = _u_tiles(
                t_ptr, o_ptr, rows, cols, rmask, cmask, D, stride_tn, stride_td, stride_ok,
                stride_on, stride_od, K, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
            _, vol, valid, s = _logit_tile(
                adj_ptr, tt, deth, floor, scale, rmask, cols, cmask, u0, u1, u2, u3, u4, K
            )
            s0 = tl.where(valid, -scale * vol, 0.0)

            if SQUARE:  # n = m, ROW_OFFSET = 0: the single-process call
                _store_diag(diag_ptr, s0, rows, cols, rmask, rb, cb, BLOCK_M, BLOCK_N)
            else:
                _store_own(diag_ptr, s0, rows, cols, rmask, rb, cb, ROW_OFFSET, BLOCK_M, BLOCK_N)

            m_i, l_i = _online_lse(m_i, l_i, s, 1)
            s_i += tl.sum(s0, axis=1)

            seen = _seen_columns(cols, rb, pid_g, NC)
            _col_lse_rmw(ws_m_ptr + col_part + cols, ws_l_ptr + col_part + cols, seen, cmask, s)
            cs_ptrs = ws_s_ptr + col_part + cols
            cs_old = tl.load(cs_ptrs, mask=seen, other=0.0)
            tl.store(cs_ptrs, cs_old + tl.sum(s0, axis=0), mask=cmask)

        tl.store(ws_m_ptr + row_part + rows, m_i, mask=rmask)
        tl.store(ws_l_ptr + row_part + rows, l_i, mask=rmask)
        tl.store(ws_s_ptr + row_part + rows, s_i, mask=rmask)
        tl.debug_barrier()  # column partials re-read by the next row block (as in pair.py)


@triton.jit
def _col_uu_add(acc, wu, r: tl.constexpr, s: tl.constexpr, u, K: tl.constexpr, KK: tl.constexpr):
    """acc (BLOCK_N, KK) with sum_i wu_ij u_ij added at lanes r K + s and s K + r (col_uu is
    symmetric)."""
    slot = tl.arange(0, KK)[None, :]
    hit = (slot == r * K + s) | (slot == s * K + r)
    return acc + tl.where(hit, tl.sum(wu * u, axis=0)[:, None], 0.0)


# Backward, 3K GEMM-equivalents: per tile recompute the K u tiles (K), then w, and for each
# r: c = w v^r, d_anchor -= 2 c @ O_r (K, atomics), d_others_u[r] -= 2 c^T @ T (K,
# atomics); col_uu from the u tiles, col_tt, dscale by reductions.
@triton.jit
def _gram_bwd_kernel(
    t_ptr, o_ptr, adj_ptr, tt_ptr, deth_ptr, floor_ptr, scale_ptr, grad_ptr,
    row_lse_ptr, col_lse_ptr,
    da_ptr,  # (N, D) fp32 zeros
    do_ptr,  # (K, NC, D) fp32 zeros: d_others_u
    coltt_ptr,  # (NC,) fp32 zeros
    coluu_ptr,  # (NC, K, K) fp32 zeros
    part_ptr,  # (programs,) fp32: dscale partials
    eps, N, NC, ROW_OFFSET, TOTAL, D, stride_tn, stride_td, stride_ok, stride_on, stride_od,
    K: tl.constexpr, KK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, W_PRECISION: tl.constexpr,
):  # fmt: skip
    cb, sp, SPLIT, count = _bwd_program(N, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(grad_ptr).to(tl.float32) * (0.5 / TOTAL)
    smooth = 2.0 * eps / TOTAL
    target = 2.0 * (1.0 - eps)

    offs_d = tl.arange(0, BLOCK_D)
    cols, cmask, deth, floor = _column_block(deth_ptr, floor_ptr, cb, NC, BLOCK_N, INDEX_64)
    col_lse = tl.load(col_lse_ptr + cols, mask=cmask, other=0.0)
    coltt_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    coluu_acc = tl.zeros((BLOCK_N, KK), dtype=tl.float32)
    ds_acc = 0.0

    for it in range(0, count):
        rb = _bwd_row_block(it, cb, sp, count, SPLIT)
        rows, rmask, tt = _row_block(tt_ptr, rb, N, BLOCK_M, INDEX_64)
        row_lse = tl.load(row_lse_ptr + rows, mask=rmask, other=0.0)
        u0, u1, u2, u3, u4 = _u_tiles(  # as in the forward
            t_ptr, o_ptr, rows, cols, rmask, cmask, D, stride_tn, stride_td, stride_ok,
            stride_on, stride_od, K, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        keep, vol, valid, s = _logit_tile(
            adj_ptr, tt, deth, floor, scale, rmask, cols, cmask, u0, u1, u2, u3, u4, K
        )
        dl = tl.exp(s - row_lse[:, None]) + tl.exp(s - col_lse[None, :]) - smooth
        dl = tl.where(rows[:, None] + ROW_OFFSET == cols[None, :], dl - target, dl)
        dl = tl.where(valid, dl, 0.0) * coef  # dLoss / dL_ij
        ds_acc += tl.sum(tl.sum(-dl * vol, axis=1), axis=0)
        pos = valid & keep
        w = tl.where(pos, dl * (-0.5 * scale) / tl.where(pos, vol, 1.0), 0.0)
        coltt_acc += tl.sum(w * tt[:, None], axis=0)
        rw = 2.0 * tl.sum(w * deth[None, :], axis=1)  # (BLOCK_M,)

        for r in tl.static_range(K):
            wu = w * _pick(r, u0, u1, u2, u3, u4)
            for s2 in tl.static_range(r, K):
                coluu_acc = _col_uu_add(coluu_acc, wu, r, s2, _pick(s2, u0, u1, u2, u3, u4), K, KK)
            c = w * _adj_u(r, adj_ptr, cols, cmask, u0, u1, u2, u3, u4, K)  # w v^r
            o_r = o_ptr + _plane_offset(r, stride_ok, 1)
            do_r = do_ptr + _plane_offset(r, NC, D)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                t_c = _load_rows(t_ptr, rows, rmask, dd, dmask, stride_tn, stride_td, tl.float32)
                o_c = _load_rows(o_r, cols, cmask, dd, dmask, stride_on, stride_od, tl.float32)
                da_c = -2.0 * tl.dot(c, o_c, input_precision=W_PRECISION)
                if r == 0:
                    da_c += rw[:, None] * t_c
                tl.atomic_add(
                    da_ptr + rows[:, None] * D + dd[None, :],
                    da_c,
                    mask=rmask[:, None] & dmask[None, :],
                    sem="relaxed",
                )
                tl.atomic_add(
                    do_r + cols[:, None] * D + dd[None, :],
                    -2.0 * tl.dot(tl.trans(c), t_c, input_precision=W_PRECISION),
                    mask=cmask[:, None] & dmask[None, :],
                    sem="relaxed",
                )

    tl.atomic_add(coltt_ptr + cols, coltt_acc, mask=cmask, sem="relaxed")
    slot = tl.arange(0, KK)[None, :]
    tl.atomic_add(
        coluu_ptr + cols[:, None] * (K * K) + slot,
        coluu_acc,
        mask=cmask[:, None] & (slot < K * K),
        sem="relaxed",
    )
    tl.store(part_ptr + cb * SPLIT + sp, ds_acc)


# ----------------------------------------------------------------------------- launchers


def _tiles(d: int, dtype: torch.dtype, device: torch.device, backward: bool = False) -> _Tiles:
    """Tiles of the forward (or backward) kernel. Untimed on a GPU; chosen by ptxas's spill
    report (``python tools/triton_aot_check.py --objectives gram --arch 90``): each
    program holds its K fp32 u tiles (BLOCK_M x BLOCK_N / 256 registers per thread each at
    8 warps). The backward's D chunk is 16: its fp32 gradient operands spill at 32 (full
    preset, sm_90, 16-bit, K = 3, triton 3.9: at most 104 bytes against 332; the 7K kernels
    before: 196; with triton 3.6, the GPU machines' version, 0 except INDEX_64's 68)."""
    block_d = _block_d(d, dtype, device)
    if device.type != "cuda":
        return _with_override(_Tiles(32, 32, block_d, 4, 1))
    if backward:
        return _with_override(_Tiles(64, 32, min(block_d, 16), 8, 2))
    return _with_override(_Tiles(64, 64, min(block_d, 32), 8, 2))


def _prepare(block: GramBlock) -> None:
    """Raise for what the kernels cannot take (shapes, dtypes, devices, K > MAX_OTHERS)."""
    anchor, others, scale, det_h, adj_h, floor_h, _ = block
    if anchor.dim() != 2 or others.dim() != 3 or others.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"anchor must be (n, D) and others (K, m, D), got {tuple(anchor.shape)} and "
            f"{tuple(others.shape)}"
        )
    if not 1 <= others.shape[0] <= MAX_OTHERS:
        raise ValueError(
            f"the Triton GRAM kernels take 1 to {MAX_OTHERS} other modalities, got "
            f"K = {others.shape[0]} (backend='torch' takes any)"
        )
    device = _check_features(
        "GRAM", "flashcontrast.backends.triton", "anchor and others", anchor, others
    )
    k, m, _ = others.shape
    named = (("others", others), ("scale", scale), ("det_h", det_h), ("adj_h", adj_h))
    for name, t in (*named, ("floor_h", floor_h)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, anchor on {device}")
    if (
        det_h.shape != (m,)
        or floor_h.shape != (m,)
        or adj_h.shape != (m, k, k)
        or scale.numel() != 1
    ):
        raise ValueError(
            "det_h and floor_h must be (m,), adj_h (m, K, K) and scale a single element"
        )


def _common(block: GramBlock):
    """tt (n,), det_h (m,), floor_h (m,) and adj_h (m, K, K), all fp32 contiguous."""
    anchor, _, _, det_h, adj_h, floor_h, _ = block
    f32 = torch.float32
    tt = anchor.to(f32).square().sum(dim=1)
    adj = adj_h.to(f32).contiguous()
    deth, floor = det_h.to(f32).contiguous(), floor_h.to(f32).contiguous()
    return tt.contiguous(), deth, floor, adj


def _launch_args(anchor, others):
    return (
        anchor.shape[1], anchor.stride(0), anchor.stride(1),
        others.stride(0), others.stride(1), others.stride(2),
    )  # fmt: skip


def _backward_kwargs(k: int, tiles: _Tiles, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch keywords of the backward: ``_plan._launch_kwargs``, plus K, KK (col_uu's K^2
    lanes rounded up to a power of two) and the fp32 gradient products' W_PRECISION."""
    _, w_precision = _dot_setup(torch.float32, device)
    kk = triton.next_power_of_2(k * k)
    return dict(K=k, KK=kk, W_PRECISION=w_precision, **_launch_kwargs(tiles, dtype, device))


def gram_forward(block: GramBlock):
    """(row_lse (n,), col_lse (m,), diag (n,), row_sum (n,), col_sum (m,)) float32 of rows
    anchor (n, D) against the columns of others (K, m, D), row i's own column at
    row_offset + i (diag 0 where it is outside the block); row statistics over this
    block's columns, column statistics over its rows: partial, merged by the caller
    (``backends/blockwise/gram.py``, the rectangular form)."""
    _prepare(block)
    anchor, others, scale, row_offset = block.anchor, block.others, block.scale, block.row_offset
    k, m, d = others.shape
    n = anchor.shape[0]
    f32 = dict(dtype=torch.float32, device=anchor.device)
    diag = torch.zeros(n, **f32)
    if n == 0 or m == 0:
        inf = float("-inf")
        row_lse, col_lse = torch.full((n,), inf, **f32), torch.full((m,), inf, **f32)
        return row_lse, col_lse, diag, torch.zeros(n, **f32), torch.zeros(m, **f32)
    tt, deth, floor, adj = _common(block)
    tiles = _tiles(d, anchor.dtype, anchor.device)
    g, h = _forward_grid_for(tiles, n, anchor.device, m)
    width = max(n, m)
    ws = torch.empty((3, h + g, width), **f32)
    if n != m:  # lanes past the rows' (columns') count are folded too, then dropped
        ws[0].fill_(float("-inf"))
        ws[1].zero_()
    row_lse, col_lse = torch.empty(width, **f32), torch.empty(width, **f32)
    with _guard(anchor.device):
        _gram_fwd_kernel[(g, h)](
            anchor, others, adj, tt, deth, floor, scale, ws[0], ws[1], ws[2], diag,
            n, m, width, int(row_offset), *_launch_args(anchor, others),
            INDEX_64=_index_64(anchor, others),
            SQUARE=n == m and int(row_offset) == 0,
            K=k, **_launch_kwargs(tiles, anchor.dtype, anchor.device),
        )  # fmt: skip
        _combine_lse(ws[0], ws[1], row_lse, col_lse, width, h, g)
    row_sum, col_sum = ws[2, :h, :n].sum(dim=0), ws[2, h:, :m].sum(dim=0)
    return row_lse[:n], col_lse[:m], diag, row_sum, col_sum


def gram_backward(block: GramBlock, coefs: GramCoefs, out_dtype: Optional[torch.dtype] = None):
    """(d_anchor (n, D), d_others_u (K, m, D), dscale 0-d fp32, col_tt (m,) fp32, col_uu
    (m, K, K) fp32) of this block, from the merged statistics ``coefs``; d_anchor and
    d_others_u in ``out_dtype`` (None: the inputs' dtype)."""
    row_lse, col_lse, grad, label_smoothing, total = coefs
    _prepare(block)
    anchor, others, scale, row_offset = block.anchor, block.others, block.scale, block.row_offset
    k, m, d = others.shape
    n = anchor.shape[0]
    f32 = dict(dtype=torch.float32, device=anchor.device)
    da = torch.zeros((n, d), **f32)
    d_others = torch.zeros((k, m, d), **f32)
    col_tt, col_uu = torch.zeros(m, **f32), torch.zeros((m, k, k), **f32)
    if n == 0 or m == 0:
        return (da.to(out_dtype or anchor.dtype), d_others.to(out_dtype or others.dtype),
                torch.zeros((), **f32), col_tt, col_uu)  # fmt: skip
    tt, deth, floor, adj = _common(block)
    tiles = _tiles(d, anchor.dtype, anchor.device, backward=True)
    num_cb, split = _backward_grid_for(tiles, n, anchor.device, m)
    part = torch.empty(num_cb * split, **f32)
    with _guard(anchor.device):
        _gram_bwd_kernel[(num_cb, split)](
            anchor, others, adj, tt, deth, floor, scale, grad,
            row_lse.to(torch.float32).contiguous(), col_lse.to(torch.float32).contiguous(),
            da, d_others, col_tt, col_uu, part,
            float(label_smoothing), n, m, int(row_offset), int(m if total is None else total),
            *_launch_args(anchor, others),
            INDEX_64=_index_64(anchor, others, da, d_others),
            **_backward_kwargs(k, tiles, anchor.dtype, anchor.device),
        )  # fmt: skip
    return (da.to(out_dtype or anchor.dtype), d_others.to(out_dtype or others.dtype),
            part.sum(), col_tt, col_uu)  # fmt: skip
