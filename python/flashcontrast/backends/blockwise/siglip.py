"""SigLIP (objectives.md section 2) on the "torch" backend.

Contract (for every backend module ``blockwise.siglip`` / ``triton.siglip``)::

    siglip_forward(a, b, scale, bias) -> total
        a, b:   (N, D) features, same dtype, same device, any strides.
        scale:  0-d tensor (the multiplier s, already exp'd); bias: 0-d tensor or None (0).
        S_ij = scale * <a_i, b_j> + bias, z_ij = +1 if i == j else -1.
        total:  0-d, sum_ij -log sigmoid(z_ij S_ij) = sum_ij softplus(-z_ij S_ij), in the
                accumulation dtype (float32; float64 for float64 inputs on "torch"),
                computed stably (no overflow) for any scale. The loss is total / N.

    siglip_backward(a, b, scale, bias, grad) -> (da, db, dscale, dbias)
        grad:   0-d, the upstream gradient of L = total / N.
        dS_ij = -(grad / N) z_ij sigmoid(-z_ij S_ij) = (grad / N) (sigmoid(S_ij) - [i == j])
        da = scale * dS @ b   (N, D) in a.dtype;  db = scale * dS^T @ a   (N, D) in b.dtype
        dscale = sum_ij dS_ij <a_i, b_j>;  dbias = sum_ij dS_ij   (0-d, accumulation dtype)

S = s * A @ B^T + b is visited one block of rows at a time, never whole:

forward   each row block adds sum -logsigmoid(z S) over its (rows x N) block to the total.
backward  recompute the block, dS = g/N (sigmoid(S) - I) (the diagonal as -sigmoid(-S_ii),
          exact where sigmoid(S_ii) rounds to 1), then dA_blk = s dS B, dB += s dS^T A_blk,
          ds += <A_blk, dS B>, db += sum dS.

Block memory: a (rows x N) block in the accumulation dtype plus the temporaries of one
elementwise op on it (logsigmoid keeps a second block-sized buffer on the CPU). Features
are cast to the accumulation dtype once per call: a visible O(N D) copy for half-precision
inputs, so that logits are never rounded to bf16/fp16.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._validation import accumulation_dtype
from . import block_rows
from .clip import _logits_block


def siglip_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    max_block_elements: Optional[int] = None,
) -> torch.Tensor:
    """total = sum_ij -log sigmoid(z_ij S_ij), block of rows by block."""
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    scale, bias = scale.to(acc), (None if bias is None else bias.to(acc))
    total = torch.zeros((), dtype=acc, device=a.device)
    rows = block_rows(n, a.device, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        zs = _logits_block(a_acc[start:stop], b_acc, scale, bias).neg_()
        zs.diagonal(offset=start).neg_()  # z S: +S on the diagonal, -S elsewhere
        total -= F.logsigmoid(zs).sum()
    return total


def siglip_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    grad: torch.Tensor,
    max_block_elements: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dA, dB (input dtype) and d(scale), d(bias) (0-d) by recomputing each block."""
    n = a.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    scale, bias = scale.to(acc), (None if bias is None else bias.to(acc))
    coef = grad.to(acc) / n
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.zeros(b.shape, dtype=acc, device=b.device)
    dscale = torch.zeros((), dtype=acc, device=a.device)
    dbias = torch.zeros((), dtype=acc, device=a.device)
    rows = block_rows(n, a.device, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a_blk = a_acc[start:stop]
        ds = _logits_block(a_blk, b_acc, scale, bias)
        diag = ds.diagonal(offset=start)
        s_ii = diag.clone()
        ds.sigmoid_()
        diag.copy_(torch.sigmoid(s_ii.neg_()).neg_())  # sigmoid(S_ii) - 1, without rounding
        ds.mul_(coef)
        ds_b = torch.mm(ds, b_acc)
        dscale += (a_blk * ds_b).sum()
        dbias += ds.sum()
        da[start:stop] = ds_b.mul_(scale)
        db.addmm_(ds.t(), a_blk)
    return da, db.mul_(scale).to(b.dtype), dscale, dbias
