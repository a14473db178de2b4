"""Row-only objectives over a process group: one-directional InfoNCE and uniformity.

Both are functions of the row logsumexps of one "rows" sweep of the pair engine
(``backends/pair.py``): rank r sweeps its rows (n_r, D') against the columns of every rank,
all-gathered once ("gather" only), at global row offset o_r, so its rows' statistics are
complete locally and no column statistic travels. The loss is then a global sum (InfoNCE)
or a global logsumexp (uniformity) of per-row values, one all-reduce of a scalar (two for
the logsumexp: max, then the rescaled sums).

Backward: the engine's backward from the local rows' statistics with the upstream
coefficients; dA is local, the columns' dB (N, D') sums every rank's part by a
reduce-scatter to the owners, d scale and d bias by an all-reduce. The upstream gradient
is averaged over ranks (every rank differentiates the same function). Feature gradients
are W x the single-process ones with ``grad_scaling="ddp"`` (1x with "sum"), the scalars'
the single-process ones, as for :func:`flashcontrast.distributed.clip_loss`.

Bytes per rank (W ranks, equal shards of n rows, D' features of e bytes, f per
statistic): forward (W - 1) n D' e + ar(f) (InfoNCE; uniformity ar(2 f)); backward
ar(f) + (W - 1) n D' f + ar(2 f).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._ops import backend_module
from .._validation import accumulation_dtype
from ..backends.pair import Coefs, Pair, Stats, lse
from ..objectives import uniformity as single_uniformity
from . import _comm

__all__ = ["infonce_loss", "uniform_loss"]

_INFONCE = Pair("rows")  # the positive of global row i at global column i
_UNIFORM = Pair("rows", positives=False, exclude_self=True)


def scaled_layout(lay: _comm.Layout, k: int) -> _comm.Layout:
    """The layout of a tensor with ``k`` rows per row of ``lay``'s shards (K stacked
    batches, or V views): sizes k n_q, in rank order."""
    return dataclasses.replace(lay, sizes=[k * s for s in lay.sizes])


class RowsGather(torch.autograd.Function):
    """(row LSE (n,), positive LSE (n,) or (0,)) of this rank's rows ``a`` (n, D') against
    every rank's columns ``b`` (all-gathered (M, D'), layout ``cols``), at global row
    offset ``row_offset`` (the global column index of row 0's positive)."""

    @staticmethod
    @autocast_off
    def forward(ctx, a, b, scale, bias, pair, lay, cols_lay, row_offset, backend, grad_scaling):
        cols = _comm.all_gather_rows(b, cols_lay)
        engine = backend_module(backend, "pair")
        st = engine.pair_forward(a, cols, scale, bias, pair, row_offset, 0, None, None, None)
        rows = lse(st.row_max, st.row_sum)
        pos = lse(st.pos_max, st.pos_sum) if pair.positives else rows.new_empty(0)
        saved = (st.row_max, st.row_sum) + ((st.pos_max, st.pos_sum) if pair.positives else ())
        ctx.save_for_backward(a, cols, scale, bias, *saved)
        ctx.pair, ctx.lay, ctx.cols_lay, ctx.row_offset = pair, lay, cols_lay, row_offset
        ctx.backend, ctx.grad_scaling = backend, grad_scaling
        ctx.b_dtype, ctx.has_bias = b.dtype, bias is not None
        return rows, pos

    @_comm.exchange_backward
    def backward(ctx, g_rows, g_pos):
        a, cols, scale, bias, *pairs = ctx.saved_tensors
        lay, pair = ctx.lay, ctx.pair
        acc = accumulation_dtype(a.dtype)
        stats = Stats(*pairs)
        coefs = Coefs(
            rows=g_rows.to(acc),
            pos_rows=-g_pos.to(acc) if pair.positives else None,  # L = .. - gpr LSE+
        )
        g = backend_module(ctx.backend, "pair").pair_backward(
            a, cols, scale, bias, pair, stats, coefs, ctx.row_offset, 0, None, None, None, acc
        )
        db = _comm.reduce_scatter_rows(g.db, ctx.cols_lay)
        dscalars = _comm.all_reduce(torch.stack([g.dscale, g.dbias]).to(acc), lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        da, db = (g.da * factor).to(a.dtype), (db * factor).to(ctx.b_dtype)
        dbias = dscalars[1] if ctx.has_bias else None
        return da, db, dscalars[0], dbias, *([None] * 6)


class GlobalSum(torch.autograd.Function):
    """The sum over ranks of a 0-d ``part``; its gradient is the ranks' mean upstream."""

    @staticmethod
    def forward(ctx, part, lay):
        ctx.lay = lay
        return _comm.all_reduce(part.detach().clone().reshape(1), lay)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return _comm.mean_upstream(g, ctx.lay, g.dtype), None


class _GlobalLSE(torch.autograd.Function):
    """LSE over every rank's ``values`` (n_r,): 0-d, the same on every rank."""

    @staticmethod
    def forward(ctx, values, lay):
        empty = values.new_empty(0)
        mx = values.max().reshape(1) if values.numel() else values.new_full((1,), -math.inf)
        gmax, gsum, _ = _comm.pair_all_reduce(mx, (values - mx).exp().sum().reshape(1), empty, lay)
        total = lse(gmax, gsum)[0]
        ctx.save_for_backward(values, total)
        ctx.lay = lay
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        values, total = ctx.saved_tensors
        return _comm.mean_upstream(g, ctx.lay, values.dtype) * (values - total).exp(), None


def infonce_loss(
    query: Tensor,
    keys: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """One-directional InfoNCE (:func:`flashcontrast.infonce_loss`, offset 0) over the
    global batch of a process group: each rank passes its queries and their keys, (n_r, D)
    each (n_r may differ, and be 0); query i's positive is key i of the global batch (the
    concatenation in rank order), every key of every rank is in its denominator. Every
    rank returns the single-process mean loss. Gradients, ``grad_scaling`` and the setup
    checks as :func:`flashcontrast.distributed.clip_loss`; ``strategy`` "gather" only.
    """
    lay, q, k, scale, bias, chosen = _comm.setup_pair(
        "infonce_loss", query, keys, logit_scale, logit_bias, group, strategy, grad_scaling,
        backend=backend, objective="infonce", ring=False,
    )  # fmt: skip
    args = (_INFONCE, lay, lay, lay.offset, chosen, grad_scaling)
    rows, pos = RowsGather.apply(q, k, scale, bias, *args)
    return GlobalSum.apply((rows - pos).sum(), lay) / lay.total


def uniform_loss(
    x: Tensor,
    t: float = 2.0,
    *,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """Wang & Isola's uniformity (:func:`flashcontrast.uniform_loss`) of the global batch
    of a process group, N >= 2: log mean_{i < j} exp(-t ||x_i - x_j||^2) over the
    concatenation of every rank's (n_r, D) shard, the same value on every rank.
    Gradients and checks as :func:`flashcontrast.distributed.clip_loss` (``strategy``
    "gather" only; x gets W x its single-process gradient with "ddp").
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"t must be a positive number, got {t!r}")

    def check():
        xs = _comm.check_shard("x", x)
        chosen = _comm.engine_backend("uniformity", backend, xs)
        return (xs, chosen), *xs.shape, xs.dtype, xs.device, []

    lay, (xs, chosen) = _comm.setup_checked(
        "uniform_loss", group, strategy, grad_scaling, backend, [], check, ring=False,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    if lay.total < 2:
        raise ValueError(f"uniform_loss needs N >= 2 samples (pairs i < j), got N = {lay.total}")
    a, b, unit = single_uniformity.augmented(xs, t)
    args = (_UNIFORM, lay, lay, lay.offset, chosen, grad_scaling)
    rows, _ = RowsGather.apply(a, b, unit, None, *args)
    return _GlobalLSE.apply(rows, lay) - math.log(lay.total * (lay.total - 1))
