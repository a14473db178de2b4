"""Symile "n_squared" (docs/objectives.md section 5) on the "torch" backend: blockwise, bounded
memory. (Symile "n" runs on the pair engine: ``blockwise/pair.py``.)

n_squared, K others    candidates of anchor row i are all tuples (j_1, ..., j_K) of the m
                       columns of the others (m = N in one process; a rank's n rows
                       against the gathered N columns in ``distributed/symile.py``). The
                       tuples of the first K - 1 others (the "prefix", flat index t, first
                       other most significant) are visited in blocks of T, with the prefix
                       product P_t = prod_k o^k_{j_k(t)} (T, D); for a block of rows the
                       logits (rows, T, m) = s ((x_i * P_t) @ o^K^T) are one GEMM, folded
                       into an online row logsumexp. Nothing of size N x N^K is ever held.
                       Backward, with c = g_i exp(L - lse_i) and G = c @ o^K (rows, T, D):
                       dx_i = s sum_t G_it * P_t;  dP_t = s sum_i G_it * x_i;
                       do^K = s c^T @ (x_i * P_t);  dscale = sum_i <x_i, dx_i> / s;
                       dP_t flows to each prefix factor through the product rule.

Block memory: rows * T * max(m, D) elements per block (``MAX_BLOCK_ELEMENTS``), a few
blocks live at once. Features are cast once to the accumulation dtype (float32, float64
for float64 inputs): a visible O(N D) copy for half-precision inputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..._validation import accumulation_dtype
from . import MAX_BLOCK_ELEMENTS

__all__ = [
    "symile_n2_backward",
    "symile_n2_forward",
    "symile_nk_backward",
    "symile_nk_forward",
]


# ----------------------------------------------------------------------------- n_squared


def _plan(n: int, m: int, d: int, device: torch.device, num_prefix: int, budget: Optional[int]):
    """(rows, T): a (rows, T, max(m, D)) block of n rows against m columns stays within the
    element budget."""
    budget = budget or MAX_BLOCK_ELEMENTS.get(device.type, 1 << 22)
    width = max(m, d, 1)
    rows = max(1, min(n, budget // width))
    tuples = max(1, min(m**num_prefix, budget // (rows * width)))
    return rows, tuples


class _Operands(NamedTuple):
    """One n_squared sweep's inputs cast to the accumulation dtype, and its block plan."""

    acc: torch.dtype
    x: Tensor  # (n, D) the anchor rows
    prefix: list[Tensor]  # K - 1 times (m, D): the others whose tuples are enumerated
    last: Tensor  # (m, D) the last other, the GEMM's columns
    num_tuples: int  # m^(K - 1)
    rows: int  # rows per block
    tuples: int  # prefix tuples per block


def _operands(anchor: Tensor, others: Tensor, budget: Optional[int]) -> _Operands:
    """anchor (n, D) and others (K, m, D) as the forward and backward sweep them."""
    n, d = anchor.shape
    m = others.shape[1]
    acc = accumulation_dtype(anchor.dtype)
    ots = [o.to(acc) for o in others.unbind(0)]
    prefix = ots[:-1]
    rows, tuples = _plan(n, m, d, anchor.device, len(prefix), budget)
    return _Operands(acc, anchor.to(acc), prefix, ots[-1], m ** len(prefix), rows, tuples)


def _prefix(prefix: Sequence[Tensor], t0: int, t1: int, n: int):
    """Prefix product P (T, D) of the tuples t0..t1-1, with their digits and factors."""
    if len(prefix) == 1:
        return prefix[0][t0:t1], None, [prefix[0][t0:t1]]
    rem = torch.arange(t0, t1, device=prefix[0].device)
    digits = [None] * len(prefix)
    for k in reversed(range(len(prefix))):
        digits[k] = rem % n
        rem = rem // n
    factors = [o[j] for o, j in zip(prefix, digits)]
    p = factors[0]
    for f in factors[1:]:
        p = p * f
    return p, digits, factors


