"""Pieces the Triton kernel modules share: tile loads, online logsumexp, launcher checks.

The ``@triton.jit`` helpers are inlined into the kernels that call them, so they cost
nothing at run time; they exist so each piece of logic is written once. Like the kernel
modules, this one imports Triton and must only be imported once
:func:`flashcontrast.backends.triton.triton_unavailable_reason` has returned None.

Interpreter (TRITON_INTERPRET=1, CPU tensors): read once, at import, like Triton itself
reads it when the kernels are defined.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_unavailable_reason

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _load_rows(ptr, rows, rmask, dd, dmask, stride_n, stride_d, DTYPE: tl.constexpr):
    """(len(rows), len(dd)) tile of ptr[rows, dd] cast to DTYPE, zero-padded."""
    return tl.load(
        ptr + rows[:, None] * stride_n + dd[None, :] * stride_d,
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(DTYPE)


@triton.jit
def _load_rows_t(ptr, rows, rmask, dd, dmask, stride_n, stride_d, DTYPE: tl.constexpr):
    """(len(dd), len(rows)) tile of ptr[rows, dd]^T cast to DTYPE, zero-padded."""
    return tl.load(
        ptr + rows[None, :] * stride_n + dd[:, None] * stride_d,
        mask=rmask[None, :] & dmask[:, None],
        other=0.0,
    ).to(DTYPE)


@triton.jit
def _plane_offset(r, size, width):
    """r * size * width in int64: the element offset of plane r of a (K, size, width)
    buffer (GRAM's K others), which passes 2^31 at (K - 1) N D >= 2^31 (K = 3, N = 2^20,
    D = 1024) while every per-tile offset inside a plane stays int32."""
    return tl.full([], r, tl.int64) * size * width


@triton.jit
def _widen(idx, INDEX_64: tl.constexpr):
    """idx as int64 when offsets may not fit in int32 (INDEX_64), else unchanged."""
    if INDEX_64:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def _tile_logits(
    a_ptr,
    b_ptr,
    rows,
    cols,
    rmask,
    cmask,
    D,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of A[rows] @ B[cols]^T, looping over D in chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < D
        a = _load_rows(a_ptr, rows, rmask, dd, dmask, stride_an, stride_ad, DOT_DTYPE)
        bt = _load_rows_t(b_ptr, cols, cmask, dd, dmask, stride_bn, stride_bd, DOT_DTYPE)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_program(N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pid_g, pid_h, G, H, row blocks, column blocks) of the (G, H) forward grid: program
    (g, h) owns row blocks g (mod G) and column blocks h (mod H)."""
    pid_g = tl.program_id(0)
    pid_h = tl.program_id(1)
    G = tl.num_programs(0)
    H = tl.num_programs(1)
    num_rb = tl.cdiv(N, BLOCK_M)
    num_cb = tl.cdiv(N, BLOCK_N)
    return pid_g, pid_h, G, H, num_rb, num_cb


@triton.jit
def _bwd_program(N, BLOCK_M: tl.constexpr):
    """(cb, sp, SPLIT, count) of the (column blocks, SPLIT) backward grid: program (cb, sp)
    visits the count row blocks rb = sp (mod SPLIT) (see :func:`_bwd_row_block`)."""
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    SPLIT = tl.num_programs(1)
    num_rb = tl.cdiv(N, BLOCK_M)
    count = tl.cdiv(num_rb - sp, SPLIT)  # row blocks rb = sp (mod SPLIT); sp < num_rb
    return cb, sp, SPLIT, count


@triton.jit
def _bwd_row_block(t, cb, sp, count, SPLIT):
    """The t-th row block of backward program (cb, sp), staggered by cb so that
    neighbouring programs hit different rows."""
    return sp + ((t + cb) % count) * SPLIT


@triton.jit
def _lse_init(BLOCK: tl.constexpr):
    """Empty online (max, sumexp): (-inf, 0)."""
    return tl.full((BLOCK,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK,), dtype=tl.float32)


@triton.jit
def _lse_shift(m):
    """The online max to subtract: m, or 0 where m is -inf (so inf - inf never occurs)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_lse(m, l, s, AXIS: tl.constexpr):
    """(max, sumexp) of a row (AXIS=1) or column (AXIS=0) pair after folding in tile s."""
    m_new = tl.maximum(m, tl.max(s, axis=AXIS))
    m_use = _lse_shift(m_new)
    if AXIS == 1:
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
    else:
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[None, :]), axis=0)
    return m_new, l


@triton.jit
def _lse_finish(m, l, mask):
    """m + log l, with l taken as 1 on masked lanes (l >= 1 on valid ones)."""
    return m + tl.log(tl.where(mask, l, 1.0))


@triton.jit
def _softplus(t):
    """log(1 + e^t), stable for any t: max(t, 0) + log1p(e^-|t|)."""
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    tiny = u == 1.0
    log1p = tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))
    return tl.maximum(t, 0.0) + log1p


@triton.jit
def _sigmoid(t):
    """1 / (1 + e^-t), stable for any t."""
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log_sum(m, s):
    """(max, log sum) of (max, sum) pairs for the backward's exp((S - max) - log sum):
    empty sets (max -inf, sum 0) become (0, +inf), so their weights are exactly 0."""
    empty = m == float("-inf")
    return tl.where(empty, 0.0, m), tl.where(empty, float("inf"), tl.log(tl.where(empty, 1.0, s)))


@triton.jit
def _store_diag(
    diag_ptr, s, rows, cols, rmask, rb, cb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """diag[i] = s[i, i] for the rows of tile (rb, cb) that hold their diagonal entry;
    only the tile(s) crossing i == j store anything."""
    lo = cb * BLOCK_N
    if (rb * BLOCK_M < lo + BLOCK_N) & (lo < rb * BLOCK_M + BLOCK_M):
        on_diag = rows[:, None] == cols[None, :]
        d_val = tl.sum(tl.where(on_diag, s, 0.0), axis=1)
        tl.store(diag_ptr + rows, d_val, mask=rmask & (rows >= lo) & (rows < lo + BLOCK_N))


@triton.jit
def _seen_columns(cols, rb, pid_g, N):
    """Mask of the column-partial entries to read: none on the program's first row block
    (its first visit writes without reading), all later."""
    return cols < (rb > pid_g).to(tl.int32) * N


@triton.jit
def _col_lse_rmw(cm_ptrs, cl_ptrs, seen, cmask, s):
    """Read-modify-write of a program's column partial (max, sumexp) with tile s."""
    cm_old = tl.load(cm_ptrs, mask=seen, other=float("-inf"))
    cl_old = tl.load(cl_ptrs, mask=seen, other=0.0)
    cm_new, cl_new = _online_lse(cm_old, cl_old, s, 0)
    tl.store(cm_ptrs, cm_new, mask=cmask)
    tl.store(cl_ptrs, cl_new, mask=cmask)


