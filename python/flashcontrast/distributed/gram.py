"""GRAM over a process group: the "gather" and "ring" strategies.

Rank r holds rows [o_r, o_r + n_r) of the anchor t and of the K others o^k; N = sum n_q.
Column j of the logits L_ij = -s V_ij is sample j of the others, with its per-column
constants (det H_j, adj H_j, the degeneracy floor), computed from the column's own others
wherever the column is, as one process computes them (``objectives.gram``:
``gram_matrices``, ``column_constants_from_gram``, ``floor_from_gram``). The tiles are the
GRAM kernels of the backend ``backend=`` resolves to (``_comm.engine_backend`` among the
setup checks), in their rectangular form (``backends/blockwise/gram.py``): this rank's
rows against one column block, row i's own column at ``row_offset + i`` with row_offset =
o_r - (the block's first global column); this module computes no tile itself, so the
degeneracy floor, NaN propagation and every rounding are the single-process kernels':

* row LSEs (over each block's columns), the diagonal (the one block holding the row's own
  column) and the row sums are merged locally (logaddexp, +);
* column LSEs are partial over this rank's rows and merged across ranks: an all-reduce
  (max, then the sum of exponentials) for "gather", an accumulator travelling behind the
  column shard (logaddexp) for "ring"; the label-smoothing sum sum_ij L_ij is one scalar;
* L = 1/(2N) [sum_i row_lse_i + sum_j col_lse_j - 2 (1 - eps) sum_i L_ii
  - 2 eps / N sum_ij L_ij], the single-process loss term by term.

Backward: the backend's gram_backward of each block with the merged LSEs, the upstream
gradient averaged over ranks and total = N (its dL_ij = g/(2N) (P_row + P_col
- 2 (1 - eps) [j = row_offset + i] - 2 eps / N)), partial sums in the accumulation dtype:
d anchor (local rows, summed over blocks), dscale (all-reduced), and per column block
d_others_u plus (col_tt, -col_uu) chained by autograd through the block's column
constants to its others. Column gradients go to their owners by a reduce-scatter
("gather") or travel behind the shard ("ring").
"""

from __future__ import annotations

import struct
from typing import Sequence

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from .._ops import backend_module
from .._validation import accumulation_dtype
from ..backends.gram import GramBlock, GramCoefs
from ..objectives.gram import (
    _check_label_smoothing,
    _check_others,
    column_constants_from_gram,
    floor_from_gram,
    gram_matrices,
    gram_variant,
)
from . import _comm

#: The backends whose GRAM kernels take the rectangular form (row_offset, partial column
#: statistics, ``total``, ``out_dtype``): all of them.
RECTANGULAR_BACKENDS = ("torch", "triton", "cuda")


def _constants(y: Tensor, acc: torch.dtype):
    """(yl, det_h, adj_h, floor_h) of the column block y (K, m, D), as one process computes
    them; under grad mode (the backward) differentiable w.r.t. yl = y in ``acc``."""
    yl = y.detach().to(acc)
    if torch.is_grad_enabled():
        yl.requires_grad_(True)
    gram = gram_matrices(yl)  # (m, K, K) in acc
    det_h, adj_h = column_constants_from_gram(gram)
    return yl, det_h, adj_h, floor_from_gram(gram, gram.dtype)


def _columns(shard: Tensor) -> Tensor:
    """A column block (K, m, D), contiguous, from a shard (m, K, D)."""
    return shard.transpose(0, 1).contiguous()


