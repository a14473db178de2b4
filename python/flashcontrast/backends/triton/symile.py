"""Symile "n_squared" (docs/objectives.md section 5) as Triton kernels: no n x m^2 buffer.

Contract: flashcontrast/backends/__init__.py (symile_n2_*). Symile "n" runs on the pair
engine (``pair.py``).

n_squared, M = 3 (anchor x, others y, z), rectangular as the "torch" backend's
(``blockwise/symile.py``): n rows x (n, D) against the m^2 pairs (j, k) of y, z (m, D)
(n = m in one process). logit_ijk = s sum_d x_id y_jd z_kd. For a fixed j the (BM x BK)
logit tile is a plain GEMM whose left operand is formed on the fly:
    T_j = (x_blk * y_j[None, :]) @ z_blk^T          2 BM BK D flops
    forward   program per row block of x; loops j = 0..m-1 and the column blocks of z;
              online LSE over the m^2 (j, k) pairs: 2 n m^2 D flops, O(n) memory.
    backward  c_ijk = g_i exp(s T_ijk - lse_i); three kernels, each owning its output:
              dx_i = s sum_j y_j * (c_ij: @ z)          program per row block of x (n)
              dy_j = s sum_i x_i * (c_:j: @ z)_i        program per j (m)
              dz_k = s sum_j (c_:jk)^T @ (x * y_j)      program per column block of z (m)
              dscale = sum(x * dx_raw), in torch.
              Each recomputes T (2 n m^2 D) and does one GEMM (2 n m^2 D): 12 n m^2 D flops.
    Forward + backward: 14 n m^2 D flops, against the reference's 2 n m^2 D forward plus
    an (n, m^2) logit tensor and an (m^2, D) product tensor per anchor.

All tile products accumulate in fp32; the products x * y_j are formed in fp32 and rounded
once to the input dtype for tl.dot (the reference rounds y (x) z to it likewise). Tiles
hold the whole of D (BLOCK_D = next power of two >= D): gradient accumulators live on
chip; for large D the row/column blocks shrink and the pipelining gets shallower
(:func:`_tiles`, :func:`_num_stages`) so that they fit in shared memory (fp32 up to
D = 1024, 16-bit up to 2048). Masked logits are -inf
and every online max that may be -inf is replaced by 0 before it is subtracted.

Interpreter (TRITON_INTERPRET=1): bf16 tiles are upcast to fp32 before tl.dot (its bf16
tl.dot is wrong), as in ``pair.py``; ``_plan.override_tiles`` forces the block sizes
(block_m and block_n: the tiles hold the whole of D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _TORCH_TO_TL,
    _check_runnable,
    _dot_setup,
    _guard,
    _load_rows,
    _lse_finish,
    _lse_init,
    _online_lse,
)
from ._plan import _OVERRIDE, _capability  # the one tile-override registry

__all__ = ["symile_n2_backward", "symile_n2_forward"]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _load_f32(ptr, rows, rmask, offs_d, dmask, stride_n, stride_d):
    """(len(rows), BLOCK_D) fp32 tile of rows, zero-padded."""
    return _load_rows(ptr, rows, rmask, offs_d, dmask, stride_n, stride_d, tl.float32)


@triton.jit
def _fwd_rows(a_ptr, scale_ptr, n, D, stride_n, stride_d,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """This program's row block of a forward: (rows, rmask, offs_d, dmask, scale, fp32 tile
    of a[rows]), a having n rows."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    scale = tl.load(scale_ptr).to(tl.float32)
    a_tile = _load_f32(a_ptr, rows, rmask, offs_d, dmask, stride_n, stride_d)
    return rows, rmask, offs_d, dmask, scale, a_tile


@triton.jit
def _probs(t, scale, lse, g, rmask, cmask):
    """g_i exp(s t_ij - lse_i) on valid entries, 0 elsewhere."""
    return tl.where(rmask[:, None] & cmask[None, :],
                    tl.exp(t * scale - lse[:, None]) * g[:, None], 0.0)  # fmt: skip


