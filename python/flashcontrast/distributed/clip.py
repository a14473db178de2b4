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

Groups (``groups=``, each rank's (n_r,) integer ids; ids are global: equal ids on
different ranks are one group): S_ij with i != j (global indices) and equal ids is set to
-inf in each (rows x columns) block before any statistic is taken, so it leaves both the
row LSE of i and the column LSE of j, and P_row_ij = P_col_ij = 0 gives it no gradient;
the positive S_ii always stays. The mask is a (rows x m) boolean made per block from the
local rows' ids and the ids of the columns in hand: "gather" all-gathers the ids (int64)
with the texts, "ring" sends them along with the travelling text shard (in the backward
too). A partial column LSE may be -inf (every local row masked for that column); the
owner's part always holds the positive, so the combined LSE is finite.

Bytes sent per rank (the notation of :mod:`flashcontrast.distributed`: W ranks, equal
shards of n rows, D features, e bytes per feature element, f per statistic; ar(x) =
2(W-1)/W x for an all-reduce; metadata (W-1) 72, with or without bias and groups):

* "gather": forward (W-1) n D e + ar(N f) + ar((N + 2) f) [+ (W-1) n 8 with groups];
  backward (W-1) n D f + ar(f) + ar(2 f).
* "ring": forward (W-1) n D e + (W-1) n f + ar(f) [+ (W-1) n 8]; backward
  (W-1) n D e + (W-1) n f [+ (W-1) n 8] + (W-1) n D f + ar(f) + ar(2 f).

(ar(f) in the backward is the upstream-gradient mean, ar(2 f) the (d scale, d bias)
all-reduce.) The ids add 8 (W-1) n bytes for "gather" (all-gathered once, padded to n_max
rows for uneven shards, kept for the backward) and 16 (W-1) n for "ring" (sent in the
forward and again in the backward), against (W-1) n D (e + f) and (W-1) n D (2e + f) for
the features.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._validation import accumulation_dtype
from . import _comm