class _GramDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, t, o, scale, lay, eps, strategy, grad_scaling, backend):
        acc = accumulation_dtype(t.dtype)
        module = backend_module(backend, "gram")
        n = t.shape[0]
        kw = dict(dtype=acc, device=t.device)
        row_lse = torch.full((n,), float("-inf"), **kw)
        diag = torch.zeros(n, **kw)
        total_sum = torch.zeros(1, **kw)  # sum_ij L_ij over the local rows

        def sweep(y: Tensor, row_offset: int) -> Tensor:
            """Fold the local rows against the column block y (K, m, D); return its partial
            column LSEs (m,)."""
            nonlocal row_lse
            with torch.no_grad():
                _, det_h, adj_h, floor_h = _constants(y, acc)
            st = module.gram_forward(GramBlock(t, y, scale, det_h, adj_h, floor_h, row_offset))
            row_lse = torch.logaddexp(row_lse, st[0].to(acc))
            diag.add_(st[2].to(acc))
            total_sum.add_(st[3].to(acc).sum())
            return st[1].to(acc)

        if strategy == "gather":
            cols = _comm.all_gather_rows(o.transpose(0, 1).contiguous(), lay)  # (N, K, D)
            col_part = sweep(_columns(cols), lay.offset)
            extra = torch.cat([row_lse.sum()[None], diag.sum()[None], total_sum])
            col_lse, sums = _comm.lse_all_reduce(col_part, extra, lay)
            col_sum = col_lse.sum()
            ctx.save_for_backward(t, o, scale, row_lse, col_lse, cols)
        else:

            def visit(q, shard):
                return sweep(_columns(shard[0]), lay.offset - lay.offsets[q])

            col_lse = _comm.ring_pass(lay, [o.transpose(0, 1).contiguous()], visit, torch.logaddexp)
            part = torch.cat(
                [row_lse.sum()[None], diag.sum()[None], total_sum, col_lse.sum()[None]]
            )
            sums = _comm.all_reduce(part, lay)
            col_sum = sums[3]
            ctx.save_for_backward(t, o, scale, row_lse, col_lse)
        n_tot = lay.total
        loss = sums[0] + col_sum - 2.0 * (1.0 - eps) * sums[1] - 2.0 * eps / n_tot * sums[2]
        ctx.lay, ctx.eps, ctx.strategy = lay, eps, strategy
        ctx.grad_scaling, ctx.backend = grad_scaling, backend
        return loss / (2 * n_tot)

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        t, o, scale, row_lse, col_lse, *rest = ctx.saved_tensors
        lay, eps = ctx.lay, ctx.eps
        acc = row_lse.dtype
        module = backend_module(ctx.backend, "gram")
        g = _comm.mean_upstream(grad_loss, lay, acc)
        dt = torch.zeros(t.shape, dtype=acc, device=t.device)
        dscale = torch.zeros(1, dtype=acc, device=t.device)

        def sweep(y: Tensor, col_lse_blk: Tensor, row_offset: int) -> Tensor:
            """Add the block's d anchor and dscale; return d y (K, m, D) in acc, through
            the column constants too."""
            with torch.enable_grad():
                yl, det_h, adj_h, floor_h = _constants(y, acc)
            block = GramBlock(t, y, scale, det_h.detach(), adj_h.detach(), floor_h, row_offset)
            coefs = GramCoefs(row_lse, col_lse_blk, g, eps, lay.total)
            d_a, d_u, ds, col_tt, col_uu = module.gram_backward(block, coefs, out_dtype=acc)
            dt.add_(d_a)
            dscale.add_(ds.to(acc))
            if y.shape[1] == 0:
                return d_u.to(acc)
            (d_c,) = torch.autograd.grad((det_h, adj_h), (yl,), (col_tt.to(acc), -col_uu.to(acc)))
            return d_u.to(acc) + d_c

        if ctx.strategy == "gather":
            (cols,) = rest
            dy = sweep(_columns(cols), col_lse, lay.offset)
            dcols = _comm.reduce_scatter_rows(dy.transpose(0, 1).contiguous(), lay)
        else:

            def visit(q, shard):
                dy = sweep(_columns(shard[0]), shard[1], lay.offset - lay.offsets[q])
                return dy.transpose(0, 1).contiguous()

            travel = [o.transpose(0, 1).contiguous(), col_lse]
            dcols = _comm.ring_pass(lay, travel, visit, torch.add)
        do = dcols.transpose(0, 1)
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
            None,
        )


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def _check_shard_others(anchor: Tensor, others: object) -> list:
    """``objectives.gram._check_others`` for this rank's shard: n_r = 0 allowed."""
    return _check_others(anchor, others, check=_comm.check_shard)


def gram_loss(
    anchor: Tensor,
    others: Sequence[Tensor],
    logit_scale,
    *,
    label_smoothing: float = 0.0,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """GRAM's volume contrastive loss over the global batch of a process group.

    Each rank passes its own rows: ``anchor`` (n_r, D) and K ``others`` (n_r, D) (n_r may
    differ between ranks and be 0; K, D, dtype, ``label_smoothing``, ``strategy``,
    ``backend`` and ``grad_scaling`` may not: checked, a mismatch raises on every rank).
    Every rank returns :func:`flashcontrast.gram_loss` of the concatenation of the shards
    in rank order. Gradients as :func:`flashcontrast.distributed.clip_loss`
    (``grad_scaling="ddp"``: features W x, ``logit_scale`` 1x the single-process
    gradients; ``"sum"``: features 1x). ``strategy``: "gather" or "ring" (module doc).
    ``backend``: "auto" (resolved as :func:`flashcontrast.gram_loss` resolves it), "torch",
    "triton", "cuda" or "reference" (the float64-capable "torch" kernels); the tiles are
    that backend's GRAM kernels in their rectangular form (module doc). An explicit
    backend that cannot run on some rank fails the setup checks of every rank.
    """
    group, strategy, backend, grad_scaling = _comm.options("gram_loss", options)

    def check():
        a = _comm.check_shard("anchor", anchor)
        oth = _check_shard_others(a, others)
        scale = _comm.scalar("logit_scale", logit_scale, a)
        eps = _check_label_smoothing(label_smoothing)
        chosen = _comm.engine_backend("gram", backend, a, gram_variant(len(oth)))
        n, d = a.shape
        payload = (a, oth, scale, eps, chosen)
        return payload, n, d, a.dtype, a.device, [len(oth), _float_bits(eps)]

    lay, (a, oth, scale, eps, chosen) = _comm.setup_checked(
        "gram_loss",
        group,
        strategy,
        grad_scaling,
        backend,
        ["number of other modalities K", ("label_smoothing", _bits_float)],
        check,
        backends=_comm.ENGINE_BACKENDS,
    )
    stacked = torch.stack(oth)  # (K, n_r, D), differentiable
    return _GramDist.apply(a, stacked, scale, lay, eps, strategy, grad_scaling, chosen)
