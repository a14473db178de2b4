"""GRAM over a process group: the "gather" and "ring" strategies.

Rank r holds rows [o_r, o_r + n_r) of the anchor t and of the K others o^k; N = sum n_q.
Column j of the logits L_ij = -s V_ij is sample j of the others, with its per-column
constants (det H_j, adj H_j) (``objectives.gram.column_constants``, computed from the
column's own others wherever the column is). Each rank computes its anchor rows against
every column, a block of rows at a time (the blockwise backend's budget):

* row LSEs, and the diagonal (sample i's own column is local), are complete locally;
* column LSEs are partial and combined across ranks: an all-reduce (max, then the sum of
  exponentials) for "gather", an accumulator travelling behind the column shard for
  "ring"; the label-smoothing sum sum_ij L_ij is one scalar;
* L = 1/(2N) [sum_i row_lse_i + sum_j col_lse_j - 2 (1 - eps) sum_i L_ii
  - 2 eps / N sum_ij L_ij], the single-process loss term by term.

Backward: with c = g/(2N), each tile contributes the gradient of
c sum_ij [exp(L_ij - row_lse_i) + exp(L_ij - col_lse_j) - 2 eps / N L_ij] (LSEs fixed),
recomputed block by block and differentiated by autograd inside the block, through the
column constants to the others; the diagonal term is local. Column gradients go to their
owners by a reduce-scatter ("gather") or travel behind the shard ("ring").
"""

from __future__ import annotations

import struct
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._validation import accumulation_dtype, check_pair
from ..backends.blockwise import MAX_BLOCK_ELEMENTS
from ..objectives.gram import MAX_OTHERS, _check_label_smoothing, column_constants
from . import _comm


def _volume(det: Tensor) -> Tensor:
    pos = det > 0
    return torch.where(pos, torch.where(pos, det, 1.0).sqrt(), 0.0)


def _logits(t: Tensor, o: Tensor, det_h: Tensor, adj_h: Tensor, scale) -> Tensor:
    """(b, m) logits -s V of anchor rows t (b, D) against columns o (K, m, D)."""
    u = torch.matmul(t, o.transpose(1, 2))  # (K, b, m)
    v = torch.einsum("rim,mrs->sim", u, adj_h)
    det = torch.outer((t * t).sum(1), det_h) - (u * v).sum(0)
    return _volume(det) * -scale


def _diag(t: Tensor, o: Tensor, det_h: Tensor, adj_h: Tensor, scale) -> Tensor:
    """(n,) logits of each local anchor row against its own column."""
    u = (t[None] * o).sum(-1)  # (K, n)
    v = torch.einsum("rn,nrs->sn", u, adj_h)
    det = (t * t).sum(1) * det_h - (u * v).sum(0)
    return _volume(det) * -scale


