"""MV-InfoNCE and MV-DHEL over a process group: the "gather" and "ring" strategies, on the
pair engine.

Rank r holds samples [o_r, o_r + n_r) of every view: a (V, n_r, D) shard; N = sum n_q.
The negatives of row (l, i) are a row logsumexp over columns (m, j) of the global
self-similarity s <u_il, u_jm> (MV-InfoNCE: every (m, j) != (l, i); MV-DHEL: m = l,
j != i; with ``groups``, different samples of one group are dropped). Only ROW statistics
are needed, so each rank sweeps its own rows against every column with the pair engine
(``backends/pair.py``) of the backend ``backend=`` resolves to (``_comm.engine_backend``,
among the setup checks), one :class:`flashcontrast.distributed.clip.LocalRows` per view
(the per-block engine calls CLIP and SigLIP use), "rows" epilogue, row pairs merged over
the column blocks with ``merge_lse``. The loss is one scalar all-reduce:
L = (1/N) sum_r (sum of rank r's per-sample terms).

Global indices, as the single-process losses sweep them:

* MV-InfoNCE (``Pair("rows", exclude_self=True, period=N)``, N the GLOBAL batch): the
  (V N, D) stack of every view, row / column l N + j = sample j of view l, so
  sample(k) = k mod N, the excluded entry is a row with itself and the positives of row
  (l, i) are the other views of sample i. Rank r's rows of view l sit at
  l N + o_r ..; the columns of view m of rank q's shard at m N + o_q ... "gather" sweeps
  each view's rows against the whole gathered stack (V calls), "ring" each view's rows
  against each view of the visiting shard (V^2 calls per shard; the positives, all in
  the own shard, come with its visit). Per sample the loss is
  LSE_l row_lse_li - LSE_l pos_lse_li (value clamped at 0 as in one process), O(N) torch.
* MV-DHEL (``Pair("rows", positives=False, exclude_self=True)``): view l against itself,
  rows and columns indexed by sample (o_r + i, o_q + j); the positives
  (LSE_{l < l'} s u_il.u_il', all local) are ``flashcontrast::mv_positive_lse`` on the
  rank's shard, as in one process.

Groups: the engine's masked set (equal ids, different samples); the ids of the columns
travel with them (all-gathered, or along the ring), repeated V times for the stack.

Backward: the coefficients of the rows' statistics are local (MV-InfoNCE:
gr_li = (g/N) softmax_l(row_lse)_li, gpr_li = (g/N) softmax_l(pos_lse)_li; MV-DHEL:
gr = g/N and the positives' op backward), the engine's backward per block gives dA (this
rank's rows, summed in the accumulation dtype), the columns' dB and d scale. The column
gradients belong to the columns' owners: a reduce-scatter ("gather") or an accumulator
travelling behind the shard ("ring"), as for :func:`flashcontrast.distributed.clip_loss`;
everything is rounded to the features' dtype once. Bytes: the module doc of
:mod:`flashcontrast.distributed` (unchanged by the engine: the same tensors travel).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from ..backends.pair import Coefs, Pair, Stats, lse, merge_lse
from ..objectives.multiview import (
    DHEL_PAIR,
    Views,
    _check_groups,
    _stack,
    mv_positive_lse,
    mv_positive_lse_bwd,
)
from . import _comm
from .clip import LocalRows


def _infonce_pair(n_total: int) -> Pair:
    """MV-InfoNCE on the global (V N, D) stack: sample(k) = k mod N (the global N)."""
    return Pair("rows", positives=True, exclude_self=True, period=n_total)


def _fold(acc: Optional[list], st: Optional[Stats]) -> Optional[list]:
    """Fold one column block's row pairs (and positive pairs, when the sweep has them)
    into ``acc`` [row_max, row_sum(, pos_max, pos_sum)] (merge_lse: exact, any order)."""
    if st is None:
        return acc
    new = [st.row_max, st.row_sum] + ([] if st.pos_max is None else [st.pos_max, st.pos_sum])
    if acc is None:
        return new
    out = list(merge_lse(acc[0], acc[1], new[0], new[1]))
    if len(new) == 4:
        out += merge_lse(acc[2], acc[3], new[2], new[3])
    return out


class _Sweeps:
    """The V views of this rank's rows, one :class:`LocalRows` each, and the engine
    calls of one column block of views (every column view for MV-InfoNCE, the row's own
    view for MV-DHEL) at its global offsets."""

    def __init__(self, u, scale, groups, lay: _comm.Layout, per_view: bool, backend: str):
        self.v, self.n_total, self.per_view = u.shape[0], lay.total, per_view
        self.pair = DHEL_PAIR if per_view else _infonce_pair(lay.total)
        offsets = [lay.offset + (0 if per_view else k * lay.total) for k in range(self.v)]
        self.rows = [
            LocalRows(u[k], scale, None, groups, offsets[k], backend) for k in range(self.v)
        ]
        self.acc = self.rows[0].acc

    def _blocks(self, l: int, cols: Tensor, col0: int):
        """(column view m, its (m_q, D) block, its global offset) that rows of view l
        meet: cols (V, m_q, D) are samples col0 .. of every view."""
        views = [l] if self.per_view else range(self.v)
        for m in views:
            yield m, cols[m], col0 + (0 if self.per_view else m * self.n_total)

    def stats(self, acc: list, cols: Tensor, col0: int, col_groups: Optional[Tensor]) -> None:
        """Fold every view's row pairs against cols (V, m_q, D) into acc[l]."""
        for l, rows in enumerate(self.rows):
            for _, y, off in self._blocks(l, cols, col0):
                acc[l] = _fold(acc[l], rows.stats(self.pair, y, off, col_groups))

    def grads(self, cols, col0, col_groups, stats: list, coefs: list) -> Tensor:
        """The engine's backward of every view's rows against cols (V, m_q, D): dA summed
        in the LocalRows, the columns' gradient (V, m_q, D) (accumulation dtype) returned."""
        db = torch.zeros(cols.shape, dtype=self.acc, device=cols.device)
        for l, rows in enumerate(self.rows):
            for m, y, off in self._blocks(l, cols, col0):
                db[m] += rows.grads(self.pair, y, off, col_groups, stats[l], coefs[l])
        return db

    def da(self) -> Tensor:
        """(V, n, D) the rows' gradients (accumulation dtype)."""
        return torch.stack([rows.da for rows in self.rows])

    def dscale(self) -> Tensor:
        return sum(rows.dscalars[0] for rows in self.rows)