def symile_nk_forward(
    anchor: Tensor, others: Tensor, scale: Tensor, max_block_elements: Optional[int] = None
) -> Tensor:
    """row_lse_i = LSE over all tuples (j_1..j_K) of scale * MIP(anchor_i, o^1_j1, ...).

    anchor: (n, D); others: (K, m, D), K >= 2 (m = n in one process). (n,) in the
    accumulation dtype (-inf for every row when m = 0).
    """
    n, d = anchor.shape
    m = others.shape[1]
    acc, x, prefix, last, num_tuples, rows, tuples = _operands(anchor, others, max_block_elements)
    row_lse = torch.empty(n, dtype=acc, device=anchor.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        x_blk = x[r0:r1]
        lse = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=anchor.device)
        for t0 in range(0, num_tuples, tuples):
            t1 = min(t0 + tuples, num_tuples)
            p, _, _ = _prefix(prefix, t0, t1, m)
            xp = (x_blk[:, None, :] * p[None]).reshape(-1, d)
            logits = torch.mm(xp, last.t()).mul_(scale).view(r1 - r0, -1)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        row_lse[r0:r1] = lse
    return row_lse


def symile_nk_backward(
    anchor: Tensor,
    others: Tensor,
    scale: Tensor,
    row_lse: Tensor,
    grad_rows: Tensor,
    max_block_elements: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_anchor (n, D), d_others (K, m, D), dscale 0-d), all in the accumulation dtype, of
    sum_i grad_rows_i row_lse_i (shapes as :func:`symile_nk_forward`)."""
    n, d = anchor.shape
    m = others.shape[1]
    acc, x, prefix, last, num_tuples, rows, tuples = _operands(anchor, others, max_block_elements)
    g = grad_rows.to(acc)
    lse_all = row_lse.to(acc)
    dx = torch.zeros((n, d), dtype=acc, device=anchor.device)
    dothers = torch.zeros((len(prefix) + 1, m, d), dtype=acc, device=anchor.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        x_blk = x[r0:r1]
        dx_blk = torch.zeros((r1 - r0, d), dtype=acc, device=anchor.device)
        for t0 in range(0, num_tuples, tuples):
            t1 = min(t0 + tuples, num_tuples)
            p, digits, factors = _prefix(prefix, t0, t1, m)
            xp = (x_blk[:, None, :] * p[None]).reshape(-1, d)
            c = torch.mm(xp, last.t()).mul_(scale).view(r1 - r0, -1)
            c.sub_(lse_all[r0:r1, None]).exp_().mul_(g[r0:r1, None])
            c = c.view(-1, m)  # (rows * T, m)
            gz = torch.mm(c, last).view(r1 - r0, t1 - t0, d)
            dx_blk += (gz * p[None]).sum(dim=1)
            dp = (gz * x_blk[:, None, :]).sum(dim=0)  # (T, D)
            dothers[-1].addmm_(c.t(), xp)
            if digits is None:  # one prefix factor: the rows t0..t1 of o^1
                dothers[0, t0:t1] += dp
            else:
                for k, j in enumerate(digits):
                    rest = dp
                    for q, f in enumerate(factors):
                        if q != k:
                            rest = rest * f
                    dothers[k].index_add_(0, j, rest)
        dx[r0:r1] = dx_blk
    dscale = (x * dx).sum()
    return dx.mul_(scale), dothers.mul_(scale), dscale  # accumulation dtype: see backends/


def symile_n2_forward(
    x: Tensor, y: Tensor, z: Tensor, scale: Tensor, max_block_elements: Optional[int] = None
) -> Tensor:
    """row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd (contract: backends/__init__):
    rows x (n, D) against the m^2 pairs of y, z (m, D); the "torch" backend takes n != m
    (the process-group loss's rank-local rows against the gathered columns)."""
    return symile_nk_forward(x, torch.stack((y, z)), scale, max_block_elements)


def symile_n2_backward(
    x: Tensor,
    y: Tensor,
    z: Tensor,
    scale: Tensor,
    row_lse: Tensor,
    grad_rows: Tensor,
    max_block_elements: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (n, D), dy (m, D), dz (m, D), dscale) of sum_i grad_rows_i row_lse_i."""
    stacked = torch.stack((y, z))
    dx, dothers, dscale = symile_nk_backward(
        x, stacked, scale, row_lse, grad_rows, max_block_elements
    )
    # copies: outputs of a custom op may not alias one another
    return dx, dothers[0].clone(), dothers[1].clone(), dscale