def _rows(n: int, m: int, k: int, device) -> int:
    """Rows per block for n anchor rows against m columns (m = 0: one empty block)."""
    budget = MAX_BLOCK_ELEMENTS.get(device.type, 1 << 22)
    return _comm.tile_rows(n, m, device, max(1, budget // (2 * k + 6)))


def _tile_stats(t, o, det_h, adj_h, scale, row_lse, totals):
    """Fold rows t x columns o into row_lse (in place); add sum L to totals[0]; return
    the partial column LSEs (m,)."""
    n, m = t.shape[0], o.shape[1]
    col = torch.full((m,), float("-inf"), dtype=t.dtype, device=t.device)
    rows = _rows(n, m, o.shape[0], t.device)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        lg = _logits(t[a:b], o, det_h, adj_h, scale)
        row_lse[a:b] = torch.logaddexp(row_lse[a:b], torch.logsumexp(lg, 1))
        col = torch.logaddexp(col, torch.logsumexp(lg, 0))
        totals[0] += lg.sum()
    return col


def _tile_grads(t, o, scale, row_lse, col_lse, coef, eps_n, dt, dscale):
    """Gradients of the tile surrogate: adds to dt (n, D) and dscale (1,); returns do
    (K, m, D), chained through the column constants of o."""
    n, m = t.shape[0], o.shape[1]
    rows = _rows(n, m, o.shape[0], t.device)
    with torch.enable_grad():
        ol = o.detach().requires_grad_(True)
        det_h, adj_h = column_constants(ol)
    d_det = torch.zeros_like(det_h)
    d_adj = torch.zeros_like(adj_h)
    do = torch.zeros_like(o)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        with torch.enable_grad():
            tl = t[a:b].detach().requires_grad_(True)
            ob = o.detach().requires_grad_(True)
            dl = det_h.detach().requires_grad_(True)
            al = adj_h.detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            lg = _logits(tl, ob, dl, al, sl)
            sur = (lg - row_lse[a:b, None]).exp() + (lg - col_lse[None, :]).exp()
            sur = coef * (sur.sum() - 2.0 * eps_n * lg.sum())
            g_t, g_o, g_d, g_a, g_s = torch.autograd.grad(sur, (tl, ob, dl, al, sl))
        dt[a:b] += g_t
        do += g_o
        d_det += g_d
        d_adj += g_a
        dscale += g_s
    (g_o,) = torch.autograd.grad((det_h, adj_h), (ol,), (d_det, d_adj))
    return do + g_o


class _GramDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, t, o, scale, lay, eps, strategy, grad_scaling):
        acc = accumulation_dtype(t.dtype)
        ta, oa = t.to(acc), o.to(acc)
        n = t.shape[0]
        row_lse = torch.full((n,), float("-inf"), dtype=acc, device=t.device)
        totals = torch.zeros(1, dtype=acc, device=t.device)  # sum_ij L_ij over local rows
        det_l, adj_l = column_constants(oa)
        diag = _diag(ta, oa, det_l, adj_l, scale)
        n_tot = lay.total
        if strategy == "gather":
            cols = _comm.all_gather_rows(o.transpose(0, 1).contiguous(), lay)  # (N, K, D)
            ya = cols.transpose(0, 1).to(acc)
            det_h, adj_h = column_constants(ya)
            col_part = _tile_stats(ta, ya, det_h, adj_h, scale, row_lse, totals)
            extra = torch.cat([row_lse.sum()[None], diag.sum()[None], totals])
            col_lse, sums = _comm.lse_all_reduce(col_part, extra, lay)
            col_sum = col_lse.sum()
            ctx.save_for_backward(t, o, scale, row_lse, col_lse, cols)
        else:

            def visit(q, shard):
                y = shard[0].transpose(0, 1).to(acc)
                det_h, adj_h = column_constants(y)
                return _tile_stats(ta, y, det_h, adj_h, scale, row_lse, totals)

            col_lse = _comm.ring_pass(lay, [o.transpose(0, 1).contiguous()], visit, torch.logaddexp)
            part = torch.cat([row_lse.sum()[None], diag.sum()[None], totals, col_lse.sum()[None]])
            sums = _comm.all_reduce(part, lay)
            col_sum = sums[3]
            ctx.save_for_backward(t, o, scale, row_lse, col_lse)
        loss = sums[0] + col_sum - 2.0 * (1.0 - eps) * sums[1] - 2.0 * eps / n_tot * sums[2]
        ctx.lay, ctx.eps, ctx.strategy, ctx.grad_scaling = lay, eps, strategy, grad_scaling
        return loss / (2 * n_tot)

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        t, o, scale, row_lse, col_lse, *rest = ctx.saved_tensors
        lay, eps = ctx.lay, ctx.eps
        acc = row_lse.dtype
        g = _comm.mean_upstream(grad_loss, lay, acc)
        coef = g / (2 * lay.total)
        eps_n = eps / lay.total
        ta, oa = t.to(acc), o.to(acc)
        with torch.enable_grad():  # the diagonal term, local
            tl = ta.detach().requires_grad_(True)
            ol = oa.detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            det_l, adj_l = column_constants(ol)
            h = _diag(tl, ol, det_l, adj_l, sl).sum() * (-2.0 * (1.0 - eps) * coef)
            dt, do, ds = torch.autograd.grad(h, (tl, ol, sl))
        dt = dt.clone()
        dscale = ds.reshape(1).clone()
        if ctx.strategy == "gather":
            (cols,) = rest
            ya = cols.transpose(0, 1).to(acc)
            dy = _tile_grads(ta, ya, scale, row_lse, col_lse, coef, eps_n, dt, dscale)
            dcols = _comm.reduce_scatter_rows(dy.transpose(0, 1).contiguous(), lay)
        else:

            def visit(q, shard):
                y = shard[0].transpose(0, 1).to(acc)
                dy = _tile_grads(ta, y, scale, row_lse, shard[1], coef, eps_n, dt, dscale)
                return dy.transpose(0, 1).contiguous()

            travel = [o.transpose(0, 1).contiguous(), col_lse]
            dcols = _comm.ring_pass(lay, travel, visit, torch.add)
        do = do + dcols.transpose(0, 1)
        _comm.all_reduce(dscale, lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        return (
            (dt * factor).to(t.dtype),
            (do * factor).to(o.dtype),
            dscale[0].to(scale.dtype),
            None,
            None,
            None,
            None,
        )


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def _check_shard_others(anchor: Tensor, others: object) -> list:
    """``objectives.gram._check_others`` for this rank's shard: n_r = 0 allowed."""
    if isinstance(others, Tensor) or not isinstance(others, Sequence):
        raise TypeError(
            "others must be a list or tuple of (N, D) tensors, one per other modality, "
            f"got {type(others).__name__}"
        )
    others = list(others)
    if not others:
        raise ValueError("others is empty: GRAM needs at least one other modality (M >= 2)")
    if len(others) > MAX_OTHERS:
        raise ValueError(
            f"GRAM supports up to {MAX_OTHERS} other modalities (M <= {MAX_OTHERS + 1}), "
            f"got {len(others)}"
        )
    for k, o in enumerate(others):
        _comm.check_shard(f"others[{k}]", o)
        check_pair("anchor", anchor, f"others[{k}]", o)
    return others


def gram_loss(
    anchor: Tensor,
    others: Sequence[Tensor],
    logit_scale,
    *,
    label_smoothing: float = 0.0,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """GRAM's volume contrastive loss over the global batch of a process group.

    Each rank passes its own rows: ``anchor`` (n_r, D) and K ``others`` (n_r, D) (n_r may
    differ between ranks and be 0; K, D, dtype, ``label_smoothing``, ``strategy``,
    ``backend`` and ``grad_scaling`` may not: checked, a mismatch raises on every rank).
    Every rank returns :func:`flashcontrast.gram_loss` of the concatenation of the shards
    in rank order. Gradients as :func:`flashcontrast.distributed.clip_loss`
    (``grad_scaling="ddp"``: features W x, ``logit_scale`` 1x the single-process
    gradients; ``"sum"``: features 1x). ``strategy``: "gather" or "ring" (module doc);
    tiles are blockwise PyTorch.
    """

    def check():
        a = _comm.check_shard("anchor", anchor)
        oth = _check_shard_others(a, others)
        scale = _comm.scalar("logit_scale", logit_scale, a)
        eps = _check_label_smoothing(label_smoothing)
        n, d = a.shape
        return (a, oth, scale, eps), n, d, a.dtype, a.device, [len(oth), _float_bits(eps)]

    lay, (a, oth, scale, eps) = _comm.setup_checked(
        "gram_loss",
        group,
        strategy,
        grad_scaling,
        backend,
        ["number of other modalities K", ("label_smoothing", _bits_float)],
        check,
    )
    stacked = torch.stack(oth)  # (K, n_r, D), differentiable
    return _GramDist.apply(a, stacked, scale, lay, eps, strategy, grad_scaling)
