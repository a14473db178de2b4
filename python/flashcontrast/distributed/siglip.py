"""SigLIP over a process group: the "gather" and "ring" strategies.

Rank r holds rows [o_r, o_r + n_r) of A and B; N = sum n_q. With S = s A B^T + b over the
global batch and z_ij = +1 on the diagonal, -1 elsewhere,
L = -(1/N) sum_ij log sigmoid(z_ij S_ij). Pairs are independent, so there are no column
statistics: each rank sums its rows against every column (a block of rows at a time,
the blockwise backend's budget) and one scalar all-reduce gives the total. Backward:
dS_ij = g/N (sigmoid(S_ij) - [i == j]); dA_r = s dS B is local; dB_j = s sum_i dS_ij A_i
sums over ranks, routed to the owner by a reduce-scatter ("gather") or by an accumulator
travelling behind the shard ("ring").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._validation import accumulation_dtype
from . import _comm
from .clip import _block


def _tile_total(a: Tensor, b: Tensor, scale, bias, diag_offset: Optional[int]) -> Tensor:
    """sum_ij softplus(-z_ij S_ij) over local rows x columns ``b``."""
    n = a.shape[0]
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    rows = _comm.tile_rows(n, b.shape[0], a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        zs = _block(a[start:stop], b, scale, bias).neg_()
        if diag_offset is not None:
            zs.diagonal(offset=diag_offset + start).neg_()
        total -= F.logsigmoid(zs).sum()
    return total


def _tile_backward(
    a: Tensor,
    b: Tensor,
    scale,
    bias,
    coef: Tensor,
    diag_offset: Optional[int],
    da: Tensor,
    scalars: Tensor,
) -> Tensor:
    """As clip._tile_backward, for dS = coef (sigmoid(S) - I)."""
    n = a.shape[0]
    db = torch.zeros_like(b)
    rows = _comm.tile_rows(n, b.shape[0], a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a_blk = a[start:stop]
        ds = _block(a_blk, b, scale, bias)
        if diag_offset is not None:
            diag = ds.diagonal(offset=diag_offset + start)
            s_ii = diag.clone()
            ds.sigmoid_()
            diag.copy_(torch.sigmoid(s_ii.neg_()).neg_())  # sigmoid(S_ii) - 1, exactly
        else:
            ds.sigmoid_()
        ds.mul_(coef)
        ds_b = torch.mm(ds, b)
        scalars[0] += (a_blk * ds_b).sum()
        scalars[1] += ds.sum()
        da[start:stop] += ds_b.mul_(scale)
        db.addmm_(ds.t(), a_blk)
    return db.mul_(scale)


class _SigLipDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, a, b, scale, bias, lay, strategy, grad_scaling):
        acc = accumulation_dtype(a.dtype)
        a_acc = a.to(acc)
        if strategy == "gather":
            b_all = _comm.all_gather_rows(b, lay)
            total = _tile_total(a_acc, b_all.to(acc), scale, bias, lay.offset)
            ctx.save_for_backward(a, b_all, scale, bias)
        else:
            parts = []

            def visit(q, shard):
                d = 0 if q == lay.rank else None
                parts.append(_tile_total(a_acc, shard[0].to(acc), scale, bias, d))

            _comm.ring_pass(lay, [b], visit, torch.add)
            total = torch.stack(parts).sum()
            ctx.save_for_backward(a, b, scale, bias)
        loss = _comm.all_reduce(total.reshape(1), lay)[0] / lay.total
        ctx.lay, ctx.strategy, ctx.grad_scaling = lay, strategy, grad_scaling
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        a, b, scale, bias = ctx.saved_tensors
        lay = ctx.lay
        acc = accumulation_dtype(a.dtype)
        coef = _comm.mean_upstream(grad_loss, lay, acc) / lay.total
        a_acc = a.to(acc)
        da = torch.zeros(a.shape, dtype=acc, device=a.device)
        scalars = torch.zeros(2, dtype=acc, device=a.device)
        if ctx.strategy == "gather":  # b is all of B here
            db_all = _tile_backward(a_acc, b.to(acc), scale, bias, coef, lay.offset, da, scalars)
            db = _comm.reduce_scatter_rows(db_all, lay)
        else:

            def visit(q, shard):
                d = 0 if q == lay.rank else None
                return _tile_backward(a_acc, shard[0].to(acc), scale, bias, coef, d, da, scalars)

            db = _comm.ring_pass(lay, [b], visit, torch.add)
        _comm.all_reduce(scalars, lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        return (
            (da * factor).to(a.dtype),
            (db * factor).to(a.dtype),
            scalars[0],
            scalars[1] if ctx.has_bias else None,
            None,
            None,
            None,
        )


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias,
    *,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch of a process group.

    Each rank passes its own (n_r, D) shard (n_r may differ between ranks and be 0;
    checked on every rank as for :func:`flashcontrast.distributed.clip_loss`); every rank
    returns :func:`flashcontrast.siglip_loss` of the global batch (the concatenation in
    rank order): the sum over all N^2 pairs divided by the global N. Gradients as
    :func:`flashcontrast.distributed.clip_loss` (``grad_scaling="ddp"``: features W x,
    scale and bias 1x the single-process gradients; ``"sum"``: features 1x).

    Args:
        image_features, text_features: this rank's (n_r, D) shard.
        logit_scale: the multiplier s; logit_bias: the bias b (None: 0; given on all
            ranks or none).
        group: the process group (None: the default group).
        strategy: "gather" or "ring" (see :mod:`flashcontrast.distributed`).
        backend: "auto" or "torch": the local tiles run as blockwise PyTorch.
        grad_scaling: "ddp" or "sum".
    """
    lay, a, b, scale, bias = _comm.setup(
        "siglip_loss",
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        group,
        strategy,
        grad_scaling,
        backend=backend,
    )
    return _SigLipDist.apply(a, b, scale, bias, lay, strategy, grad_scaling)
