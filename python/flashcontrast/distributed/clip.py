"""CLIP InfoNCE over a process group: the "gather" and "ring" strategies, on the pair engine.

Rank r holds rows [o_r, o_r + n_r) of A (images) and B (texts); N = sum n_q. With
S = s A B^T + b over the global batch,
L = 1/2 [ (1/N) sum_i (LSE_j S_ij - S_ii) + (1/N) sum_j (LSE_i S_ij - S_jj) ].
Every rank sweeps only its rows of S (its images against the texts in hand) with the pair
engine (``backends/pair.py``, on the backend ``backend=`` resolves to), ``Pair("softmax")``
at row offset o_r and the column block's offset, so the positive of global row i is global
column i wherever the block sits:

* row (max, sum) pairs of its rows are complete locally (merged over the column blocks of
  the ring with ``merge_lse``), and so are the positives' (S_ii, 1);
* column pairs are partial (over its rows) and are merged across ranks: exactly, by
  :func:`_comm.pair_all_reduce` (max, then the rescaled sums) for "gather", or as one
  logsumexp per column (logaddexp) in an accumulator that travels around the ring behind
  the text shard for "ring" (one float per column, as the byte table counts);
* backward: the engine's backward from the merged statistics with the loss's coefficients
  (below); dA_r is local; dB_j sums contributions of every rank, routed to the owner by a
  reduce-scatter ("gather") or by an accumulator travelling with the shard ("ring"),
  summed in the accumulation dtype (``out_dtype``) and rounded once.

Coefficients (``Coefs``, L = sum_i gr_i LSE_i - gpr_i LSE+_i + sum_j gc_j LSE_j - gpc_j
LSE+_j): with c = g / (2N) (g the upstream gradient), gr_i = gc_j = c. Column j's only
positive is S_jj, row j's positive, so LSE+_col_j = LSE+_row_j = S_jj and the two positive
terms are one, -2c sum_i LSE+_i: gpr_i = 2c, gpc = None (0). So no column positive
statistic ever travels, and dS_ii = ... - 2c Q_ii with Q_ii = exp((S_ii - S_ii) - log 1) =
1 exactly, the positive subtracted inside the tile.

Groups (``groups=``, each rank's (n_r,) integer ids; ids are global: equal ids on
different ranks are one group): the engine's masked set, different samples (global
row != global column) with equal ids, left out of the row and the column statistics and
without gradient; the positive S_ii always stays. The ids of the columns in hand reach the
engine as ``col_groups``: "gather" all-gathers them (int64) with the texts, "ring" sends
them along with the travelling text shard (in the backward too). A partial column pair may
be empty (every local row masked for that column); the owner's part always holds the
positive, so the merged one is not.

Bytes sent per rank (the notation of :mod:`flashcontrast.distributed`: W ranks, equal
shards of n rows, D features, e bytes per feature element, f per statistic; ar(x) =
2(W-1)/W x for an all-reduce; metadata (W-1) 72, with or without bias and groups):

* "gather": forward (W-1) n D e + ar(N f) + ar((N + 2) f) [+ (W-1) n 8 with groups];
  backward (W-1) n D f + ar(f) + ar(2 f).
* "ring": forward (W-1) n D e + (W-1) n f + ar(f) [+ (W-1) n 8]; backward
  (W-1) n D e + (W-1) n f [+ (W-1) n 8] + (W-1) n D f + ar(f) + ar(2 f).

(ar(N f) is the column maxima, ar((N + 2) f) the rescaled column sums with the sums of the
row and positive logsumexps; ar(f) in the backward is the upstream-gradient mean, ar(2 f)
the (d scale, d bias) all-reduce.) The ids add 8 (W-1) n bytes for "gather" (all-gathered
once, padded to n_max rows for uneven shards, kept for the backward) and 16 (W-1) n for
"ring" (sent in the forward and again in the backward), against (W-1) n D (e + f) and
(W-1) n D (2e + f) for the features.

The "ring" backward forms the column softmax from the travelled float logsumexp, as the
pair (lse, 1): exp((S - lse) - log 1); at extreme logit scales that carries the rounding
of an f-byte lse (~|lse| 2^-24 relative in P for float32, what
tests/verification.clip_lse_rounding_allowance bounds), which "gather"'s exact pairs do
not.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from .._ops import backend_module
from .._validation import accumulation_dtype
from ..backends.pair import Coefs, Pair, Stats, lse, merge_lse
from . import _comm

#: CLIP on the pair engine: row and column softmaxes, the positive of row i at column i.
PAIR = Pair("softmax")


class LocalRows:
    """This rank's side of every tile, shared by CLIP and SigLIP and by both strategies:
    rows ``a`` (n, D) in the input dtype at global rows ``offset`` .., their ids
    ``groups`` ((n,) int64, or None), ``scale`` and ``bias`` (0-d, accumulation dtype),
    and the engine of ``backend``. :meth:`stats` and :meth:`grads` sweep them against one
    block of columns; :meth:`grads` sums dA (n, D), d scale and d bias over the blocks."""

    def __init__(self, a, scale, bias, groups, offset: int, backend: str) -> None:
        self.a, self.scale, self.bias, self.groups, self.offset = a, scale, bias, groups, offset
        self.engine = backend_module(backend, "pair")
        self.acc = accumulation_dtype(a.dtype)
        self.da: Optional[Tensor] = None  # the backward's sums (N > 0: some block sets it)
        self.dscalars = torch.zeros(2, dtype=self.acc, device=a.device)  # d scale, d bias

    def _ids(self, col_groups: Optional[Tensor]) -> tuple:
        return (None, None) if self.groups is None else (self.groups, col_groups)

    def stats(
        self, pair: Pair, cols: Tensor, col_offset: int, col_groups: Optional[Tensor]
    ) -> Optional[Stats]:
        """The engine's statistics of the local rows against ``cols`` (m, D), global
        columns ``col_offset`` .. (ids ``col_groups`` (m,) with groups): row pairs (n,),
        partial column pairs (m,), or the 0-d total ("sigmoid"). None for m = 0 (a visiting
        empty shard: no entries, nothing to fold)."""
        if cols.shape[0] == 0:
            return None
        rg, cg = self._ids(col_groups)
        return self.engine.pair_forward(
            self.a, cols, self.scale, self.bias, pair, self.offset, col_offset, rg, cg, None
        )

    def grads(
        self,
        pair: Pair,
        cols: Tensor,
        col_offset: int,
        col_groups: Optional[Tensor],
        stats: Stats,
        coefs: Coefs,
    ) -> Tensor:
        """The engine's backward of the local rows against ``cols`` (m, D) (arguments as
        :meth:`stats`; ``stats``: the merged row pairs (n,) and column pairs (m,),
        ``coefs`` the loss's): adds dA (n, D), d scale and d bias to the sums and returns
        this block's dB (m, D), all in the accumulation dtype (partial sums, rounded
        once at the end)."""
        if cols.shape[0] == 0:
            return cols.new_zeros(cols.shape, dtype=self.acc)
        rg, cg = self._ids(col_groups)
        g = self.engine.pair_backward(
            self.a, cols, self.scale, self.bias, pair, stats, coefs, self.offset, col_offset,
            rg, cg, None, self.acc,
        )  # fmt: skip
        self.da = g.da if self.da is None else self.da.add_(g.da)
        self.dscalars += torch.stack([g.dscale, g.dbias]).to(self.acc)
        return g.db

    def finish(self, db: Tensor, lay: _comm.Layout, grad_scaling: str, has_bias: bool) -> tuple:
        """(dA (n, D), dB (n, D) in the input dtype, d scale, d bias or None): d scale and
        d bias summed over ranks (an all-reduce of 2 f), the features' gradients times W
        for ``grad_scaling="ddp"`` and rounded once."""
        _comm.all_reduce(self.dscalars, lay)
        factor = lay.world if grad_scaling == "ddp" else 1
        dtype = self.a.dtype
        dbias = self.dscalars[1] if has_bias else None
        return (self.da * factor).to(dtype), (db * factor).to(dtype), self.dscalars[0], dbias


def _with_ids(travel: list, groups: Optional[Tensor]) -> list:
    """The ring's travelling tensors, with the shard's ids (n_q,) last when grouped."""
    return travel if groups is None else [*travel, groups]


def _rows_pairs(st: Stats) -> tuple:
    """The row and positive pairs of a sweep: (row_max, row_sum, pos_max, pos_sum) (n,)."""
    return st.row_max, st.row_sum, st.pos_max, st.pos_sum


def _merge_rows(acc: Optional[tuple], st: Optional[Stats]) -> Optional[tuple]:
    """Fold one column block's row and positive pairs into ``acc`` (merge_lse, exact)."""
    if st is None:
        return acc
    new = _rows_pairs(st)
    if acc is None:
        return new
    return (*merge_lse(acc[0], acc[1], new[0], new[1]), *merge_lse(acc[2], acc[3], new[2], new[3]))