def _loss_terms(u, scale, pairs: list, per_view: bool) -> Tensor:
    """Sum over the local samples of the per-sample terms from the (V, n) pairs."""
    row_lse = torch.stack([lse(p[0], p[1]) for p in pairs])  # (V, n)
    if per_view:
        return (row_lse.sum(0) - mv_positive_lse(u, scale)).sum()
    pos_lse = torch.stack([lse(p[2], p[3]) for p in pairs])
    term = torch.logsumexp(row_lse, 0) - torch.logsumexp(pos_lse, 0)
    # >= 0 exactly; the two LSEs are rounded apart: the value clamped, as in one process
    return term.clamp_min(0).sum()


def _coefs(pairs: list, c: Tensor, per_view: bool) -> tuple:
    """(Stats, Coefs) per view from the saved pairs and c = g / N (module doc)."""
    n = pairs[0][0].shape[0]
    if per_view:
        stats = [Stats(row_max=p[0], row_sum=p[1]) for p in pairs]
        return stats, [Coefs(rows=c.expand(n).contiguous()) for _ in pairs]
    stats = [Stats(row_max=p[0], row_sum=p[1], pos_max=p[2], pos_sum=p[3]) for p in pairs]
    row_w = torch.softmax(torch.stack([lse(p[0], p[1]) for p in pairs]), 0) * c
    pos_w = torch.softmax(torch.stack([lse(p[2], p[3]) for p in pairs]), 0) * c
    coefs = [
        Coefs(rows=row_w[k].contiguous(), pos_rows=pos_w[k].contiguous()) for k in range(len(pairs))
    ]
    return stats, coefs


def _travel(u: Tensor, groups: Optional[Tensor]) -> list:
    """The ring's travelling tensors: the shard (n, V, D), its ids last when grouped."""
    travel = [u.transpose(0, 1).contiguous()]
    return travel if groups is None else [*travel, groups.contiguous()]


