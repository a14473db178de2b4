"""CLIP InfoNCE over a process group: the "gather" and "ring" strategies.

Rank r holds rows [o_r, o_r + n_r) of A (images) and B (texts); N = sum n_q. With
S = s A B^T + b over the global batch,
L = 1/2 [ (1/N) sum_i (LSE_j S_ij - S_ii) + (1/N) sum_j (LSE_i S_ij - S_jj) ].
Every rank computes only its rows of S (its images against all N texts), a block of rows
at a time (``block_rows``: the same (rows x columns) budget as the blockwise backend):

* row LSEs of its rows are complete locally;
* column LSEs are partial (over its rows) and are combined across ranks: by an all-reduce
  (max, then sum of exponentials) for "gather", or by an accumulator that travels around
  the ring behind the text shard for "ring";
* backward: dS_ij = g/(2N) (P_row_ij + P_col_ij - 2 [i == j]); dA_r = s dS B is local;
  dB_j = s sum_i dS_ij A_i sums contributions of every rank, routed to the owner by a
  reduce-scatter ("gather") or by an accumulator travelling with the shard ("ring").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import accumulation_dtype
from ..backends.blockwise import block_rows
from . import _comm


def _block(a_blk: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    s = torch.mm(a_blk, b.t()).mul_(scale)
    return s if bias is None else s.add_(bias)


def _tile_stats(a: Tensor, b: Tensor, scale, bias, row_lse: Tensor) -> Tensor:
    """Fold local rows x columns ``b`` into ``row_lse`` (in place, online); return the
    partial column LSEs over the local rows (m,)."""
    n, m = a.shape[0], b.shape[0]
    col = torch.full((m,), float("-inf"), dtype=a.dtype, device=a.device)
    rows = block_rows(m, a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        s = _block(a[start:stop], b, scale, bias)
        row_lse[start:stop] = torch.logaddexp(row_lse[start:stop], torch.logsumexp(s, 1))
        col = torch.logaddexp(col, torch.logsumexp(s, 0))
    return col


def _tile_backward(
    a: Tensor,
    b: Tensor,
    scale,
    bias,
    row_lse: Tensor,
    col_lse: Tensor,
    coef: Tensor,
    diag_offset: Optional[int],
    da: Tensor,
    scalars: Tensor,
) -> Tensor:
    """Local rows x columns ``b`` (col_lse: theirs): adds s dS b to ``da`` and
    (sum dS * A B^T, sum dS) to ``scalars``; returns s dS^T a (m, D). ``diag_offset``:
    the column of local row 0's positive within ``b``, or None if not in this tile."""
    n = a.shape[0]
    db = torch.zeros_like(b)
    rows = block_rows(b.shape[0], a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a_blk = a[start:stop]
        s = _block(a_blk, b, scale, bias)
        ds = (s - row_lse[start:stop, None]).exp_()
        ds.add_(s.sub_(col_lse).exp_()).mul_(coef)
        if diag_offset is not None:
            ds.diagonal(offset=diag_offset + start).sub_(2 * coef)
        ds_b = torch.mm(ds, b)
        scalars[0] += (a_blk * ds_b).sum()
        scalars[1] += ds.sum()
        da[start:stop] += ds_b.mul_(scale)
        db.addmm_(ds.t(), a_blk)
    return db.mul_(scale)


def _diag(a: Tensor, b: Tensor, scale, bias) -> Tensor:
    d = (a * b).sum(1).mul_(scale)
    return d if bias is None else d.add_(bias)


class _ClipDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, lay, strategy, grad_scaling):
        acc = accumulation_dtype(a.dtype)
        a_acc, b_acc = a.to(acc), b.to(acc)
        n_tot = lay.total
        row_lse = torch.full((a.shape[0],), float("-inf"), dtype=acc, device=a.device)
        diag = _diag(a_acc, b_acc, scale, bias)
        if strategy == "gather":
            b_all = _comm.all_gather_rows(b, lay)
            col_part = _tile_stats(a_acc, b_all.to(acc), scale, bias, row_lse)
            col_max = _comm.all_reduce(col_part.clone(), lay, torch.distributed.ReduceOp.MAX)
            packed = torch.cat([(col_part - col_max).exp_(), row_lse.sum()[None], diag.sum()[None]])
            _comm.all_reduce(packed, lay)
            col_lse = col_max + packed[:n_tot].log()
            loss = 0.5 * (packed[n_tot] + col_lse.sum() - 2 * packed[n_tot + 1]) / n_tot
            ctx.save_for_backward(a, b_all, scale, bias, row_lse, col_lse)
        else:

            def visit(q, shard):
                return _tile_stats(a_acc, shard[0].to(acc), scale, bias, row_lse)

            col_lse = _comm.ring_pass(lay, [b], visit, torch.logaddexp)
            part = (row_lse.sum() + col_lse.sum() - 2 * diag.sum()).reshape(1)
            loss = 0.5 * _comm.all_reduce(part, lay)[0] / n_tot
            ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
        ctx.lay, ctx.strategy, ctx.grad_scaling = lay, strategy, grad_scaling
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
        lay = ctx.lay
        acc = row_lse.dtype
        # The ranks' upstream gradients are averaged (identical in normal use), so that
        # every rank differentiates the same function.
        g = _comm.all_reduce(grad_loss.detach().to(acc).reshape(1).clone(), lay) / lay.world
        coef = g[0] / (2 * lay.total)
        a_acc = a.to(acc)
        da = torch.zeros(a.shape, dtype=acc, device=a.device)
        scalars = torch.zeros(2, dtype=acc, device=a.device)
        if ctx.strategy == "gather":  # b is all of B here
            db_all = _tile_backward(
                a_acc, b.to(acc), scale, bias, row_lse, col_lse, coef, lay.offset, da, scalars
            )
            db = _comm.reduce_scatter_rows(db_all, lay)
        else:

            def visit(q, shard):
                return _tile_backward(
                    a_acc,
                    shard[0].to(acc),
                    scale,
                    bias,
                    row_lse,
                    shard[1],
                    coef,
                    0 if q == lay.rank else None,
                    da,
                    scalars,
                )

            db = _comm.ring_pass(lay, [b, col_lse], visit, torch.add)
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


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """CLIP's symmetric InfoNCE over the global batch of a process group.

    Each rank passes its own shard (n_r, D) of image and text features (n_r may differ
    between ranks); the global batch is the concatenation in rank order, and every rank
    returns the same value: :func:`flashcontrast.clip_loss` of the global batch.

    Gradients (``grad_scaling="ddp"``, the default): each rank's feature gradients are W
    times the single-process gradients of its rows, and the gradients of ``logit_scale``
    and ``logit_bias`` equal the single-process ones on every rank, so that after
    DistributedDataParallel averages over the W ranks the parameter gradients equal those
    of single-process training on the global batch. ``grad_scaling="sum"`` gives the
    feature gradients 1x (for users who sum gradients across ranks instead).

    Args:
        image_features, text_features: this rank's (n_r, D) shard; same D, dtype on all
            ranks (checked: a mismatch raises on every rank).
        logit_scale: the multiplier s, float or one-element tensor (same on all ranks).
        logit_bias: optional additive bias, float or one-element tensor (given on all
            ranks or none).
        group: the process group (None: the default group).
        strategy: "gather" (all-gather the texts once) or "ring" (text shards travel
            around the ring by point-to-point send/recv). See
            :mod:`flashcontrast.distributed`.
        backend: "auto" or "torch": the local tiles run as blockwise PyTorch.
        grad_scaling: "ddp" or "sum" (see above).

    Every rank must call the loss and its backward (both communicate).
    """
    _comm.check_backend("clip_loss", backend)
    lay, a, b, scale, bias = _comm.setup(
        "clip_loss",
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        group,
        strategy,
        grad_scaling,
    )
    return _ClipDist.apply(a, b, scale, bias, lay, strategy, grad_scaling)
