"""SigLIP over a process group: the "gather" and "ring" strategies, on the pair engine.

Rank r holds rows [o_r, o_r + n_r) of A and B; N = sum n_q. With S = s A B^T + b over the
global batch and z_ij = +1 on the diagonal, -1 elsewhere,
L = -(1/N) sum_ij log sigmoid(z_ij S_ij). Pairs are independent, so there are no column
statistics: each rank sweeps its rows against every column with the pair engine
(``backends/pair.py``), ``Pair("sigmoid")`` at row offset o_r and the column block's
offset (the positive of global row i is global column i), whose total is
sum_ij softplus(-z_ij S_ij) over the block; one scalar all-reduce gives the loss.
Backward: the engine's backward with the coefficient g/N (``Coefs.total``), i.e.
dS_ij = g/N (sigmoid(S_ij) - [i == j]) with the positive's -sigmoid(-S_ii) formed in the
tile; dA_r is local; dB_j sums over ranks, routed to the owner by a reduce-scatter
("gather") or by an accumulator travelling behind the shard ("ring"), summed in the
accumulation dtype and rounded once. The per-block engine calls are
:class:`flashcontrast.distributed.clip.LocalRows`'s, shared with CLIP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from ..backends.pair import Coefs, Pair, Stats
from . import _comm
from .clip import LocalRows

#: SigLIP on the pair engine: the softplus total, the positive of row i at column i.
PAIR = Pair("sigmoid")


def _total(rows: LocalRows, cols: Tensor, col_offset: int) -> Tensor:
    """sum_ij softplus(-z_ij S_ij) over the local rows x ``cols`` (m, D) (0-d)."""
    st = rows.stats(PAIR, cols, col_offset, None)
    return torch.zeros((), dtype=rows.acc, device=cols.device) if st is None else st.total


class _SigLipDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, a, b, scale, bias, lay, strategy, grad_scaling, backend):
        rows = LocalRows(a, scale, bias, None, lay.offset, backend)
        if strategy == "gather":
            b = _comm.all_gather_rows(b, lay)  # kept for the backward: all of B
            total = _total(rows, b, 0)
        else:
            parts = []

            def visit(q, shard):
                parts.append(_total(rows, shard[0], lay.offsets[q]))

            _comm.ring_pass(lay, [b], visit, torch.add)
            total = torch.stack(parts).sum()
        loss = _comm.all_reduce(total.to(rows.acc).reshape(1), lay)[0] / lay.total
        ctx.save_for_backward(a, b, scale, bias)
        ctx.lay, ctx.strategy, ctx.grad_scaling = lay, strategy, grad_scaling
        ctx.backend, ctx.has_bias = backend, bias is not None
        return loss

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        a, b, scale, bias = ctx.saved_tensors
        lay = ctx.lay
        rows = LocalRows(a, scale, bias, None, lay.offset, ctx.backend)
        coefs = Coefs(total=_comm.mean_upstream(grad_loss, lay, rows.acc) / lay.total)
        if ctx.strategy == "gather":  # b is all of B here
            db = _comm.reduce_scatter_rows(rows.grads(PAIR, b, 0, None, Stats(), coefs), lay)
        else:

            def visit(q, shard):
                return rows.grads(PAIR, shard[0], lay.offsets[q], None, Stats(), coefs)

            db = _comm.ring_pass(lay, [b], visit, torch.add)
        grads = rows.finish(db, lay, ctx.grad_scaling, ctx.has_bias)
        return (*grads, None, None, None, None)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias,
    **options: Unpack[_comm.ProcessGroupOptions],
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
        **options: the process-group keywords, each optional, the same four for every
            loss here (:class:`flashcontrast.distributed.ProcessGroupOptions`):
        group: the process group (None: the default group).
        strategy: "gather" or "ring" (see :mod:`flashcontrast.distributed`).
        backend: the pair engine's backend for the local tiles, as for
            :func:`flashcontrast.distributed.clip_loss` ("auto", "torch", "triton",
            "cuda", "reference").
        grad_scaling: "ddp" or "sum".
    """
    opts = _comm.options("siglip_loss", options)
    lay, a, b, scale, bias, chosen = _comm.setup_pair(
        "siglip_loss", image_features, text_features, logit_scale, logit_bias, opts,
        objective="siglip",
    )  # fmt: skip
    return _SigLipDist.apply(a, b, scale, bias, lay, opts.strategy, opts.grad_scaling, chosen)