def _coefs(c: Tensor, n: int, m: int) -> Coefs:
    """CLIP's coefficients for n rows and m columns: gr = gc = c, gpr = 2c (module doc)."""
    return Coefs(rows=c.expand(n).contiguous(), pos_rows=(2 * c).expand(n).contiguous(),
                 cols=c.expand(m).contiguous())  # fmt: skip


def _gather_forward(rows: LocalRows, b: Tensor, lay: _comm.Layout) -> tuple:
    """(loss, saved): texts (and ids) all-gathered, one sweep against all N columns, the
    column pairs merged over ranks exactly with the row and positive LSE sums along."""
    b_all = _comm.all_gather_rows(b, lay)
    g_all = None if rows.groups is None else _comm.all_gather_rows(rows.groups, lay)
    st = rows.stats(PAIR, b_all, 0, g_all)  # N > 0: never None
    row_pairs = _rows_pairs(st)
    sums = torch.stack([lse(st.row_max, st.row_sum).sum(), lse(st.pos_max, st.pos_sum).sum()])
    col_max, col_sum, tot = _comm.pair_all_reduce(st.col_max, st.col_sum, sums, lay)
    loss = 0.5 * (tot[0] + lse(col_max, col_sum).sum() - 2 * tot[1]) / lay.total
    return loss, (b_all, g_all, *row_pairs, col_max, col_sum)