@triton.jit
def _load_lse_g(lse_ptr, g_ptr, rows, rmask):
    """(row_lse, grad_rows) of rows, 0 where masked."""
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    return lse, g


# ----------------------------------------------------------------------------- n_squared


@triton.jit
def _n2_tile(xy, z_ptr, cols, cmask, offs_d, dmask, stride_zn, stride_zd,
             DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """(raw logits (x * y_j) @ z[cols]^T, z tile), both fp32."""
    z = _load_f32(z_ptr, cols, cmask, offs_d, dmask, stride_zn, stride_zd)
    t = tl.dot(xy.to(DOT_DTYPE), tl.trans(z.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    return t, z


@triton.jit
def _n2_cz(xy, z_ptr, rmask, lse, g, scale, m, offs_d, dmask, szn, szd,
           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
           DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """fp32 (BLOCK_M, BLOCK_D) sum_k c_ijk z_k over the m rows k of z for one j
    (xy = x * y_j), c = g P."""
    cz = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        cmask = cols < m
        t, z = _n2_tile(xy, z_ptr, cols, cmask, offs_d, dmask, szn, szd,
                        DOT_DTYPE, DOT_PRECISION)  # fmt: skip
        c = _probs(t, scale, lse, g, rmask, cmask)
        cz = tl.dot(c.to(DOT_DTYPE), z.to(DOT_DTYPE), cz, input_precision=DOT_PRECISION)
    return cz


@triton.jit
def _n2_fwd_kernel(x_ptr, y_ptr, z_ptr, scale_ptr, lse_ptr, n, m, D,
                   sxn, sxd, syn, syd, szn, szd,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    # x: n rows, one row block per program; y, z: m rows, the pairs (j, k) swept here
    rows, rmask, offs_d, dmask, scale, x = _fwd_rows(
        x_ptr, scale_ptr, n, D, sxn, sxd, BLOCK_M, BLOCK_D
    )
    m_i, l_i = _lse_init(BLOCK_M)
    for j in range(0, m):
        yj = tl.load(y_ptr + j * syn + offs_d * syd, mask=dmask, other=0.0)
        xy = x * yj.to(tl.float32)[None, :]
        for k0 in range(0, m, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            cmask = cols < m
            t, _ = _n2_tile(xy, z_ptr, cols, cmask, offs_d, dmask, szn, szd,
                            DOT_DTYPE, DOT_PRECISION)  # fmt: skip
            s = tl.where(rmask[:, None] & cmask[None, :], t * scale, float("-inf"))
            m_i, l_i = _online_lse(m_i, l_i, s, 1)
    tl.store(lse_ptr + rows, _lse_finish(m_i, l_i, rmask), mask=rmask)


@triton.jit
def _n2_bwd_kernel(x_ptr, y_ptr, z_ptr, scale_ptr, lse_ptr, g_ptr, out_ptr, n, m, D,
                   sxn, sxd, syn, syd, szn, szd,
                   WHICH: tl.constexpr,  # 0: dx_raw (rows), 1: dy_raw (one j), 2: dz_raw
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    scale = tl.load(scale_ptr).to(tl.float32)
    if WHICH == 0:
        # dx_i = sum_j y_j * (c_ij: @ z), program per row block of x (n rows)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        x = _load_f32(x_ptr, rows, rmask, offs_d, dmask, sxn, sxd)
        lse, g = _load_lse_g(lse_ptr, g_ptr, rows, rmask)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for j in range(0, m):
            yj = tl.load(y_ptr + j * syn + offs_d * syd, mask=dmask, other=0.0)
            yj = yj.to(tl.float32)
            xy = x * yj[None, :]
            cz = _n2_cz(xy, z_ptr, rmask, lse, g, scale, m, offs_d, dmask, szn, szd,
                        BLOCK_M, BLOCK_K, BLOCK_D, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
            acc += cz * yj[None, :]
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], acc,
                 mask=rmask[:, None] & dmask[None, :])  # fmt: skip
    elif WHICH == 1:
        # dy_j = sum_i x_i * (c_:j: @ z)_i, program pid = j (m of them)
        yj = tl.load(y_ptr + pid * syn + offs_d * syd, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_M):
            rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < n
            x = _load_f32(x_ptr, rows, rmask, offs_d, dmask, sxn, sxd)
            lse, g = _load_lse_g(lse_ptr, g_ptr, rows, rmask)
            xy = x * yj[None, :]
            cz = _n2_cz(xy, z_ptr, rmask, lse, g, scale, m, offs_d, dmask, szn, szd,
                        BLOCK_M, BLOCK_K, BLOCK_D, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
            acc += tl.sum(cz * x, axis=0)
        tl.store(out_ptr + pid * D + offs_d, acc, mask=dmask)
    else:
        # dz_k = sum_j c_:jk^T @ (x * y_j), program per column block of z (m rows)
        cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = cols < m
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for j in range(0, m):
            yj = tl.load(y_ptr + j * syn + offs_d * syd, mask=dmask, other=0.0)
            for r0 in range(0, n, BLOCK_M):
                rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                rmask = rows < n
                x = _load_f32(x_ptr, rows, rmask, offs_d, dmask, sxn, sxd)
                lse, g = _load_lse_g(lse_ptr, g_ptr, rows, rmask)
                xy = x * yj.to(tl.float32)[None, :]
                t, _ = _n2_tile(xy, z_ptr, cols, cmask, offs_d, dmask, szn, szd,
                                DOT_DTYPE, DOT_PRECISION)  # fmt: skip
                c = _probs(t, scale, lse, g, rmask, cmask)
                acc = tl.dot(tl.trans(c.to(DOT_DTYPE)), xy.to(DOT_DTYPE), acc,
                             input_precision=DOT_PRECISION)  # fmt: skip
        tl.store(out_ptr + cols[:, None] * D + offs_d[None, :], acc,
                 mask=cmask[:, None] & dmask[None, :])  # fmt: skip


# ----------------------------------------------------------------------------- planning


def _tiles(d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). Untimed on a GPU: tune first."""
    block_d = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        bm = bn = 32
    elif block_d <= 128:
        bm = bn = 64
    else:  # whole-D tiles: keep the on-chip operands and accumulators bounded
        bm = bn = 32 if block_d <= 256 else 16
    bm, bn = _OVERRIDE.get("block_m", bm), _OVERRIDE.get("block_n", bn)
    return bm, bn, block_d, 4, _num_stages(max(bm, bn), block_d, dtype, device)


def _num_stages(block: int, block_d: int, dtype: torch.dtype, device: torch.device) -> int:
    """Software-pipelining depth for the streamed (block, BLOCK_D) whole-D tiles.

    Triton keeps up to num_stages + 1 of them in shared memory (four at its default of 3,
    in the dz pass of ``_n2_bwd_kernel``), in the dtype that reaches tl.dot. Compiled for
    sm_80/sm_90 (``python tools/triton_aot_check.py``), fp32 16 x 1024
    tiles then need 192-256 KiB, more than one block may have on an A100 (163 KiB) or an
    H100 (227 KiB); at 1 stage they need 128 KiB. So 3 stages while four tiles fit in
    128 KiB, else 1. fp32 D > 1024 (16-bit D > 2048) fits no GPU even so: whole-D tiles
    would have to become D chunks.
    """
    if device.type != "cuda":
        return 1  # the interpreter ignores it
    tile_bytes = block * block_d * (4 if dtype == torch.float32 else 2)
    return 3 if 4 * tile_bytes <= 128 * 1024 else 1


def _prepare(x: Tensor, y: Tensor, z: Tensor) -> None:
    """Checks x (n, D) and y, z (m, D): one dtype the kernels take, one device."""
    if x.dim() != 2 or y.dim() != 2 or y.shape != z.shape or x.shape[1] != y.shape[1]:
        raise ValueError(
            "features must be x (n, D) and y, z (m, D) of one D, got "
            f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(z.shape)}"
        )
    first = x
    for t in (x, y, z):
        if t.dtype != first.dtype or t.dtype not in _TORCH_TO_TL:
            raise TypeError(
                "Triton Symile kernels take float32, float16 or bfloat16 features of one "
                f"dtype, got {t.dtype}"
            )
        if t.device != first.device:
            raise ValueError(f"features on {t.device} and {first.device}")
    _check_runnable(first.device, "flashcontrast.backends.triton.symile")


def _setup(x: Tensor, y: Tensor, z: Tensor):
    """Checks x (n, D) and y, z (m, D), then (n, m, d, BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps, num_stages, DOT_DTYPE, DOT_PRECISION) of a launch on them."""
    _prepare(x, y, z)
    first = x
    n, d = x.shape
    m = y.shape[0]
    tiles = _tiles(d, first.dtype, first.device)
    max_d = 1024 if first.dtype == torch.float32 else 2048
    if first.device.type == "cuda" and tiles[2] > max_d:
        # whole-D tiles of that width fit no GPU's shared memory (see _num_stages)
        raise RuntimeError(
            f"the Triton Symile kernels hold whole-D tiles and take D <= {max_d} for "
            f"{first.dtype} on a GPU, got D = {d}; use backend='torch' (or 'cuda')"
        )
    return (n, m, d, *tiles, *_symile_dot_setup(first.dtype, tiles[2], first.device))


def _symile_dot_setup(dtype: torch.dtype, block_d: int, device: torch.device):
    """``_dot_setup``, except fp32 with TF32 allowed at BLOCK_D >= 1024 before Hopper: the
    tensor-core operand copies of 16 x 1024 fp32 tiles need 192 KiB of shared memory in
    the backward (three tiles), more than an A100 block may have (163 KiB), where IEEE
    (FMA) products need two (128 KiB). Forward and backward take the same products, so
    the recomputed logits match the forward's."""
    dot_dtype, precision = _dot_setup(dtype, device)
    if precision == "tf32" and block_d >= 1024 and _capability(device)[0] < 9:
        precision = "ieee"
    return dot_dtype, precision


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- launchers


def symile_n2_forward(x: Tensor, y: Tensor, z: Tensor, scale: Tensor) -> Tensor:
    """row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd, (n,) fp32: rows x (n, D) against
    the m^2 pairs of y, z (m, D) (-inf for every row when m = 0)."""
    n, m, d, bm, bk, bd, warps, stages, dot_dtype, precision = _setup(x, y, z)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    with _guard(x.device):
        _n2_fwd_kernel[(triton.cdiv(n, bm),)](
            x, y, z, _f32(scale), lse, n, m, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), z.stride(0), z.stride(1),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return lse


def symile_n2_backward(
    x: Tensor, y: Tensor, z: Tensor, scale: Tensor, row_lse: Tensor, grad_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (n, D), dy (m, D), dz (m, D), dscale) of sum_i grad_rows_i row_lse_i (shapes as
    :func:`symile_n2_forward`)."""
    n, m, d, bm, bk, bd, warps, stages, dot_dtype, precision = _setup(x, y, z)
    # fp32 outputs (backends/__init__.py), three tensors: a custom op's outputs may not alias
    outs = [torch.empty((rows, d), dtype=torch.float32, device=x.device) for rows in (n, m, m)]
    s32, lse, g = _f32(scale), _f32(row_lse), _f32(grad_rows)
    # dx: a program per row block of x; dy: one per j; dz: one per column block of z
    grids = (triton.cdiv(n, bm), m, triton.cdiv(m, bk))
    with _guard(x.device):
        for which, grid in enumerate(grids):
            _n2_bwd_kernel[(grid,)](
                x, y, z, s32, lse, g, outs[which], n, m, d,
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), z.stride(0), z.stride(1),
                WHICH=which, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
                DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
    dscale = (x.float() * outs[0]).sum()
    for out in outs:
        out.mul_(s32)
    return (*outs, dscale)
