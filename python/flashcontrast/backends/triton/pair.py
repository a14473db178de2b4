"""The pair engine (``backends/pair.py``) as Triton kernels: one forward and one backward
kernel whose epilogue is chosen by constexprs, so CLIP, SigLIP, InfoNCE, the multi-view
losses and Symile "n" are all one sweep. The contract (entry sets, statistics, gradients)
is ``backends/pair.py``'s module docstring; ``blockwise/pair.py`` is its torch reading.

Constexprs (one compiled kernel per combination an objective uses):

* EPILOGUE "softmax" (row, positive, column and column-positive (max, sum) pairs), "rows"
  (the row pairs only) or "sigmoid" (sum_ij softplus(-z_ij S_ij));
* POSITIVES (the positive set E exists), EXCLUDE_SELF (global row == global column left
  out), PERIOD (samples are global index mod ``period``, a runtime int; False: the index
  itself), HAS_GROUPS (same group id, different sample: masked), HAS_BIAS, OVERRIDE (the
  positive's logit is positive_logits[i]; its gradient goes to dpos);
* backward only: HAS_GR, HAS_GPR, HAS_GC, HAS_GPC (which coefficients are given: the
  missing ones are 0 and their exponentials are never computed), NORMALIZE (fp16: dS is
  divided by max |coefficient| before the cast, see below);
* tiles: BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK (D <= BLOCK_D), INDEX_64, DOT_DTYPE,
  DOT_PRECISION (``_plan.py``; interpreter 32 x 32, GPU tiles >= 64 wide so 16-bit and
  tf32 tl.dots are wgmma-eligible on sm_90).

The entry sets come from integers only, per tile: global row gi = row_offset + i, global
column gj = col_offset + j, sample = g mod period (or g); excluded = gi == gj (with
EXCLUDE_SELF), masked = equal group id and different sample, positives = same sample and
not excluded (so E lies inside the allowed set). A tile can only hold a positive when
some gi - gj in its range is a multiple of the period (0 without PERIOD): the exponentials
of the positive statistics are computed only in such tiles (a scalar test per tile), so
CLIP's single diagonal costs them on the diagonal tiles only.

Kernels
-------
``_pair_fwd_kernel``, grid (G, H) (``_plan._forward_grid``): program
(g, h) sweeps the tiles (rb, cb), rb = g (mod G), cb = h (mod H). Its row pairs live in
registers and are written once per row block into row h of (H, n) partial buffers (one
per max and sum, and per set: allowed, positives); its column pairs into row g of (G, m)
ones, read-modify-write, the first row block writing without reading (the positives'
pair is also written on that first row block when its tiles hold no positive). No two
programs touch the same entries: no atomics, deterministic. ``_pair_merge_kernel``
folds the H (G) partials of the row (column) statistics into (max, sum) pairs, exactly
(max, then rescaled sums), one launch for rows and one for columns; with H = 1 (G = 1)
the partials are the result and nothing is launched. Every statistic is a tensor of its
own (no two outputs share storage). "sigmoid" writes one partial total per program,
summed by torch.

``_pair_bwd_kernel``, grid (column blocks, SPLIT) (``_plan._backward_split``): program (cb, p)
keeps its B block (and, with ONE_CHUNK, its fp32 dB accumulator) on chip, visits the row
blocks rb = p (mod SPLIT), recomputes S exactly as the forward did (same D chunking,
operand layout and products), forms dS in fp32 with the positives subtracted in the tile,
and adds dA through fp32 atomics into an (n, D) buffer (dB too, per tile and chunk, when
D spans chunks). dscale / dbias partials go to a (2, programs) buffer summed by torch;
dpos through fp32 atomics into (n,) (only tiles holding positives add).

Precision: P = exp((S - max) - log sum) from the (max, sum) pairs, never from
max + log sum (at |S| ~ 1e4 an fp32 logsumexp carries ~1e-3 absolute rounding). dS is
cast to the input dtype only for the two tensor-core products, after the positives were
subtracted in fp32. For fp16 inputs dS is first divided by u = max |coefficient| (a
0-d tensor computed by torch) and u * scale applied to the fp32 products, so fp16 never
sees tiny coefficients (1 / N at large N) as subnormals; bf16 and fp32 have fp32's
exponent range and skip it. "sigmoid" factors g out the same way.

Two paths (``pair_forward`` / ``pair_backward`` route by :func:`sweep_path`): "fused",
the kernels above with dA and dB formed on chip; "panel" (``panel.py``), the same kernels
with X_IN_MEMORY reading the logits' X from a cuBLAS GEMM's output and writing dS for two
more GEMMs: no atomics and the GEMMs at cuBLAS's rate, for large D on CUDA.

Interpreter (TRITON_INTERPRET=1): bf16 tiles are upcast to fp32 before tl.dot (its bf16
tl.dot is wrong, ``_dot_setup``), so bf16 runs there check the logic, not bf16 products.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _panel, _paths
from .._pair_entry import Sweep, backward_entry, forward_entry
from ..pair import Coefs, Grads, Pair, Stats
from . import PATH_VARIABLE
from ._common import (
    _INTERPRET,
    _bwd_program,
    _bwd_row_block,
    _check_features,
    _col_lse_rmw,
    _fwd_program,
    _guard,
    _index_64,
    _load_rows,
    _load_rows_t,
    _log_sum,
    _lse_init,
    _merge_partials,
    _online_lse,
    _seen_columns,
    _sigmoid,
    _softplus,
    _tile_logits,
    _widen,
)
from ._plan import _backward_plan, _forward_plan, _launch_kwargs

__all__ = ["pair_backward", "pair_forward"]

_NEG = float("-inf")


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _entry_sets(
    rows, cols, rmask, cmask, row_offset, col_offset, period, rg_ptr, cg_ptr,
    EXCLUDE_SELF: tl.constexpr, PERIOD: tl.constexpr, HAS_GROUPS: tl.constexpr,
):  # fmt: skip
    """(allowed, positives) (BLOCK_M, BLOCK_N) masks of the tile of ``rows`` x ``cols``
    (backends/pair.py): global indices row_offset + i, col_offset + j; samples mod period
    (PERIOD) or the index itself. Padded lanes are in neither set."""
    gi = row_offset + rows
    gj = col_offset + cols
    if PERIOD:
        si = gi % period
        sj = gj % period
    else:
        si = gi
        sj = gj
    same = si[:, None] == sj[None, :]
    allowed = rmask[:, None] & cmask[None, :]
    if EXCLUDE_SELF:
        allowed = allowed & (gi[:, None] != gj[None, :])
    if HAS_GROUPS:  # equal ids and different samples: a false negative, left out
        rg = tl.load(rg_ptr + rows, mask=rmask, other=0)
        cg = tl.load(cg_ptr + cols, mask=cmask, other=0)
        allowed = allowed & ((rg[:, None] != cg[None, :]) | same)
    return allowed, allowed & same  # a positive is never masked, so E = allowed & same


@triton.jit
def _tile_has_positive(
    r0, c0, period, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERIOD: tl.constexpr
):
    """Whether the tile with first global row r0 and column c0 can hold a positive: some
    gi - gj in [r0 - c0 - BLOCK_N + 1, r0 - c0 + BLOCK_M - 1] is a multiple of the
    period (0 without PERIOD). Over-approximates (padding, exclusions, groups)."""
    lo = r0 - c0 - (BLOCK_N - 1)
    span = BLOCK_M + BLOCK_N - 2
    if PERIOD:
        lo_mod = ((lo % period) + period) % period  # in [0, period) for either sign rule
        has = (lo_mod == 0) | (lo_mod + span >= period)
    else:
        has = (lo <= 0) & (lo + span >= 0)
    return has


@triton.jit
def _scored_tile(
    x, scale, bias, pl, rows, cols, rmask, cmask, rb, cb, row_offset, col_offset, period,
    rg_ptr, cg_ptr, EXCLUDE_SELF: tl.constexpr, PERIOD: tl.constexpr,
    HAS_GROUPS: tl.constexpr, OVERRIDE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """(S, allowed, positives, has_pos) of the tile (rb, cb) from its X: S = s X + b, the
    row's positive logit ``pl`` on E with OVERRIDE; the masks of :func:`_entry_sets`;
    whether the tile can hold a positive (:func:`_tile_has_positive`). The forward and the
    backward score their tiles here, so the recomputed S is the forward's."""
    s = x * scale + bias
    allowed, pos = _entry_sets(
        rows, cols, rmask, cmask, row_offset, col_offset, period, rg_ptr, cg_ptr,
        EXCLUDE_SELF, PERIOD, HAS_GROUPS,
    )  # fmt: skip
    has_pos = _tile_has_positive(
        row_offset + rb * BLOCK_M, col_offset + cb * BLOCK_N, period, BLOCK_M, BLOCK_N, PERIOD
    )
    if OVERRIDE:
        s = tl.where(pos, pl[:, None], s)
    return s, allowed, pos, has_pos