def _ring_forward(rows: LocalRows, b: Tensor, lay: _comm.Layout) -> tuple:
    """(loss, saved): text shards around the ring; row pairs merged locally, each
    column's partial logsumexp travelling behind its shard (logaddexp) to the owner."""
    acc: list = [None]

    def visit(q, shard):
        gy = None if rows.groups is None else shard[1]
        st = rows.stats(PAIR, shard[0], lay.offsets[q], gy)
        acc[0] = _merge_rows(acc[0], st)
        if st is None:
            return shard[0].new_empty(0, dtype=rows.acc)
        return lse(st.col_max, st.col_sum)

    col_lse = _comm.ring_pass(lay, _with_ids([b], rows.groups), visit, torch.logaddexp)
    row_pairs = acc[0]  # N > 0: some shard is not empty, and its visit set the pairs
    row_lse, pos_lse = lse(*row_pairs[:2]), lse(*row_pairs[2:])
    part = (row_lse.sum() + col_lse.sum() - 2 * pos_lse.sum()).reshape(1)
    loss = 0.5 * _comm.all_reduce(part, lay)[0] / lay.total
    return loss, (b, None, *row_pairs, col_lse, torch.ones_like(col_lse))


class _ClipDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, a, b, scale, bias, groups, lay, strategy, grad_scaling, backend):
        rows = LocalRows(a, scale, bias, groups, lay.offset, backend)
        run = _gather_forward if strategy == "gather" else _ring_forward
        loss, saved = run(rows, b, lay)
        # saved: the columns (all of B, or this shard), their ids, the row and positive
        # pairs (n,), the merged column pairs of those columns (N,) or (n_r,)
        ctx.save_for_backward(a, scale, bias, groups, *saved)
        ctx.lay, ctx.strategy, ctx.grad_scaling = lay, strategy, grad_scaling
        ctx.backend, ctx.has_bias = backend, bias is not None
        return loss

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        a, scale, bias, groups, cols, g_cols, *pairs = ctx.saved_tensors
        rmax, rsum, pmax, psum, cmax, csum = pairs
        lay = ctx.lay
        rows = LocalRows(a, scale, bias, groups, lay.offset, ctx.backend)
        c = _comm.mean_upstream(grad_loss, lay, rows.acc) / (2 * lay.total)
        row_stats = dict(row_max=rmax, row_sum=rsum, pos_max=pmax, pos_sum=psum)
        if ctx.strategy == "gather":  # cols is all of B, (cmax, csum) its merged pairs
            st = Stats(**row_stats, col_max=cmax, col_sum=csum)
            coefs = _coefs(c, a.shape[0], cols.shape[0])
            db = _comm.reduce_scatter_rows(rows.grads(PAIR, cols, 0, g_cols, st, coefs), lay)
        else:

            def visit(q, shard):  # shard: texts, their column LSEs (as pairs (lse, 1)), ids
                st = Stats(**row_stats, col_max=shard[1], col_sum=torch.ones_like(shard[1]))
                gy = None if groups is None else shard[2]
                coefs = _coefs(c, a.shape[0], shard[0].shape[0])
                return rows.grads(PAIR, shard[0], lay.offsets[q], gy, st, coefs)

            db = _comm.ring_pass(lay, _with_ids([cols, cmax], groups), visit, torch.add)
        grads = rows.finish(db, lay, ctx.grad_scaling, ctx.has_bias)
        return (*grads, None, None, None, None, None)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    groups: Optional[Tensor] = None,
    **options: Unpack[_comm.ProcessGroupOptions],
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
        **options: the process-group keywords, each optional, the same four for every
            loss here (:class:`flashcontrast.distributed.ProcessGroupOptions`):
        group: the process group (None: the default group).
        strategy: "gather" (all-gather the texts once) or "ring" (text shards travel
            around the ring by point-to-point send/recv). See
            :mod:`flashcontrast.distributed`.
        backend: the pair engine's backend for the local tiles: "auto" (as
            :func:`flashcontrast.clip_loss` picks it for the features' device and
            dtype: "torch" for CPU tensors), "torch", "triton", "cuda", or "reference"
            (the "torch" tiles). An explicit backend that cannot run on some rank
            raises on every rank.
        grad_scaling: "ddp" or "sum" (see above).

    ``strategy``, ``backend`` and ``grad_scaling`` must be the same on every rank
    (checked with D, dtype, bias and groups given or not in one metadata exchange: a
    mismatch, or a failed check on one rank, raises on every rank). Every rank must
    call the loss and its backward (both communicate).
    """
    opts = _comm.options("clip_loss", options)
    lay, a, b, scale, bias, chosen = _comm.setup_pair(
        "clip_loss", image_features, text_features, logit_scale, logit_bias, opts, groups,
        objective="clip",
    )  # fmt: skip
    ids = None if groups is None else groups.to(torch.int64)  # checked by setup
    return _ClipDist.apply(a, b, scale, bias, ids, lay, opts.strategy, opts.grad_scaling, chosen)