def _block(a_blk: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    s = torch.mm(a_blk, b.t()).mul_(scale)
    return s if bias is None else s.add_(bias)


def _mask_groups(
    s: Tensor,
    gx: Optional[Tensor],
    gy: Optional[Tensor],
    start: int,
    diag_offset: Optional[int],
) -> Tensor:
    """s (rows, m): local rows ``start``.. against columns with ids ``gy`` (m,), with
    S_ij = -inf (in place) where the ids ``gx`` (n,) of row i and ``gy`` of column j agree,
    except at the positive (column ``diag_offset + start`` for the block's row 0, if the
    positives are in this tile). A (rows x m) boolean per block; no-op without groups."""
    if gx is None:
        return s
    same = gx[start : start + s.shape[0], None] == gy[None, :]
    if diag_offset is not None:
        same.diagonal(offset=diag_offset + start).fill_(False)
    return s.masked_fill_(same, float("-inf"))


def _tile_stats(
    a: Tensor,
    b: Tensor,
    scale,
    bias,
    row_lse: Tensor,
    gx: Optional[Tensor] = None,
    gy: Optional[Tensor] = None,
    diag_offset: Optional[int] = None,
) -> Tensor:
    """Fold local rows a (n, D) x columns ``b`` (m, D) into ``row_lse`` (n,) (in place,
    online); return the partial column LSEs over the local rows (m,). With groups
    (``gx`` (n,) the local ids, ``gy`` (m,) the columns'), same-group pairs are left out;
    ``diag_offset``: the column of local row 0's positive within ``b``, or None."""
    n, m = a.shape[0], b.shape[0]
    col = torch.full((m,), float("-inf"), dtype=a.dtype, device=a.device)
    rows = _comm.tile_rows(n, m, a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        s = _mask_groups(_block(a[start:stop], b, scale, bias), gx, gy, start, diag_offset)
        # logsumexp and logaddexp give -inf (not NaN) for all -inf (masked) entries
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
    gx: Optional[Tensor] = None,
    gy: Optional[Tensor] = None,
) -> Tensor:
    """Local rows a (n, D) x columns ``b`` (m, D) (col_lse (m,): theirs): adds s dS b to
    ``da`` (n, D) and (sum dS * A B^T, sum dS) to ``scalars`` (2,); returns s dS^T a
    (m, D). ``diag_offset``: the column of local row 0's positive within ``b``, or None
    if not in this tile. ``gx`` (n,), ``gy`` (m,): ids, masked as in :func:`_tile_stats`."""
    n = a.shape[0]
    db = torch.zeros_like(b)
    rows = _comm.tile_rows(n, b.shape[0], a.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a_blk = a[start:stop]
        s = _mask_groups(_block(a_blk, b, scale, bias), gx, gy, start, diag_offset)
        # masked S_ij = -inf: both softmaxes are exp(-inf - finite LSE) = 0, so dS_ij = 0
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


def _with_ids(travel: list, groups: Optional[Tensor]) -> list:
    """The ring's travelling tensors, with the shard's ids (n_q,) last when grouped."""
    return travel if groups is None else [*travel, groups]


def _diag(a: Tensor, b: Tensor, scale, bias) -> Tensor:
    d = (a * b).sum(1).mul_(scale)
    return d if bias is None else d.add_(bias)


class _ClipDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, a, b, scale, bias, groups, lay, strategy, grad_scaling):
        acc = accumulation_dtype(a.dtype)
        a_acc, b_acc = a.to(acc), b.to(acc)
        n_tot = lay.total
        row_lse = torch.full((a.shape[0],), float("-inf"), dtype=acc, device=a.device)
        diag = _diag(a_acc, b_acc, scale, bias)
        if strategy == "gather":
            b_all = _comm.all_gather_rows(b, lay)
            g_all = None if groups is None else _comm.all_gather_rows(groups, lay)
            col_part = _tile_stats(
                a_acc, b_all.to(acc), scale, bias, row_lse, groups, g_all, lay.offset
            )
            col_max = _comm.all_reduce(col_part.clone(), lay, torch.distributed.ReduceOp.MAX)
            packed = torch.cat([(col_part - col_max).exp_(), row_lse.sum()[None], diag.sum()[None]])
            _comm.all_reduce(packed, lay)
            col_lse = col_max + packed[:n_tot].log()
            loss = 0.5 * (packed[n_tot] + col_lse.sum() - 2 * packed[n_tot + 1]) / n_tot
            ctx.save_for_backward(a, b_all, scale, bias, row_lse, col_lse, groups, g_all)
        else:

            def visit(q, shard):
                gy = None if groups is None else shard[1]
                d = 0 if q == lay.rank else None
                return _tile_stats(a_acc, shard[0].to(acc), scale, bias, row_lse, groups, gy, d)

            col_lse = _comm.ring_pass(lay, _with_ids([b], groups), visit, torch.logaddexp)
            part = (row_lse.sum() + col_lse.sum() - 2 * diag.sum()).reshape(1)
            loss = 0.5 * _comm.all_reduce(part, lay)[0] / n_tot
            ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse, groups, None)
        ctx.lay, ctx.strategy, ctx.grad_scaling = lay, strategy, grad_scaling
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        a, b, scale, bias, row_lse, col_lse, groups, g_all = ctx.saved_tensors
        lay = ctx.lay
        acc = row_lse.dtype
        coef = _comm.mean_upstream(grad_loss, lay, acc) / (2 * lay.total)
        a_acc = a.to(acc)
        da = torch.zeros(a.shape, dtype=acc, device=a.device)
        scalars = torch.zeros(2, dtype=acc, device=a.device)
        if ctx.strategy == "gather":  # b is all of B here
            db_all = _tile_backward(
                a_acc, b.to(acc), scale, bias, row_lse, col_lse, coef, lay.offset, da,
                scalars, groups, g_all,
            )  # fmt: skip
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
                    groups,
                    None if groups is None else shard[2],
                )

            db = _comm.ring_pass(lay, _with_ids([b, col_lse], groups), visit, torch.add)
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
            None,
        )


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    groups: Optional[Tensor] = None,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """CLIP's symmetric InfoNCE over the global batch of a process group.

    Each rank passes its own shard (n_r, D) of image and text features (n_r may differ
    between ranks, and be 0 on some: an empty shard gets (0, D) gradients; an empty
    global batch raises on every rank), and optionally the group ids (n_r,) of its
    samples; the global batch is the concatenation in rank order, and every rank returns
    the same value: :func:`flashcontrast.clip_loss` of the global batch (with ``groups``
    the concatenated ids).

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
        groups: optional int32 or int64 (n_r,) tensor on the features' device: the ids of
            this rank's samples, for false-negative masking as in
            :func:`flashcontrast.clip_loss` (pairs i != j of the global batch with equal
            ids are left out of both the row and the column logsumexp and get no
            gradient; the positive stays). Ids are global: equal ids on different ranks
            are one group. Given on all ranks or none (checked: groups on some ranks
            only, or a bad tensor on one rank, raises on every rank). Costs 8 (W-1) n
            more bytes per rank for "gather", 16 (W-1) n for "ring" (module doc).
        group: the process group (None: the default group).
        strategy: "gather" (all-gather the texts once) or "ring" (text shards travel
            around the ring by point-to-point send/recv). See
            :mod:`flashcontrast.distributed`.
        backend: "auto" or "torch": the local tiles run as blockwise PyTorch.
        grad_scaling: "ddp" or "sum" (see above).

    ``strategy``, ``backend`` and ``grad_scaling`` must be the same on every rank
    (checked with D, dtype, bias and groups given or not in one metadata exchange: a
    mismatch, or a failed check on one rank, raises on every rank). Every rank must
    call the loss and its backward (both communicate).
    """
    lay, a, b, scale, bias = _comm.setup(
        "clip_loss",
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        group,
        strategy,
        grad_scaling,
        groups,
        backend,
    )
    ids = None if groups is None else groups.to(torch.int64)  # checked by setup
    return _ClipDist.apply(a, b, scale, bias, ids, lay, strategy, grad_scaling)