# ----------------------------------------------------------------------------- kernels


# Forward, 1 GEMM-equivalent: for every tile (rb, cb) of this program,
#   X = A[rb] @ B[cb]^T,  S = s X + b  (S_i,pos = positive_logits_i with OVERRIDE)
#   softmax / rows, over the allowed entries (-inf elsewhere) and over E:
#     rows     m_i' = max(m_i, max_j S_ij),  l_i' = l_i e^{m_i - m_i'} + sum_j e^{S_ij - m_i'}
#     columns  the same along i, on this program's (C, G, m) partials (softmax)
#   sigmoid:  acc += sum_ij softplus(-z_ij S_ij) over the allowed entries, z = +1 on E
@triton.jit
def _pair_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr,
    rg_ptr,  # (n,) int32/int64 row group ids (a dummy pointer without HAS_GROUPS)
    cg_ptr,  # (m,) column group ids
    pl_ptr,  # (n,) fp32 positive logits (OVERRIDE)
    rm_ptr, rs_ptr,  # (H, n) fp32 row partials over the allowed entries: max, sum exp(S - max)
    pm_ptr, ps_ptr,  # (H, n) fp32 row partials over the positives: max, sum
    cm_ptr, cs_ptr,  # (G, m) fp32 column partials (softmax): max, sum
    cpm_ptr, cps_ptr,  # (G, m) fp32 column positives' partials: max, sum
    tot_ptr,  # (G * H,) fp32 sigmoid partial totals
    x_ptr,  # (N, M) fp32 X = A B^T, contiguous (X_IN_MEMORY: the panel path's GEMM output)
    N, M, D, row_offset, col_offset, period,  # sizes; global index of row / column 0
    stride_an, stride_ad, stride_bn, stride_bd,
    EPILOGUE: tl.constexpr,  # "softmax", "rows" or "sigmoid"
    POSITIVES: tl.constexpr, EXCLUDE_SELF: tl.constexpr, PERIOD: tl.constexpr,
    HAS_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, OVERRIDE: tl.constexpr,
    X_IN_MEMORY: tl.constexpr,  # read X tiles from x_ptr instead of multiplying A and B
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK_D: keep the A row block in registers
    INDEX_64: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_g, pid_h, G, H, _, _ = _fwd_program(N, BLOCK_M, BLOCK_N)
    num_rb = tl.cdiv(N, BLOCK_M)
    num_cb = tl.cdiv(M, BLOCK_N)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row_part = _widen(pid_h, INDEX_64) * N  # this program's row of the partials
    col_part = _widen(pid_g, INDEX_64) * M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for rb in range(pid_g, num_rb, G):
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        rows = _widen(rows, INDEX_64)
        if ONE_CHUNK and not X_IN_MEMORY:
            a_tile = _load_rows(a_ptr, rows, rmask, offs_d, dmask, stride_an, stride_ad, DOT_DTYPE)
        pl = 0.0
        if OVERRIDE:
            pl = tl.load(pl_ptr + rows, mask=rmask, other=0.0)
        m_r, l_r = _lse_init(BLOCK_M)
        m_p, l_p = _lse_init(BLOCK_M)
        for cb in range(pid_h, num_cb, H):
            cols = cb * BLOCK_N + offs_n
            cmask = cols < M
            cols = _widen(cols, INDEX_64)
            if X_IN_MEMORY:
                x = _load_rows(x_ptr, rows, rmask, cols, cmask, M, 1, tl.float32)
            elif ONE_CHUNK:
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
            s, allowed, pos, has_pos = _scored_tile(
                x, scale, bias, pl, rows, cols, rmask, cmask, rb, cb, row_offset,
                col_offset, period, rg_ptr, cg_ptr,
                EXCLUDE_SELF, PERIOD, HAS_GROUPS, OVERRIDE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            if EPILOGUE == "sigmoid":
                t = s  # -z S: S off E, -S on it
                if POSITIVES:
                    t = tl.where(pos, -s, s)
                acc += tl.sum(tl.where(allowed, _softplus(t), 0.0), axis=1)
            else:
                s_all = tl.where(allowed, s, float("-inf"))
                m_r, l_r = _online_lse(m_r, l_r, s_all, 1)
                if POSITIVES:
                    if has_pos:
                        s_pos = tl.where(pos, s, float("-inf"))
                        m_p, l_p = _online_lse(m_p, l_p, s_pos, 1)
                if EPILOGUE == "softmax":
                    # Columns: this program's partials; its first row block writes them.
                    seen = _seen_columns(cols, rb, pid_g, M)
                    _col_lse_rmw(
                        cm_ptr + col_part + cols, cs_ptr + col_part + cols, seen, cmask, s_all
                    )
                    if POSITIVES:
                        if has_pos | (rb == pid_g):
                            s_pos = tl.where(pos, s, float("-inf"))
                            _col_lse_rmw(
                                cpm_ptr + col_part + cols, cps_ptr + col_part + cols,
                                seen, cmask, s_pos,
                            )  # fmt: skip
        if EPILOGUE != "sigmoid":
            tl.store(rm_ptr + row_part + rows, m_r, mask=rmask)
            tl.store(rs_ptr + row_part + rows, l_r, mask=rmask)
            if POSITIVES:
                tl.store(pm_ptr + row_part + rows, m_p, mask=rmask)
                tl.store(ps_ptr + row_part + rows, l_p, mask=rmask)
        if EPILOGUE == "softmax":
            # The next row block re-reads the column partials, maybe in another thread of
            # a replicated layout: a CTA barrier makes this row block's stores visible.
            tl.debug_barrier()

    if EPILOGUE == "sigmoid":
        tl.store(tot_ptr + pid_g * H + pid_h, tl.sum(acc, axis=0))


@triton.jit
def _merge_pairs(ws_m_ptr, ws_s_ptr, out_m_ptr, out_s_ptr, offs, mask, L, K, BLOCK: tl.constexpr):
    """Entries offs of the merge of K (K, L) partial pairs into (L,) ones."""
    m, l = _merge_partials(ws_m_ptr, ws_s_ptr, offs, mask, L, 0, K, BLOCK)
    tl.store(out_m_ptr + offs, m, mask=mask)
    tl.store(out_s_ptr + offs, l, mask=mask)


# Merge of K partial (max, sum) pairs per entry, for one or two statistics (program_id 1):
#   m = max_k m_k,  l = sum_k l_k e^{m_k - m}   (all m_k -inf: (-inf, 0), the empty set)
@triton.jit
def _pair_merge_kernel(
    m0_ptr,  # (K, L) fp32 partials of the first statistic: max, sum
    s0_ptr,
    m1_ptr,  # (K, L) of the second (a dummy without TWO)
    s1_ptr,
    out_m0_ptr,  # (L,) fp32 merged pairs
    out_s0_ptr,
    out_m1_ptr,
    out_s1_ptr,
    L,
    K,
    TWO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    offs = offs.to(tl.int64)  # k * L + offs may pass 2^31: memory bound, so always 64-bit
    if TWO:
        if tl.program_id(1) == 0:
            _merge_pairs(m0_ptr, s0_ptr, out_m0_ptr, out_s0_ptr, offs, mask, L, K, BLOCK)
        else:
            _merge_pairs(m1_ptr, s1_ptr, out_m1_ptr, out_s1_ptr, offs, mask, L, K, BLOCK)
    else:
        _merge_pairs(m0_ptr, s0_ptr, out_m0_ptr, out_s0_ptr, offs, mask, L, K, BLOCK)


# Backward, 3 GEMM-equivalents: for every tile (rb, cb),
#   X  = A[rb] @ B[cb]^T, S = s X + b            recomputed as in the forward (1 GEMM)
#   P  = e^{(S - max_i) - log sum_i} on the allowed entries (0 elsewhere); Q on E;
#        Pc, Qc along columns with the column pairs
#   dS = gr_i P - gpr_i Q + gc_j Pc - gpc_j Qc          fp32, positives in the tile
#   dS = g (sigmoid(S) - [ij in E])                     (sigmoid; -sigmoid(-S) on E)
#   OVERRIDE: dpos_i += sum_{j in E} dS_ij, then dS = 0 on E
#   U  = dS / u  (u: max |coefficient| for fp16, g for sigmoid, else 1), cast to DOT_DTYPE
#   dA[rb] += (u s) U @ B[cb]   fp32 atomics (1 GEMM);  dB[cb] += (u s) U^T @ A[rb] (1 GEMM)
#   dscale += sum dS X,  dbias += sum dS                elementwise
@triton.jit
def _pair_bwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, rg_ptr, cg_ptr, pl_ptr,  # as in the forward
    rmax_ptr, rsum_ptr,  # (n,) row pairs: max, sum
    pmax_ptr, psum_ptr,  # (n,) positives' pairs
    cmax_ptr, csum_ptr,  # (m,) column pairs (softmax)
    cpmax_ptr, cpsum_ptr,  # (m,) column positives' pairs
    gr_ptr, gpr_ptr,  # (n,) coefficients (dummy pointers where absent)
    gc_ptr, gpc_ptr,  # (m,)
    unit_ptr,  # 0-d fp32: g (sigmoid) or max |coefficient| (NORMALIZE)
    da_ptr,  # (n, D) fp32, contiguous, zeros
    db_ptr,  # (m, D) fp32, contiguous, zeros
    dpos_ptr,  # (n,) fp32 zeros (OVERRIDE)
    part_ptr,  # (2, programs) fp32: dscale and dbias partials
    x_ptr,  # (N, M) fp32 X (X_IN_MEMORY)
    ds_ptr,  # (N, M) dS / u out, in its buffer's dtype (X_IN_MEMORY: no dA, dB products)
    N, M, D, row_offset, col_offset, period, stride_an, stride_ad, stride_bn, stride_bd,
    EPILOGUE: tl.constexpr, POSITIVES: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    PERIOD: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    OVERRIDE: tl.constexpr, HAS_GR: tl.constexpr, HAS_GPR: tl.constexpr,
    HAS_GC: tl.constexpr, HAS_GPC: tl.constexpr, NORMALIZE: tl.constexpr,
    X_IN_MEMORY: tl.constexpr,  # the panel path: X read, dS written, no dA / dB
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK_D: B block and dB accumulator stay on chip
    INDEX_64: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    cb, sp, SPLIT, count = _bwd_program(N, BLOCK_M)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    unit = 1.0
    inv_unit = 1.0
    if EPILOGUE == "sigmoid":
        unit = tl.load(unit_ptr).to(tl.float32)
    elif NORMALIZE:
        unit = tl.load(unit_ptr).to(tl.float32)
        inv_unit = 1.0 / unit
    out_scale = unit * scale

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < M
    if EPILOGUE == "softmax":
        if HAS_GC:
            gc = tl.load(gc_ptr + cols, mask=cmask, other=0.0)
            c_max, c_log = _log_sum(
                tl.load(cmax_ptr + cols, mask=cmask, other=float("-inf")),
                tl.load(csum_ptr + cols, mask=cmask, other=0.0),
            )
        if POSITIVES:
            if HAS_GPC:
                gpc = tl.load(gpc_ptr + cols, mask=cmask, other=0.0)
                cp_max, cp_log = _log_sum(
                    tl.load(cpmax_ptr + cols, mask=cmask, other=float("-inf")),
                    tl.load(cpsum_ptr + cols, mask=cmask, other=0.0),
                )
    cols = _widen(cols, INDEX_64)
    if ONE_CHUNK and not X_IN_MEMORY:
        # Loaded as (BLOCK_D, BLOCK_N) like in the forward, so the recomputed S tile
        # goes through the very same tl.dot as the forward's (bitwise equal logits).
        bt = _load_rows_t(b_ptr, cols, cmask, offs_d, dmask, stride_bn, stride_bd, DOT_DTYPE)
        db_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for t in range(0, count):
        rb = _bwd_row_block(t, cb, sp, count, SPLIT)
        rows = rb * BLOCK_M + offs_m
        rmask = rows < N
        rows = _widen(rows, INDEX_64)
        if X_IN_MEMORY:
            x = _load_rows(x_ptr, rows, rmask, cols, cmask, M, 1, tl.float32)
        elif ONE_CHUNK:
            a_tile = _load_rows(a_ptr, rows, rmask, offs_d, dmask, stride_an, stride_ad, DOT_DTYPE)
            x = tl.dot(a_tile, bt, input_precision=DOT_PRECISION)
        else:
            x = _tile_logits(
                a_ptr, b_ptr, rows, cols, rmask, cmask, D,
                stride_an, stride_ad, stride_bn, stride_bd,
                BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
        pl = 0.0
        if OVERRIDE:
            pl = tl.load(pl_ptr + rows, mask=rmask, other=0.0)
        s, allowed, pos, has_pos = _scored_tile(
            x, scale, bias, pl, rows, cols, rmask, cmask, rb, cb, row_offset,
            col_offset, period, rg_ptr, cg_ptr,
            EXCLUDE_SELF, PERIOD, HAS_GROUPS, OVERRIDE, BLOCK_M, BLOCK_N,
        )  # fmt: skip

        if EPILOGUE == "sigmoid":
            if POSITIVES:  # sigmoid(S) - 1 as -sigmoid(-S) on E: exact near 1
                q = _sigmoid(tl.where(pos, -s, s))
                q = tl.where(pos, -q, q)
            else:
                q = _sigmoid(s)
            dsu = tl.where(allowed, q, 0.0)
            ds = dsu * unit
        else:
            s_all = tl.where(allowed, s, float("-inf"))
            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_GR:
                gr = tl.load(gr_ptr + rows, mask=rmask, other=0.0)
                r_max, r_log = _log_sum(
                    tl.load(rmax_ptr + rows, mask=rmask, other=float("-inf")),
                    tl.load(rsum_ptr + rows, mask=rmask, other=0.0),
                )
                ds += gr[:, None] * tl.exp((s_all - r_max[:, None]) - r_log[:, None])
            if EPILOGUE == "softmax":
                if HAS_GC:
                    ds += gc[None, :] * tl.exp((s_all - c_max[None, :]) - c_log[None, :])
            if POSITIVES:
                if has_pos:
                    s_pos = tl.where(pos, s, float("-inf"))
                    if HAS_GPR:
                        gpr = tl.load(gpr_ptr + rows, mask=rmask, other=0.0)
                        p_max, p_log = _log_sum(
                            tl.load(pmax_ptr + rows, mask=rmask, other=float("-inf")),
                            tl.load(psum_ptr + rows, mask=rmask, other=0.0),
                        )
                        ds -= gpr[:, None] * tl.exp((s_pos - p_max[:, None]) - p_log[:, None])
                    if EPILOGUE == "softmax":
                        if HAS_GPC:
                            ds -= gpc[None, :] * tl.exp((s_pos - cp_max[None, :]) - cp_log[None, :])
            dsu = ds
            if NORMALIZE:
                dsu = ds * inv_unit

        if OVERRIDE:  # the positive's logit is not a_i . b_j: its gradient apart
            if has_pos:
                tl.atomic_add(
                    dpos_ptr + rows, tl.sum(tl.where(pos, ds, 0.0), axis=1), mask=rmask,
                    sem="relaxed",
                )  # fmt: skip
            ds = tl.where(pos, 0.0, ds)
            dsu = tl.where(pos, 0.0, dsu)
        ds_acc += tl.sum(ds * x, axis=1)
        dbias_acc += tl.sum(ds, axis=1)
        ds_lo = dsu.to(DOT_DTYPE)

        if X_IN_MEMORY:
            tl.store(
                ds_ptr + rows[:, None] * M + cols[None, :],
                dsu.to(ds_ptr.dtype.element_ty),
                mask=rmask[:, None] & cmask[None, :],
            )
        elif ONE_CHUNK:
            db_acc = tl.dot(tl.trans(ds_lo), a_tile, db_acc, input_precision=DOT_PRECISION)
            da = tl.dot(ds_lo, tl.trans(bt), input_precision=DOT_PRECISION)
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
                db_c = tl.dot(tl.trans(ds_lo), a_c, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    db_ptr + cols[:, None] * D + dd[None, :],
                    db_c * out_scale,
                    mask=cmask[:, None] & dmask_c[None, :],
                    sem="relaxed",
                )
                da_c = tl.dot(ds_lo, b_c, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    da_ptr + rows[:, None] * D + dd[None, :],
                    da_c * out_scale,
                    mask=rmask[:, None] & dmask_c[None, :],
                    sem="relaxed",
                )

    if ONE_CHUNK and not X_IN_MEMORY:
        tl.atomic_add(
            db_ptr + cols[:, None] * D + offs_d[None, :],
            db_acc * out_scale,
            mask=cmask[:, None] & dmask[None, :],
            sem="relaxed",
        )
    pid = cb * SPLIT + sp
    num_programs = tl.num_programs(0) * SPLIT
    tl.store(part_ptr + pid, tl.sum(ds_acc, axis=0))
    tl.store(part_ptr + num_programs + pid, tl.sum(dbias_acc, axis=0))


# ----------------------------------------------------------------------------- launchers


_F32 = torch.float32


def _check_vector(name: str, t: Optional[Tensor], size: int, device, ints: bool = False):
    if t is None:
        return
    if ints and t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if not ints and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != (size,):
        raise ValueError(f"{name} must be ({size},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, a on {device}")


def _prepare(sweep: Sweep) -> None:
    """Raise for what the kernels cannot take (shapes, dtypes, devices, offsets, vectors)."""
    a, b, scale, bias, pair = sweep.a, sweep.b, sweep.scale, sweep.bias, sweep.pair
    row_groups, col_groups = sweep.row_groups, sweep.col_groups
    positive_logits = sweep.positive_logits
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, D) and (m, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    device = _check_features("pair", "flashcontrast.backends.triton.pair", "a and b", a, b)
    for name, t in (("b", b), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, a on {device}")
    if scale.numel() != 1 or (bias is not None and bias.numel() != 1):
        raise ValueError("scale and bias must be single-element tensors")
    for name, value in (("row_offset", sweep.row_offset), ("col_offset", sweep.col_offset)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a Python int >= 0, got {value!r}")
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups are given together or not at all")
    _check_vector("row_groups", row_groups, a.shape[0], device, ints=True)
    _check_vector("col_groups", col_groups, b.shape[0], device, ints=True)
    if positive_logits is not None and not pair.positives:
        raise ValueError("positive_logits needs a Pair with positives")
    _check_vector("positive_logits", positive_logits, a.shape[0], device)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """t as a contiguous float32 vector (no copy when it already is one)."""
    return None if t is None else t.to(_F32).contiguous()


def _flags(sweep: Sweep) -> dict:
    """The constexprs both kernels take from the sweep's options."""
    pair = sweep.pair
    return dict(
        EPILOGUE=pair.epilogue,
        POSITIVES=pair.positives,
        EXCLUDE_SELF=pair.exclude_self,
        PERIOD=pair.period > 0,
        HAS_GROUPS=sweep.row_groups is not None,
        HAS_BIAS=sweep.bias is not None,
        OVERRIDE=sweep.positive_logits is not None,
    )


def _vectors(sweep: Sweep) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(row group ids, column group ids, fp32 positive logits) as the kernels read them:
    contiguous (no copy normally), None where absent."""
    rg = None if sweep.row_groups is None else sweep.row_groups.contiguous()
    cg = None if sweep.col_groups is None else sweep.col_groups.contiguous()
    return rg, cg, _f32(sweep.positive_logits)


def _width_one(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """D = 0: S = bias everywhere, as with one zero feature (an O(n + m) stand-in)."""
    return a.new_zeros((a.shape[0], 1)), b.new_zeros((b.shape[0], 1))


def _merge(parts: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """One or two statistics' (K, L) partial pairs merged into (L,) pairs (one launch;
    none for K = 1, where the partials are the result)."""
    k, length = parts[0][0].shape
    if k == 1:
        return [(pm[0], ps[0]) for pm, ps in parts]
    outs = [
        (torch.empty(length, dtype=_F32, device=pm.device), torch.empty_like(ps[0]))
        for pm, ps in parts
    ]
    second = parts[1] if len(parts) == 2 else parts[0]
    second_out = outs[1] if len(parts) == 2 else outs[0]
    block = 256 if _INTERPRET else 1024
    _pair_merge_kernel[(triton.cdiv(length, block), len(parts))](
        *parts[0], *second, *outs[0], *second_out, length, k,
        TWO=len(parts) == 2, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return outs


def _empty_stats(pair: Pair, n: int, m: int, device) -> Stats:
    """The statistics of a sweep without entries: every set empty."""

    def pair_of(size: int) -> tuple[Tensor, Tensor]:
        return (
            torch.full((size,), _NEG, dtype=_F32, device=device),
            torch.zeros(size, dtype=_F32, device=device),
        )

    if pair.epilogue == "sigmoid":
        return Stats(total=torch.zeros((), dtype=_F32, device=device))
    out = dict(zip(("row_max", "row_sum"), pair_of(n)))
    if pair.positives:
        out.update(zip(("pos_max", "pos_sum"), pair_of(n)))
    if pair.epilogue == "softmax":
        out.update(zip(("col_max", "col_sum"), pair_of(m)))
        if pair.positives:
            out.update(zip(("cpos_max", "cpos_sum"), pair_of(m)))
    return Stats(**out)


def _pair_forward(sweep: Sweep, x: Optional[Tensor] = None) -> Stats:
    """The sweep's statistics (``backends/pair.py``), float32.

    a (n, D), b (m, D): float32/float16/bfloat16 of one dtype, any strides (read in
    place); scale, bias: single elements (bias None: 0); row_offset, col_offset: Python
    ints; row_groups (n,), col_groups (m,) int32/int64 or both None; positive_logits (n,)
    or None. Returns row_max, row_sum (n,) [pos_max, pos_sum (n,)] [col_max, col_sum,
    cpos_max, cpos_sum (m,), "softmax"] or total (0-d, "sigmoid").

    ``x`` (n, m) float32 contiguous, the panel path's A B^T (``panel.py``): the kernel reads
    it instead of multiplying a and b."""
    _prepare(sweep)
    a, b, scale, bias, pair = sweep.a, sweep.b, sweep.scale, sweep.bias, sweep.pair
    n, m = a.shape[0], b.shape[0]
    device = a.device
    if n == 0 or m == 0:
        return _empty_stats(pair, n, m, device)
    if a.shape[1] == 0:
        a, b = _width_one(a, b)
    d = a.shape[1]
    tiles, g, h = _forward_plan(n, d, a.dtype, device, m)
    f32 = dict(dtype=_F32, device=device)
    softmax, sigmoid = pair.epilogue == "softmax", pair.epilogue == "sigmoid"
    # One buffer per statistic (the outputs never share storage); unused ones are dummies.
    count = 2 + 2 * pair.positives  # (max, sum) of the allowed set [and of the positives]
    rows = [torch.empty((h, n), **f32) for _ in range(count)] if not sigmoid else []
    cols = [torch.empty((g, m), **f32) for _ in range(count)] if softmax else []
    part = torch.empty(g * h if sigmoid else 1, **f32)
    ws = rows + cols
    bufs = (rows + [part] * 4)[:4] + (cols + [part] * 4)[:4]
    rg, cg, pl = _vectors(sweep)
    dummy = scale
    with _guard(device):
        _pair_fwd_kernel[(g, h)](
            a, b, scale, bias if bias is not None else dummy,
            rg if rg is not None else dummy, cg if cg is not None else dummy,
            pl if pl is not None else dummy,
            *bufs, part, dummy if x is None else x,
            n, m, d, sweep.row_offset, sweep.col_offset, pair.period,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            **_flags(sweep),
            X_IN_MEMORY=x is not None,
            ONE_CHUNK=d <= tiles.block_d,
            INDEX_64=_index_64(a, b, *ws, *([] if x is None else [x])),
            **_launch_kwargs(tiles, a.dtype, device),
        )  # fmt: skip
        if sigmoid:
            return Stats(total=part.sum())
        out = {}
        names = ("row", "pos") if pair.positives else ("row",)
        for name, (mx, sm) in zip(names, _merge(list(zip(rows[::2], rows[1::2])))):
            out.update({f"{name}_max": mx, f"{name}_sum": sm})
        if softmax:
            names = ("col", "cpos") if pair.positives else ("col",)
            for name, (mx, sm) in zip(names, _merge(list(zip(cols[::2], cols[1::2])))):
                out.update({f"{name}_max": mx, f"{name}_sum": sm})
    return Stats(**out)


def _needed(stats: Stats, names: tuple[str, ...], why: str) -> None:
    missing = [k for k in names if getattr(stats, k) is None]
    if missing:
        raise ValueError(f"stats lack {', '.join(missing)}, needed for {why}")


def _unit(pair: Pair, coefs: tuple, total: Optional[Tensor], dtype: torch.dtype):
    """(0-d fp32 unit dS is divided by before its cast, NORMALIZE), see the module
    docstring: g for "sigmoid", max |coefficient| (0 or not finite: 1) for fp16."""
    if pair.epilogue == "sigmoid":
        return total.to(_F32).reshape(()), False
    given = [c for c in coefs if c is not None]
    if dtype != torch.float16 or not given:
        return None, False
    biggest = torch.cat([c.reshape(-1) for c in given]).abs().nan_to_num_(0.0, 0.0, 0.0)
    biggest = biggest.amax()
    return torch.where(biggest > 0, biggest, torch.ones_like(biggest)), True


def _pair_backward(
    sweep: Sweep,
    stats: Stats,
    coefs: Coefs,
    out_dtype: Optional[torch.dtype],
    panel: Optional[tuple[Tensor, Tensor, tuple]] = None,
) -> Grads:
    """(da (n, D), db (m, D), dscale, dbias [, dpos (n,)]) of the loss the coefficients
    define (``backends/pair.py``), from the merged statistics.

    Arguments as :func:`pair_forward`'s, plus stats (the merged, global pairs: the column
    ones of this block's columns) and coefs (rows, pos_rows (n,), cols, pos_cols (m,),
    None: 0; total (0-d) for "sigmoid"). da and db in ``out_dtype`` (None: the inputs'
    dtype; float32: the accumulation buffers themselves); dscale, dbias 0-d float32;
    dpos (n,) float32 with positive_logits.

    ``panel`` = (x, ds, (unit, normalize)), the panel path (``panel.py``): the kernel reads
    X (n, m) float32 and writes dS / unit into ds (n, m) instead of forming dA and dB
    (returned as (0, D) stand-ins), with the unit :func:`_unit` chose for the whole sweep."""
    _prepare(sweep)
    a, b, scale, bias, pair = sweep.a, sweep.b, sweep.scale, sweep.bias, sweep.pair
    n, m, d_in = a.shape[0], b.shape[0], a.shape[1]
    device = a.device
    f32 = dict(dtype=_F32, device=device)
    softmax, sigmoid = pair.epilogue == "softmax", pair.epilogue == "sigmoid"
    # Coefficients an epilogue has no statistic for are ignored, as by the torch backend.
    gr = _f32(coefs.rows) if not sigmoid else None
    gpr = _f32(coefs.pos_rows) if not sigmoid and pair.positives else None
    gc = _f32(coefs.cols) if softmax else None
    gpc = _f32(coefs.pos_cols) if softmax and pair.positives else None
    for name, t, size in (("rows", gr, n), ("pos_rows", gpr, n), ("cols", gc, m),
                          ("pos_cols", gpc, m)):  # fmt: skip
        _check_vector(f"coefs.{name}", t, size, device)
    if sigmoid and coefs.total is None:
        raise ValueError('coefs.total is needed for the "sigmoid" epilogue')
    if not sigmoid:
        if gr is not None:
            _needed(stats, ("row_max", "row_sum"), "coefs.rows")
        if gpr is not None:
            _needed(stats, ("pos_max", "pos_sum"), "coefs.pos_rows")
        if gc is not None:
            _needed(stats, ("col_max", "col_sum"), "coefs.cols")
        if gpc is not None:
            _needed(stats, ("cpos_max", "cpos_sum"), "coefs.pos_cols")

    # the panel path forms dA and dB itself: (0, D) stand-ins, never read or written
    da = torch.zeros((0 if panel else n, d_in), **f32)
    db = torch.zeros((0 if panel else m, d_in), **f32)
    dpos = torch.zeros(n, **f32) if sweep.positive_logits is not None else None
    dscale, dbias = torch.zeros((), **f32), torch.zeros((), **f32)
    if n > 0 and m > 0:
        ka, kb, kda, kdb = a, b, da, db
        if d_in == 0:
            ka, kb = _width_one(a, b)
            kda, kdb = torch.zeros((n, 1), **f32), torch.zeros((m, 1), **f32)
        d = ka.shape[1]
        # Column coefficients keep six more (BLOCK_N,) vectors on chip: 64 x 128 tiles
        # spill on sm_90 then (ptxas, tools/triton_aot_check.py); 64 x 64 do not and stay
        # wgmma-wide.
        columns = gc is not None or gpc is not None
        tiles, num_cb, split = _backward_plan(
            n, d, a.dtype, device, m, max_block_n=64 if columns else None
        )
        part = torch.empty((2, num_cb * split), **f32)
        if panel is None:
            unit, normalize = _unit(pair, (gr, gpr, gc, gpc), coefs.total, a.dtype)
            x = ds = None
        else:
            x, ds, (unit, normalize) = panel
        rg, cg, pl = _vectors(sweep)
        dummy = scale

        def ptr(t: Optional[Tensor]) -> Tensor:
            return dummy if t is None else t

        def stat(name: str) -> Tensor:
            return ptr(_f32(getattr(stats, name)))

        with _guard(device):
            _pair_bwd_kernel[(num_cb, split)](
                ka, kb, scale, ptr(bias), ptr(rg), ptr(cg), ptr(pl),
                stat("row_max"), stat("row_sum"), stat("pos_max"), stat("pos_sum"),
                stat("col_max"), stat("col_sum"), stat("cpos_max"), stat("cpos_sum"),
                ptr(gr), ptr(gpr), ptr(gc), ptr(gpc), ptr(unit),
                kda, kdb, ptr(dpos), part, ptr(x), ptr(ds),
                n, m, d, sweep.row_offset, sweep.col_offset, pair.period,
                ka.stride(0), ka.stride(1), kb.stride(0), kb.stride(1),
                **_flags(sweep),
                HAS_GR=gr is not None, HAS_GPR=gpr is not None,
                HAS_GC=gc is not None, HAS_GPC=gpc is not None,
                NORMALIZE=normalize,
                X_IN_MEMORY=x is not None,
                ONE_CHUNK=d <= tiles.block_d,
                INDEX_64=_index_64(ka, kb, kda, kdb, *([] if x is None else [x])),
                **_launch_kwargs(tiles, a.dtype, device),
            )  # fmt: skip
        dscale, dbias = part[0].sum(), part[1].sum()
    if out_dtype != _F32:
        da, db = da.to(out_dtype or a.dtype), db.to(out_dtype or b.dtype)
    return Grads(da, db, dscale, dbias, dpos)


#: Which path the public entry points take: PATH_VARIABLE (FLASHCONTRAST_TRITON_PATH) =
#: "auto" (default), "fused" (these kernels, dA and dB on chip) or "panel" (``panel.py``:
#: cuBLAS GEMMs, these kernels' epilogues with X_IN_MEMORY). "auto" is "fused" off CUDA
#: (the interpreter); on CUDA the faster measured path where the device class has measured
#: rows (``_measured.py``), else the cost model's choice (``costmodel.choose_pair_path``):
#: the same in both directions for one shape.


def sweep_path(sweep: Sweep) -> str:
    """ "fused" or "panel": the path :data:`PATH_VARIABLE` and the shape choose for ``sweep``."""
    a, b = sweep.a, sweep.b
    return _paths.path_for(
        PATH_VARIABLE,
        a.device,
        lambda: auto_path(a.device, a.shape[0], b.shape[0], a.shape[1], a.dtype),
    )


def auto_path(device: torch.device, n: int, m: int, d: int, dtype: torch.dtype) -> str:
    """ "auto"'s path on a CUDA ``device`` for an (n x m) sweep at D = ``d``: measured, else
    the cost model's."""
    from ... import _measured, _verified, costmodel

    name = str(dtype).removeprefix("torch.")
    measured = _measured.measured_choice(_verified.device_class(device), n, m, d, name)
    if measured is not None:
        return measured
    return costmodel.choose_pair_path(n, m, d, dtype.itemsize)


_ROUTE_DOC = "\n\n    The path: :func:`sweep_path` (:data:`PATH_VARIABLE`)."
_routed_forward, _routed_backward = _panel.routes(
    sweep_path,
    lambda sweep: _pair_forward(sweep),  # looked up per call: the module's current function
    lambda *args: _pair_backward(*args),
    lambda: importlib.import_module(f"{__package__}.panel"),
    (
        (_pair_forward.__doc__ or "").split("\n\n    ``x``")[0] + _ROUTE_DOC,
        (_pair_backward.__doc__ or "").split("\n\n    ``panel``")[0] + _ROUTE_DOC,
    ),
)

pair_forward = forward_entry(_routed_forward, budget=False)
pair_backward = backward_entry(_routed_backward, budget=False)