@triton.jit
def _merge_partials(m_ptr, l_ptr, offs, mask, L, k0, k1, BLOCK: tl.constexpr):
    """(max, sumexp) of entries offs of (K, L) partial pairs merged over rows k0 .. k1 - 1:
    m = max_k m_k, l = sum_k l_k e^{m_k - m} (all m_k -inf: (-inf, 0), the empty set)."""
    m, l = _lse_init(BLOCK)
    for k in range(k0, k1):
        pm = tl.load(m_ptr + k * L + offs, mask=mask, other=float("-inf"))
        pl = tl.load(l_ptr + k * L + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, pm)
        m_use = _lse_shift(m_new)
        l = l * tl.exp(m - m_use) + pl * tl.exp(pm - m_use)
        m = m_new
    return m, l


@triton.jit
def _lse_combine_kernel(
    ws_m_ptr,
    ws_l_ptr,
    row_lse_ptr,
    col_lse_ptr,
    N,
    H,
    G,
    BLOCK: tl.constexpr,
):
    """row_lse from partials [0, H), col_lse from [H, H+G): LSE_k (m_k + log l_k)."""
    which = tl.program_id(1)  # 0: rows, 1: columns
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m, l = _merge_partials(ws_m_ptr, ws_l_ptr, offs, mask, N, which * H, H + which * G, BLOCK)
    lse = _lse_finish(m, l, mask)
    if which == 0:
        tl.store(row_lse_ptr + offs, lse, mask=mask)
    else:
        tl.store(col_lse_ptr + offs, lse, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _combine_lse(ws_m: Tensor, ws_l: Tensor, row_lse: Tensor, col_lse: Tensor, n, h, g) -> None:
    """Fold the (H + G, N) forward partials into row_lse and col_lse (one launch)."""
    block = 256 if _INTERPRET else 1024
    _lse_combine_kernel[(triton.cdiv(n, block), 2)](
        ws_m, ws_l, row_lse, col_lse, n, h, g, BLOCK=block, num_warps=4
    )


def _check_runnable(device: torch.device, module: str) -> None:
    """RuntimeError unless the kernels of ``module`` (as it was imported) run on device."""
    reason = triton_unavailable_reason(device)
    if reason is None and device.type == "cpu" and not _INTERPRET:
        reason = (
            f"TRITON_INTERPRET=1 was set after {module} was imported; "
            "Triton reads it when the kernels are defined"
        )
    if reason is not None:
        raise RuntimeError(reason)


def _check_features(kernels: str, module: str, names: str, x: Tensor, y: Tensor) -> torch.device:
    """x's device, after a TypeError unless x and y (``names``) share a dtype the kernels
    take and :func:`_check_runnable`'s RuntimeError unless ``module``'s kernels run there."""
    if x.dtype != y.dtype or x.dtype not in _TORCH_TO_TL:
        raise TypeError(
            f"Triton {kernels} kernels take float32, float16 or bfloat16 {names} of one "
            f"dtype, got {x.dtype} and {y.dtype}"
        )
    _check_runnable(x.device, module)
    return x.device


def _check_block_size(key: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{key} must be a power of two >= 16, got {value}")


@contextlib.contextmanager
def _scoped_update(store: dict, kwargs: dict) -> Iterator[None]:
    """store updated with kwargs inside the block, restored after it."""
    saved = dict(store)
    store.update(kwargs)
    try:
        yield
    finally:
        store.clear()
        store.update(saved)


def _tensor_cores(dtype: torch.dtype) -> bool:
    return dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"


def _dot_setup(dtype: torch.dtype, device: torch.device):
    """(tl dtype the tiles are cast to before tl.dot, tl.dot input_precision)."""
    if _INTERPRET and dtype == torch.bfloat16:
        return tl.float32, "ieee"  # the interpreter's bf16 tl.dot is wrong
    if dtype == torch.float32:
        return tl.float32, ("tf32" if device.type == "cuda" and _tensor_cores(dtype) else "ieee")
    return _TORCH_TO_TL[dtype], "ieee"  # input_precision only matters for fp32


def _index_64(*tensors: Tensor) -> bool:
    """True when an element offset may not fit in int32."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if max(span, t.numel()) >= 2**31:
            return True
    return False


def _guard(device: torch.device):
    # Triton launches on the current stream of the current device: make it a's device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