class _MultiviewDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, u, scale, groups, lay, per_view, strategy, grad_scaling, backend):
        sw = _Sweeps(u, scale, groups, lay, per_view, backend)
        acc: list = [None] * sw.v
        v = u.shape[0]
        if strategy == "gather":
            cols = _comm.all_gather_rows(u.transpose(0, 1).contiguous(), lay)  # (N, V, D)
            stack = cols.transpose(0, 1).contiguous()  # (V, N, D): the global stack
            g_all = None if groups is None else _comm.all_gather_rows(groups, lay)
            if per_view:
                sw.stats(acc, stack, 0, g_all)
            else:  # the rows of every view against the whole (V N, D) stack at once
                g_stack = None if g_all is None else g_all.repeat(v)
                flat = stack.view(v * lay.total, stack.shape[-1])
                for l, rows in enumerate(sw.rows):
                    acc[l] = _fold(acc[l], rows.stats(sw.pair, flat, 0, g_stack))
            saved = (stack, g_all)
        else:

            def visit(q, shard):
                gy = None if groups is None else shard[1]
                sw.stats(acc, shard[0].transpose(0, 1).contiguous(), lay.offsets[q], gy)

            _comm.ring_pass(lay, _travel(u, groups), visit, torch.add)
            saved = ()
        part = _loss_terms(u, scale, acc, per_view).reshape(1)
        loss = _comm.all_reduce(part, lay)[0] / lay.total
        flat_pairs = [t for p in acc for t in p]
        ctx.save_for_backward(u, scale, groups, *saved, *flat_pairs)
        ctx.lay, ctx.per_view, ctx.strategy = lay, per_view, strategy
        ctx.grad_scaling, ctx.backend, ctx.num_saved = grad_scaling, backend, len(saved)
        return loss

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        u, scale, groups, *rest = ctx.saved_tensors
        saved, flat_pairs = rest[: ctx.num_saved], rest[ctx.num_saved :]
        lay, per_view = ctx.lay, ctx.per_view
        sw = _Sweeps(u, scale, groups, lay, per_view, ctx.backend)
        v = u.shape[0]
        k = len(flat_pairs) // v
        pairs = [flat_pairs[i * k : (i + 1) * k] for i in range(v)]
        c = _comm.mean_upstream(grad_loss, lay, sw.acc) / lay.total
        stats, coefs = _coefs(pairs, c, per_view)
        if ctx.strategy == "gather":
            stack, g_all = saved
            if per_view:
                db = sw.grads(stack, 0, g_all, stats, coefs)  # (V, N, D)
            else:
                g_stack = None if g_all is None else g_all.repeat(v)
                flat = stack.view(v * lay.total, stack.shape[-1])
                db = sum(
                    rows.grads(sw.pair, flat, 0, g_stack, stats[l], coefs[l])
                    for l, rows in enumerate(sw.rows)
                ).view(v, lay.total, -1)
            dcols = _comm.reduce_scatter_rows(db.transpose(0, 1).contiguous(), lay)
        else:

            def visit(q, shard):
                gy = None if groups is None else shard[1]
                cols = shard[0].transpose(0, 1).contiguous()
                db = sw.grads(cols, lay.offsets[q], gy, stats, coefs)
                return db.transpose(0, 1).contiguous()  # (n_q, V, D)

            dcols = _comm.ring_pass(lay, _travel(u, groups), visit, torch.add)
        du = sw.da() + dcols.transpose(0, 1)
        dscale = sw.dscale().reshape(1)
        if per_view:  # the positives: d/du of -(g/N) sum_i LSE_{l<l'}, one rounding
            du_pos, ds_pos = mv_positive_lse_bwd(u.to(sw.acc), scale, (-c).expand(u.shape[1]))
            du += du_pos
            dscale += ds_pos
        du, dscale = _comm.round_grads(du, u, dscale, scale, lay, ctx.grad_scaling)
        return du, dscale, None, None, None, None, None, None


def _stack_shard(views: Views) -> Tensor:
    """This rank's (V, n_r, D) views: ``objectives.multiview._stack``'s checks, with
    n_r = 0 (an empty shard) allowed and dense (strided) tensors only."""
    return _stack(views, dense=_comm.check_dense, empty_ok=True)


def _run(name, views, logit_scale, groups, group, strategy, backend, grad_scaling, per_view):
    def check():
        u = _stack_shard(views)
        if isinstance(groups, Tensor):
            _comm.check_dense("groups", groups)
        g = _check_groups(groups, u)
        scale = _comm.scalar("logit_scale", logit_scale, u)
        chosen = _comm.engine_backend("multiview", backend, u)
        v, n, d = u.shape
        return (u, g, scale, chosen), n, d, u.dtype, u.device, [v, g is not None]

    fields = ["number of views V", "groups given"]
    lay, (u, g, scale, chosen) = _comm.setup_checked(
        name, group, strategy, grad_scaling, backend, fields, check,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    if per_view and lay.total < 2:
        raise ValueError(
            f"flashcontrast.distributed.{name}: MV-DHEL needs N >= 2 samples in the global "
            f"batch, got N = {lay.total} (every rank raises)"
        )
    if g is not None:
        g = g.to(torch.int64)
    return _MultiviewDist.apply(u, scale, g, lay, per_view, strategy, grad_scaling, chosen)


def multiview_infonce_loss(
    views: Views,
    logit_scale,
    *,
    groups: Optional[Tensor] = None,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """MV-InfoNCE over the global batch of a process group.

    Each rank passes its own samples: ``views`` (V, n_r, D) or V tensors (n_r, D) (n_r may
    differ between ranks and be 0; V, D, dtype, groups given or not, ``strategy``,
    ``backend`` and ``grad_scaling`` may not: checked on every rank), and optionally their
    ``groups`` ids (n_r,) (ids are global: equal ids on different ranks are one group).
    Every rank returns :func:`flashcontrast.multiview_infonce_loss` of the concatenation
    of the shards in rank order. Gradients as :func:`flashcontrast.distributed.clip_loss`
    (``grad_scaling="ddp"``: features W x, ``logit_scale`` 1x the single-process
    gradients; ``"sum"``: features 1x). ``strategy``: "gather" or "ring" (module doc).
    """
    group, strategy, backend, grad_scaling = _comm.options("multiview_infonce_loss", options)
    return _run(
        "multiview_infonce_loss", views, logit_scale, groups, group, strategy, backend,
        grad_scaling, False,
    )  # fmt: skip


def multiview_dhel_loss(
    views: Views,
    logit_scale,
    *,
    groups: Optional[Tensor] = None,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """MV-DHEL over the global batch of a process group (global N >= 2); arguments,
    result and gradients as :func:`multiview_infonce_loss`."""
    group, strategy, backend, grad_scaling = _comm.options("multiview_dhel_loss", options)
    return _run(
        "multiview_dhel_loss", views, logit_scale, groups, group, strategy, backend,
        grad_scaling, True,
    )  # fmt: skip
