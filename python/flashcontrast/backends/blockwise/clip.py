"""CLIP InfoNCE on the "torch" backend.

S = s * A @ B^T + b is visited one block of rows at a time, never whole:

forward   each row block gives its rows' logsumexps and diagonal directly, and folds into
          running column statistics (max m_j and sum_j of e^(S_ij - m_j)), the online
          logsumexp of flash attention applied along the other axis.
backward  recompute the block, dS = g/(2N) (P_row + P_col - 2I) from the saved LSEs, then
          dA_blk = s dS B, dB += s dS^T A_blk, ds += <A_blk, dS B>, db += sum dS.

Groups (optional (N,) integer ids): entries S_ij with i != j and groups_i == groups_j are
set to -inf in each block before any statistic or gradient is taken from it, from a
(rows x N) boolean made per block from the (N,) ids; the diagonal always stays.

Block memory: two (rows x N) buffers in the accumulation dtype. Features are cast to the
accumulation dtype (float32, or float64 for float64 inputs) once per call: a visible
O(N D) copy for half-precision inputs, so that logits are never rounded to bf16/fp16.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import accumulation_dtype
from . import block_rows


def _logits_block(
    a_blk: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """(rows, N) block of S = scale * a_blk @ b^T + bias, in b's (accumulation) dtype."""
    s = torch.mm(a_blk, b.t()).mul_(scale)
    return s if bias is None else s.add_(bias)


def _mask_groups(s: torch.Tensor, groups: Optional[torch.Tensor], start: int) -> torch.Tensor:
    """s (rows starting at ``start``, N) with S_ij = -inf where i != j share a group."""
    if groups is None:
        return s
    same = groups[start : start + s.shape[0], None] == groups[None, :]
    same.diagonal(offset=start).fill_(False)
    return s.masked_fill_(same, float("-inf"))


def clip_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    groups: Optional[torch.Tensor] = None,
    max_block_elements: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row LSEs (N,), column LSEs (N,) and diagonal (N,) of S, block of rows by block
    (with ``groups``: of S with the same-group off-diagonal entries at -inf)."""
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    row_lse = torch.empty(n, dtype=acc, device=a.device)
    diag = torch.empty(n, dtype=acc, device=a.device)
    col_max = torch.full((n,), float("-inf"), dtype=acc, device=a.device)
    col_sum = torch.zeros(n, dtype=acc, device=a.device)
    rows = block_rows(n, a.device, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        s = _mask_groups(_logits_block(a_acc[start:stop], b_acc, scale, bias), groups, start)
        row_lse[start:stop] = torch.logsumexp(s, dim=1)
        diag[start:stop] = s.diagonal(offset=start)
        new_max = torch.maximum(col_max, s.amax(dim=0))
        shift = new_max
        if groups is not None:  # a column may have no entry yet: shift by 0, not -inf
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        col_sum.mul_(torch.exp(col_max - shift)).add_(s.sub_(shift).exp_().sum(dim=0))
        col_max = new_max
    return row_lse, col_max + col_sum.log(), diag


def clip_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    grad: torch.Tensor,
    groups: Optional[torch.Tensor] = None,
    max_block_elements: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dA, dB (input dtype) and d(scale), d(bias) (0-d) by recomputing each block (with
    ``groups``, masked as in the forward: excluded entries get P = 0)."""
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    coef = grad.to(acc) / (2 * n)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.zeros(b.shape, dtype=acc, device=b.device)
    dscale = torch.zeros((), dtype=acc, device=a.device)
    dbias = torch.zeros((), dtype=acc, device=a.device)
    rows = block_rows(n, a.device, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a_blk = a_acc[start:stop]
        s = _mask_groups(_logits_block(a_blk, b_acc, scale, bias), groups, start)
        ds = (s - row_lse[start:stop, None]).exp_()
        ds.add_(s.sub_(col_lse).exp_()).mul_(coef)
        ds.diagonal(offset=start).sub_(2 * coef)
        ds_b = torch.mm(ds, b_acc)
        dscale += (a_blk * ds_b).sum()
        dbias += ds.sum()
        da[start:stop] = ds_b.mul_(scale)
        db.addmm_(ds.t(), a_blk)
    return da, db.mul_(scale).to(b.dtype), dscale, dbias
