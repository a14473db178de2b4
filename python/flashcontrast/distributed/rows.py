"""Row-only objectives over a process group: one-directional InfoNCE, uniformity (within
one modality and across two) and alignment.

InfoNCE and the uniformities are functions of the row logsumexps of one "rows" sweep of
the pair engine (``backends/pair.py``): rank r sweeps its rows (n_r, D') against the
columns of every rank, all-gathered once ("gather" only), at global row offset o_r, so its
rows' statistics are complete locally and no column statistic travels. The loss is then a
global sum (InfoNCE) or a global logsumexp (uniformity) of per-row values, one all-reduce
of a scalar (two for the logsumexp: max, then the rescaled sums). Cross-modal uniformity
sweeps the local a(x) against the gathered b(y) (``objectives/uniformity.py``).
Alignment has no sweep: a global sum of the local rows' ||x_i - y_i||^alpha, one
all-reduce.

Backward: the engine's backward from the local rows' statistics with the upstream
coefficients; dA is local, the columns' dB (N, D') sums every rank's part by a
reduce-scatter to the owners, d scale and d bias by an all-reduce. The upstream gradient
is averaged over ranks (every rank differentiates the same function). Feature gradients
are W x the single-process ones with ``grad_scaling="ddp"`` (1x with "sum"), the scalars'
the single-process ones, as for :func:`flashcontrast.distributed.clip_loss`.

Bytes per rank (W ranks, equal shards of n rows, D features of e bytes, f per
statistic): forward (W - 1) n D e + ar(f) (InfoNCE; uniformity ar(2 f)); backward
ar(f) + (W - 1) n D' f + ar(2 f), D' = D (InfoNCE) or D + 2 (the uniformities: their
augmented rows, built on each rank from the gathered features, ``_augmented.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._keywords import Unpack
from .._ops import backend_module
from .._validation import accumulation_dtype, check_pair
from ..backends.pair import Coefs, Pair, Stats, lse
from ..objectives import _augmented
from ..objectives import uniformity as single_uniformity
from ..objectives._hardness import hard_query_rows
from ..objectives.multipositive import positive_dots, stacked_positives
from . import _comm

__all__ = [
    "align_loss",
    "cross_uniform_loss",
    "infonce_loss",
    "multi_positive_infonce_loss",
    "uniform_loss",
]

_INFONCE = Pair("rows")  # the positive of global row i at global column i
_UNIFORM = Pair("rows", positives=False, exclude_self=True)
_DENOMINATORS = Pair("rows", positives=False)


def scaled_layout(lay: _comm.Layout, k: int) -> _comm.Layout:
    """The layout of a tensor with ``k`` rows per row of ``lay``'s shards (K stacked
    batches, or V views): sizes k n_q, in rank order."""
    return dataclasses.replace(lay, sizes=[k * s for s in lay.sizes])


class RowsGather(torch.autograd.Function):
    """(row LSE (n,), positive LSE (n,) or (0,)) of this rank's rows ``a`` (n, D') against
    every rank's columns ``b`` (all-gathered (M, D'), layout ``cols``), at global row
    offset ``row_offset`` (the global column index of row 0's positive); ``groups``:
    optional (row ids (n,), column ids (M,)) int64 of the engine's group masking;
    ``positive_logits``: optional (n,) logits of the rows' positives (they receive dpos).
    ``augment_t > 0``: the uniformity sweep of a(a) against b(the gathered b)
    (``objectives/_augmented.py``): the features travel and are saved as given, the
    augmented rows are built in each direction, the gradients are a's and b's."""

    @staticmethod
    @autocast_off
    def forward(
        ctx, a, b, scale, bias, pair, lay, cols_lay, row_offset, backend, grad_scaling,
        groups=None, positive_logits=None, augment_t=0.0,
    ):  # fmt: skip
        cols = _comm.all_gather_rows(b, cols_lay)
        engine = backend_module(backend, "pair")
        rg, cg = (None, None) if groups is None else groups
        pl = positive_logits
        ctx.augment_t = augment_t
        sa, sc = _augmented.operands(a, cols, augment_t)
        st = engine.pair_forward(sa, sc, scale, bias, pair, row_offset, 0, rg, cg, pl)
        rows = lse(st.row_max, st.row_sum)
        pos = lse(st.pos_max, st.pos_sum) if pair.positives else rows.new_empty(0)
        saved = (st.row_max, st.row_sum) + ((st.pos_max, st.pos_sum) if pair.positives else ())
        ctx.save_for_backward(a, b, cols, scale, bias, pl, *saved)
        ctx.pair, ctx.lay, ctx.cols_lay, ctx.row_offset = pair, lay, cols_lay, row_offset
        ctx.backend, ctx.grad_scaling, ctx.groups = backend, grad_scaling, (rg, cg)
        ctx.b_dtype, ctx.has_bias = b.dtype, bias is not None
        return rows, pos

    @_comm.exchange_backward
    def backward(ctx, g_rows, g_pos):
        a, b, cols, scale, bias, pl, *pairs = ctx.saved_tensors
        lay, pair, t = ctx.lay, ctx.pair, ctx.augment_t
        acc = accumulation_dtype(a.dtype)
        stats = Stats(*pairs)
        coefs = Coefs(
            rows=g_rows.to(acc),
            pos_rows=-g_pos.to(acc) if pair.positives else None,  # L = .. - gpr LSE+
        )
        sa, sc = _augmented.operands(a, cols, t)
        g = backend_module(ctx.backend, "pair").pair_backward(
            sa, sc, scale, bias, pair, stats, coefs, ctx.row_offset, 0, *ctx.groups, pl, acc
        )
        da, db = _augmented.grads(a, b, t, g.da, _comm.reduce_scatter_rows(g.db, ctx.cols_lay))
        dscalars = _comm.all_reduce(torch.stack([g.dscale, g.dbias]).to(acc), lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        da, db = (da * factor).to(a.dtype), (db * factor).to(ctx.b_dtype)
        dbias = dscalars[1] if ctx.has_bias else None
        dpos = None if pl is None else g.dpos * factor
        return da, db, dscalars[0], dbias, *([None] * 7), dpos, None


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


class _Local(torch.autograd.Function):
    """Identity on per-row values of this rank's features alone (no exchange), whose
    feature gradients get the ``grad_scaling`` factor the exchanged terms get (W for
    "ddp")."""

    @staticmethod
    def forward(ctx, values, lay, grad_scaling):
        ctx.factor = lay.world if grad_scaling == "ddp" else 1
        return values.view_as(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return g * ctx.factor, None, None


class _Replicated(torch.autograd.Function):
    """Identity on a scalar every rank holds, for terms computed from this rank's rows
    only: its gradient is summed over ranks (each rank sees its rows' part)."""

    @staticmethod
    def forward(ctx, x, lay):
        ctx.lay = lay
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return _comm.all_reduce(g.detach().clone().reshape(1), ctx.lay)[0].reshape(g.shape), None


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
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """One-directional InfoNCE (:func:`flashcontrast.infonce_loss`, offset 0) over the
    global batch of a process group: each rank passes its queries and their keys, (n_r, D)
    each (n_r may differ, and be 0); query i's positive is key i of the global batch (the
    concatenation in rank order), every key of every rank is in its denominator. Every
    rank returns the single-process mean loss. Gradients, ``grad_scaling`` and the setup
    checks as :func:`flashcontrast.distributed.clip_loss`; ``strategy`` "gather" only.
    """
    opts = _comm.options("infonce_loss", options)
    lay, q, k, scale, bias, chosen = _comm.setup_pair(
        "infonce_loss", query, keys, logit_scale, logit_bias, opts, objective="infonce",
        ring=False,
    )  # fmt: skip
    args = (_INFONCE, lay, lay, lay.offset, chosen, opts.grad_scaling)
    rows, pos = RowsGather.apply(q, k, scale, bias, *args)
    return GlobalSum.apply((rows - pos).sum(), lay) / lay.total


def _uniformity(name: str, x: Tensor, y, t, group, strategy, backend, grad_scaling) -> Tensor:
    """log mean_{i != j} exp(-t ||x_i - y_j||^2) over the global batch (y = x when None):
    one row sweep of the local a(x) against the gathered b(y), a global logsumexp."""
    single_uniformity.check_t(t)

    def check():
        xs = _comm.check_shard("x", x)
        ys = None
        if y is not None:
            ys = _comm.check_shard("y", y)
            check_pair("x", xs, "y", ys)
        chosen = _comm.engine_backend("uniformity", backend, xs)
        return (xs, ys, chosen), *xs.shape, xs.dtype, xs.device, []

    lay, (xs, ys, chosen) = _comm.setup_checked(
        name, group, strategy, grad_scaling, backend, [], check, ring=False,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    if lay.total < 2:
        raise ValueError(f"{name} needs N >= 2 samples (pairs i != j), got N = {lay.total}")
    unit = torch.ones((), dtype=accumulation_dtype(xs.dtype), device=xs.device)
    args = (_UNIFORM, lay, lay, lay.offset, chosen, grad_scaling, None, None, float(t))
    rows, _ = RowsGather.apply(xs, xs if ys is None else ys, unit, None, *args)
    return _GlobalLSE.apply(rows, lay) - math.log(lay.total * (lay.total - 1))


def uniform_loss(
    x: Tensor,
    t: float = 2.0,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """Wang & Isola's uniformity (:func:`flashcontrast.uniform_loss`) of the global batch
    of a process group, N >= 2: log mean_{i < j} exp(-t ||x_i - x_j||^2) over the
    concatenation of every rank's (n_r, D) shard, the same value on every rank.
    Gradients and checks as :func:`flashcontrast.distributed.clip_loss` (``strategy``
    "gather" only; x gets W x its single-process gradient with "ddp").
    """
    group, strategy, backend, grad_scaling = _comm.options("uniform_loss", options)
    return _uniformity("uniform_loss", x, None, t, group, strategy, backend, grad_scaling)


def cross_uniform_loss(
    x: Tensor,
    y: Tensor,
    t: float = 2.0,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """Cross-modal uniformity (:func:`flashcontrast.cross_uniform_loss`) of the global
    batch, N >= 2: log mean_{i != j} exp(-t ||x_i - y_j||^2), i and j global indices into
    the concatenations of every rank's paired (n_r, D) shards x and y; the same value on
    every rank. The local rows of x sweep the all-gathered y, global row i's own column
    excluded. Gradients and checks as :func:`flashcontrast.distributed.clip_loss`
    (``strategy`` "gather" only).
    """
    group, strategy, backend, grad_scaling = _comm.options("cross_uniform_loss", options)
    return _uniformity("cross_uniform_loss", x, y, t, group, strategy, backend, grad_scaling)


def align_loss(
    x: Tensor, y: Tensor, alpha: float = 2.0, *, group=None, grad_scaling: str = "ddp"
) -> Tensor:
    """Wang & Isola's alignment (:func:`flashcontrast.align_loss`) of the global batch:
    mean_i ||x_i - y_i||^alpha over every rank's paired (n_r, D) shards, the same value
    on every rank (float32 for 16-bit features). No features travel: each rank sums its
    rows, one all-reduce of a scalar. Feature gradients W x the single-process ones with
    ``grad_scaling="ddp"``, 1x with "sum"; the setup checks as
    :func:`flashcontrast.distributed.clip_loss`.
    """

    def check():
        xs, ys = _comm.check_shard("x", x), _comm.check_shard("y", y)
        check_pair("x", xs, "y", ys)
        return (xs, ys), *xs.shape, xs.dtype, xs.device, []

    lay, (xs, ys) = _comm.setup_checked(
        "align_loss", group, "gather", grad_scaling, "auto", [], check, ring=False
    )
    values = single_uniformity.paired_distances(xs, ys, float(alpha))
    return GlobalSum.apply(_Local.apply(values, lay, grad_scaling).sum(), lay) / lay.total


def multi_positive_infonce_loss(
    anchors: Tensor,
    candidates: Tensor,
    logit_scale,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """1-to-K multi-positive InfoNCE (:func:`flashcontrast.multi_positive_infonce_loss`,
    both directions, ``positives=None``) over the global batch of a process group.

    Each rank passes its anchors (n_r, D) and their candidates (K, n_r, D): candidate k of
    anchor i at [k, i] (K the same on every rank). Globally, anchor i's K positives are
    its own candidates and every candidate of every rank is in every anchor's
    denominator; the single-process loss of the global anchors against the K stacked
    global batches is returned on every rank. The anchors' denominators are one row sweep
    against the all-gathered K N candidates; each candidate batch k is one row sweep
    against the all-gathered anchors, its positive the anchor at the same global index
    (K gathers of the anchors). Gradients and checks as
    :func:`flashcontrast.distributed.clip_loss` ("gather" only).
    """
    group, strategy, backend, grad_scaling = _comm.options("multi_positive_infonce_loss", options)

    def check():
        a = _comm.check_shard("anchors", anchors)
        if not isinstance(candidates, Tensor) or candidates.dim() != 3:
            raise ValueError(
                "candidates must be a (K, n_r, D) tensor: K candidate batches of this rank's "
                f"anchors, got {getattr(candidates, 'shape', type(candidates).__name__)}"
            )
        c = _comm.check_shard("candidates", candidates.reshape(-1, candidates.shape[-1]))
        k = candidates.shape[0]
        if k < 1 or candidates.shape[1:] != a.shape:
            raise ValueError(
                f"candidates must be (K >= 1, n_r, D) = (K, {a.shape[0]}, {a.shape[1]}), "
                f"got {tuple(candidates.shape)}"
            )
        check_pair("anchors", a, "candidates", c[: a.shape[0]])
        scale = _comm.scalar("logit_scale", logit_scale, a)
        chosen = _comm.engine_backend("infonce", backend, a)
        return (a, c, k, scale, chosen), *a.shape, a.dtype, a.device, [k]

    lay, (a, c, k, scale, chosen) = _comm.setup_checked(
        "multi_positive_infonce_loss", group, strategy, grad_scaling, backend,
        ["number of candidate batches K"], check, ring=False, backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    n = a.shape[0]
    rows, _ = RowsGather.apply(
        a, c, scale, None, _DENOMINATORS, lay, scaled_layout(lay, k), 0, chosen, grad_scaling
    )
    listed = stacked_positives(n, k, a.device)
    dots = _Local.apply(positive_dots(a, c, listed).mean(1), lay, grad_scaling)
    rows = rows - _Replicated.apply(scale, lay) * dots  # LSE_j S_ij - (1/K) sum_k S_i,p_ik
    cols = rows.new_zeros(())
    for b in range(k):
        args = (_INFONCE, lay, lay, lay.offset, chosen, grad_scaling)
        lse_b, pos_b = RowsGather.apply(c[b * n : (b + 1) * n], a, scale, None, *args)
        cols = cols + (lse_b - pos_b).sum()
    total = lay.total
    return 0.5 * (
        GlobalSum.apply(rows.sum(), lay) / total + GlobalSum.apply(cols, lay) / (k * total)
    )


def gathered_query_rows(
    queries: Tensor,
    docs: list,
    logit_scale,
    *,
    directions: tuple = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness: Optional[tuple] = None,
    group=None,
    backend: str = "auto",
) -> Tensor:
    """(n_r,) log Z_i - s <q_i, d^+_i> for this rank's queries against EVERY rank's
    embeddings: sentence-transformers' ``gather_across_devices=True`` score rows without
    its (n_r, N (1 + H)) matrices.

    ``queries`` (n_r, D) and ``docs`` (1 + H tensors (n_r, D): the positives, then the
    hard negatives) are this rank's. Each direction is one row sweep of this rank's rows
    against every rank's columns, all-gathered (the documents stacked per rank, positives
    first: global query o_r + i owns the columns K o_r + c n_r + i):

    - ``query_to_doc``: queries vs all N (1 + H) documents, the positive at column K o_r + i;
    - ``query_to_query``: queries vs all N queries, the query itself excluded;
    - ``doc_to_query``: positives vs all N queries;
    - ``doc_to_doc``: positives vs all documents, every document of the same query
      excluded (groups: the global query index).

    ``hardness``: the package's (hardness_mode, hardness_strength > 0) on query_to_doc,
    or None (``objectives/_hardness.py``; the own hard negatives left out of the sweep by
    groups of the global query index, as in doc_to_doc).

    log Z_i is the logsumexp of the directions' row logsumexps (``partition_mode``
    "joint") or their mean ("per_direction"), as the package's. Gradients as
    ``torch.distributed.nn.all_gather``'s, which the package uses: every rank
    differentiates its own loss of these rows, and each rank's embeddings get the sum of
    every rank's gradients (grad_scaling "sum": 1x)."""
    k = len(docs)

    def check():
        q = _comm.check_shard("queries", queries)
        for j, d in enumerate(docs):
            check_pair("queries", q, f"docs[{j}]", _comm.check_shard(f"docs[{j}]", d))
        scale = _comm.scalar("logit_scale", logit_scale, q)
        chosen = _comm.engine_backend("infonce", backend, q)
        values = [k, _direction_code(directions), hardness is not None]
        return (q, scale, chosen), *q.shape, q.dtype, q.device, values

    lay, (q, scale, chosen) = _comm.setup_checked(
        "gathered_query_rows", group, "gather", "sum", backend,
        ["number of document columns", "directions", "hardness given"], check, ring=False,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    stacked = torch.cat(list(docs)) if k > 1 else docs[0]
    docs_lay, o = scaled_layout(lay, k), lay.offset
    groups = None  # (each row's global query index, each gathered document's)
    if hardness is not None or "doc_to_doc" in directions:
        groups = (o + torch.arange(q.shape[0], device=q.device), torch.cat([
            start + torch.arange(k * size, device=q.device) % max(size, 1)
            for start, size in zip(lay.offsets, lay.sizes)
        ]))  # fmt: skip
    if hardness is None:
        args = (_INFONCE, lay, docs_lay, k * o, chosen, "sum")
        rows, pos = RowsGather.apply(q, stacked, scale, None, *args)
    else:

        def in_batch_rows(a, b, s, pl):
            args = (_INFONCE, lay, docs_lay, k * o, chosen, "sum", groups, pl)
            return RowsGather.apply(a, b, s, None, *args)[0]

        rows, pos = hard_query_rows(
            q, stacked, k, scale, float(logit_scale), *hardness, in_batch_rows
        )
    terms = [rows]
    if "query_to_query" in directions:
        terms.append(RowsGather.apply(q, q, scale, None, _UNIFORM, lay, lay, o, chosen, "sum")[0])
    if "doc_to_query" in directions:
        args = (_DENOMINATORS, lay, lay, o, chosen, "sum")
        terms.append(RowsGather.apply(docs[0], q, scale, None, *args)[0])
    if "doc_to_doc" in directions:
        args = (_UNIFORM, lay, docs_lay, k * o, chosen, "sum", groups)
        terms.append(RowsGather.apply(docs[0], stacked, scale, None, *args)[0])
    return log_partition(terms, partition_mode) - pos


def log_partition(terms: list, partition_mode: str) -> Tensor:
    """sentence-transformers' log Z (n,) from the directions' row logsumexps ``terms``
    (each (n,)): one softmax over the concatenated rows ("joint": their logsumexp) or the
    mean of the per-direction ones ("per_direction")."""
    if len(terms) == 1:
        return terms[0]
    if partition_mode == "joint":
        return torch.logsumexp(torch.stack(terms), 0)
    return torch.stack(terms).mean(0)


_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _direction_code(directions: tuple) -> int:
    """The direction set as bits, for the setup's agreement check (ValueError for a name
    that is not a direction)."""
    unknown = set(directions) - set(_DIRECTIONS)
    if unknown or "query_to_doc" not in directions:
        raise ValueError(
            f"directions must include 'query_to_doc' and be among {_DIRECTIONS}, got {directions!r}"
        )
    return sum(1 << i for i, name in enumerate(_DIRECTIONS) if name in directions)
