"""SupCon over a process group: one row-only sweep plus all-reduced per-label sums.

Rank r holds samples [o_r, o_r + n_r) of the global batch: V views (V, n_r, D) and their
labels (n_r,) (or none: every sample its own class, SimCLR). The single-process loss
(:func:`flashcontrast.supcon_loss`, ``objectives/supcon.py`` for the formula) of the
global (V, N, D) batch is, with s = 1 / temperature and rows i = (view l, sample n),

    L = -(temperature / base_temperature) (1 / (V N)) sum_i [|P(i)| > 0]
        ( s z_i.(C_{y(i)} - z_i) / |P(i)| - LSE_{a != i} s z_i.z_a ),

C_c = sum of every rank's rows of label c (K, D), |P(i)| = V count(y(i)) - 1.

* The denominator LSE_{a != i}: :class:`.rows.RowsGather`, this rank's (V n_r, D) stack
  (view-major: row l n_r + i) against the all-gathered stacks of every rank, whose rows
  are then numbered V o_q + l n_q + i (the rank-major concatenation), so the anchor's own
  entry, at global row V o_r + local row, is left out exactly.
* The positives: the labels are all-gathered (int64) and compacted by torch.unique on
  every rank alike (K classes, the counts from the gathered labels); this rank's per-label
  sums of its rows are all-reduced to C (K, D). Without labels a sample's positives are
  its own views, all on this rank: C is the local per-sample sum and nothing travels.
* The loss: the global sum of the rows' bracketed terms (one scalar all-reduce) times
  -(temperature / base_temperature) / (V N), the factor outside the sum so that the
  temperature's gradient through it is the global one on every rank.

Gradients: as :func:`flashcontrast.distributed.clip_loss`: ``grad_scaling="ddp"``: this
rank's feature gradients are W x the single-process ones of its rows; "sum": 1x; the
temperature's gradient is the single-process one on every rank (the upstream gradient of
the loss is averaged over ranks). Backward: the sweep's (:class:`.rows.RowsGather`: dA
local, the columns' dB reduce-scattered to their owners) plus the positives' d z_j =
s [w_j (C_{y(j)} - 2 z_j) + W_{y(j)}], W_c = sum over every rank of w_i z_i for y(i) = c
(w the upstream of the positive term), C recomputed and all-reduced with W; nothing of
the features is kept beyond RowsGather's (the shard and the gathered stacks).

Bytes per rank (W ranks, n = n_max samples per shard, V views, D features of e bytes, f
per statistic, K classes, ar(x) = 2 (W - 1) / W x; [..] with labels only): metadata
(W - 1) 72; forward (W - 1) V n D e [+ (W - 1) n 8 + ar(K D f)] + ar(f); backward
ar(f) + (W - 1) V n D f + ar(2 f) [+ ar(2 K D f)] + ar(f).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from .._validation import accumulation_dtype, check_groups
from ..objectives.multiview import Views, _stack
from ..objectives.supcon import PAIR, _label_sums
from . import _comm
from .rows import GlobalSum, RowsGather, scaled_layout

__all__ = ["supcon_loss"]


class _LabelPositives(torch.autograd.Function):
    """(R,) s z_i.(C_{y(i)} - z_i) in the accumulation dtype for this rank's rows z (R, D)
    with compacted labels (R,) in [0, classes): C (classes, D) the per-label sums of the
    rows of EVERY rank (all-reduced) when ``shared`` (labels given), else of this rank's
    rows (labels None: a sample's views are all local)."""

    @staticmethod
    @autocast_off
    def forward(ctx, z, scale, labels, classes, shared, lay, grad_scaling):
        acc = accumulation_dtype(z.dtype)
        c = _label_sums(z, labels, classes, acc)
        if shared:
            _comm.all_reduce(c, lay)
        za = z.to(acc)
        dots = (za * (c[labels] - za)).sum(dim=1)  # (R,), kept for d scale
        ctx.save_for_backward(z, scale, labels, dots)
        ctx.classes, ctx.shared, ctx.lay, ctx.grad_scaling = classes, shared, lay, grad_scaling
        return scale * dots

    @_comm.exchange_backward
    def backward(ctx, grad):
        z, scale, labels, dots = ctx.saved_tensors
        k, lay = ctx.classes, ctx.lay
        acc = accumulation_dtype(z.dtype)
        za = z.to(acc)
        w = grad.to(acc)[:, None]
        # C and W_c = sum_{y(i) = c} w_i z_i, stacked (2 K, D): one all-reduce for both
        sums = torch.cat([_label_sums(za, labels, k, acc), _label_sums(w * za, labels, k, acc)])
        if ctx.shared:
            _comm.all_reduce(sums, lay)
        c, wz = sums[:k], sums[k:]
        dz = scale * (w * (c[labels] - 2 * za) + wz[labels])
        dscale = (grad.to(acc) * dots).sum().reshape(1)
        dz, dscale = _comm.round_grads(dz, z, dscale, scale, lay, ctx.grad_scaling)
        return dz, dscale, None, None, None, None, None


def _row_labels(labels: Optional[Tensor], lay: _comm.Layout, v: int, device) -> tuple:
    """(labels of this rank's V n_r rows (view-major), |P(i)| of each row, K, shared):
    the global labels compacted alike on every rank, or (labels None) the local sample
    index, every sample its own class."""
    n = lay.sizes[lay.rank]
    if labels is None:
        local = torch.arange(n, device=device)
        return local.repeat(v), torch.full((v * n,), v - 1, device=device), n, False
    every = _comm.all_gather_rows(labels.to(torch.int64), lay)  # (N,) in rank order
    values, ids = torch.unique(every, return_inverse=True)  # the same on every rank
    k = values.numel()
    rows = ids[lay.offset : lay.offset + n].repeat(v)
    count = v * torch.bincount(ids, minlength=k)[rows] - 1
    return rows, count, k, True


def supcon_loss(
    features: Views,
    labels: Optional[Tensor] = None,
    temperature: object = 0.07,
    base_temperature: float = 0.07,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """Supervised contrastive loss (:func:`flashcontrast.supcon_loss`, reduction "mean")
    of the global batch of a process group.

    Each rank passes its own samples: ``features`` (V, n_r, D), (n_r, D) (one view) or V
    tensors (n_r, D) (n_r may differ between ranks and be 0; V, D, dtype, labels given or
    not, ``strategy``, ``backend`` and ``grad_scaling`` may not: checked on every rank),
    and their ``labels`` (n_r,) int32 / int64 (global ids: equal labels on different ranks
    are one class), or None on every rank (each sample its own class). Every rank returns
    the single-process loss of the concatenation of the shards in rank order. Gradients
    (module doc): features W x (``grad_scaling="ddp"``) or 1x ("sum") the single-process
    ones of this rank's rows, ``temperature`` (a one-element tensor) the single-process
    one. ``strategy`` "gather" only; ``backend`` chooses the sweep's pair engine.
    """
    group, strategy, backend, grad_scaling = _comm.options("supcon_loss", options)

    def check():
        x = features
        if isinstance(x, Tensor) and _comm.check_dense("views", x).dim() == 2:
            x = x.unsqueeze(0)  # one view
        u = _stack(x, min_views=1, dense=_comm.check_dense, empty_ok=True)
        v, n, d = u.shape
        if isinstance(labels, Tensor):
            _comm.check_dense("labels", labels)
        check_groups(labels, n, u.device, "the features")  # the single-process rules
        tau = _comm.scalar("temperature", temperature, u)
        chosen = _comm.engine_backend("supcon", backend, u)
        return (u, tau, chosen), n, d, u.dtype, u.device, [v, labels is not None]

    fields = ["number of views V", "labels given"]
    lay, (u, tau, chosen) = _comm.setup_checked(
        "supcon_loss", group, strategy, grad_scaling, backend, fields, check, ring=False,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    v, n, d = u.shape
    flat = u.reshape(v * n, d)  # row l n_r + i: a view wherever u's strides allow one
    scale = 1.0 / tau
    rows, count, k, shared = _row_labels(labels, lay, v, u.device)
    args = (PAIR, lay, scaled_layout(lay, v), v * lay.offset, chosen, grad_scaling)
    log_den, _ = RowsGather.apply(flat, flat, scale, None, *args)  # LSE_{a != i}
    pos = _LabelPositives.apply(flat, scale, rows, k, shared, lay, grad_scaling)
    has = count > 0
    mean_log_prob = torch.where(has, pos / count.clamp_min(1) - log_den, torch.zeros_like(pos))
    total = GlobalSum.apply(mean_log_prob.sum(), lay)
    return -(tau / base_temperature) * total / (v * lay.total)
