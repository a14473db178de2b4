"""Symile over a process group: "n" ("gather" and "ring") on the pair engine, and
"n_squared" (M = 3, "gather").

Rank r holds rows R_r = [o_r, o_r + n_r) of every modality x^1..x^M; N = sum n_q. For
anchor a, column j of the logits is W^a_j = prod_k x^{o_k}[pi_ak(j)] (the other
modalities o_1 < o_2 < ... in list order, pi = perm[a, k] GLOBAL index maps into range(N)),
column i replaced by the positive s MIP_i;
L = 1/(M N) sum_a sum_i (LSE_j S^a_ij - s MIP_i). The loss is row-only: no column
statistics are needed. The tiles are sweeps of the pair engine (``backends/pair.py``) of
the backend ``backend=`` resolves to (``_comm.engine_backend``, among the setup checks),
``Pair("rows")`` with the positive logits s MIP as the override, as
``objectives/_symile_n.py`` runs them in one process: rows at their global offset, columns
at theirs, so the positive of global row i is global column i wherever the block sits.

"gather": the (N, M, D) representations are all-gathered once, every rank builds W^a
(N, D) and sweeps its anchor rows against it, one scalar all-reduce. Backward: the
engine's backward per anchor (dA, dW^a and the positive's gradient from the override, in
the accumulation dtype) reaches the gathered representations through the products W^a
(product rule, index_add_), and a reduce-scatter routes them to their owners.

"ring": no rank holds more than its own shard, two foreign shards, and the factor rows of
its own columns. Rank r OWNS columns R_r of every W^a:

1. one all-to-all (:func:`_comm.all_to_all_rows`) sends every owner the M (M-1) n_r
   factor rows x^{o_k}[pi_ak(j)], j in R_r, that it does not hold (kept, in the input
   dtype, for the backward); the owner builds its column shard W^a[R_r] (M, n_r, D) in
   the accumulation dtype;
2. the ANCHOR shards x_q (n_q, M, D) travel the ring (:func:`_comm.ring_pass`, the next
   transfer overlapping the compute); rank r folds the LSE of every visiting anchor row
   over its own columns (diagonal override when the visitor is its own shard) into a
   partial row LSE (n_q, M) that travels behind the shard back to its owner (logaddexp),
   like CLIP's column LSEs;
3. backward: the ring again with (x_q, row LSE_q); the engine's backward of the tile
   (the row softmax from the travelled logsumexp as the pair (lse, 1), as CLIP "ring"
   forms its column softmax) gives dx_q = s dS W (an accumulator (n_q, M, D) travelling
   behind x_q to its owner) and dW = s dS^T x_q, which stays with the columns' owner; the
   chain rule through the products gives the factor rows' gradients, scatter-added
   (index_add_) locally or sent back to the rows' owners by the reverse all-to-all.

Why anchors travel and not the column shards (the other obvious design): the two move the
same number of elements, but anchors travel in the INPUT dtype (e bytes) while W^a is
built in the accumulation dtype (f >= e; half the traffic for bf16/fp16), and W^a and dW
never leave their owner, so the chain rule into the factor rows needs no extra hop; the
price is the partial row LSEs, (W - 1) n M statistics. Memory: x_r, two foreign (n, M, D)
shards and one accumulator, W^a[R_r] and dW (M, n_r, D) and the factor rows
(M, M-1, n_r, D): O(M^2 n D), never O(N D). Duplicate factor rows (one row needed by two
of an owner's columns) are sent twice (no deduplication).

Bytes sent per rank r, forward + backward (notation of :mod:`flashcontrast.distributed`;
ar(x) = 2(W-1)/W x truncated per call; r+1 taken mod W), with
A_r = #{(a, k, j): j not in R_r, pi_ak(j) in R_r} (factor rows r sends) and
B_r = #{(a, k, j): j in R_r, pi_ak(j) not in R_r} (factor rows r receives; A_r = B_r when
every pi_ak is a permutation, E = M (M-1) n (W-1)/W for random ones with equal shards):

* metadata (W-1) 96 (F = 5 fields: M, permutations given, their N, their checksum,
  negative_sampling) [+ M (M-1) N 8 for the broadcast permutations, when drawn];
* forward: A_r D e + (N - n_{r+1}) M D e + (N - n_r) M f + ar(f);
* backward: ar(f) + (N - n_{r+1}) M (D e + f) + (N - n_r) M D f + B_r D f + ar(f).

Equal shards: forward (W-1) n M D e + A D e + (W-1) n M f + ar(f); backward
(W-1) n M (D e + f) + (W-1) n M D f + B D f + 2 ar(f). Dominant, random permutations:
(W-1) n M D (2e + f + (M-1)(e + f)/W). Measured by tests/test_distributed_symile_ring.py
(which asserts the formula for W = 1..4): W = 4, n = 256, D = 512, float32, M = 3, one
draw of random permutations: 18,753,842 to 18,970,930 bytes per rank (expectation
18,893,106; "gather": 9,437,490). Twice "gather", as CLIP "ring" is: nothing O(N D) is
kept between forward and backward, so the anchors travel twice.

Permutations: the single-process loss draws ONE (M, M-1, N) tensor with
``symile_negative_permutations(M, N, generator=generator)`` (the default CPU generator
when ``generator`` is None). Here group rank 0 draws it the same way with the GLOBAL N
(from its ``generator``, or its default generator) and broadcasts it, so the loss equals
``flashcontrast.symile_loss`` of the concatenated batch run with the generator state of
rank 0; other ranks' generators are neither read nor advanced. Explicit ``permutations``
(M, M-1, N) with global row indices must be identical on every rank (a checksum in the
metadata exchange verifies it: a mismatch raises on every rank). They need not be
permutations (any index maps into range(N) are accepted, as in one process).

"n_squared" (M = 3, "gather" only): the candidates of anchor row i are all N^2 pairs (j, k)
of the other two modalities, the positive (i, i) among them, so the rank's rows need the
gathered others and no offset: LSE_i over the N^2 pairs minus the local s MIP_i. The rank's
part is the symile_n2 tiles of n rows against m columns of the named backend: "torch"
(``backends/blockwise/symile.py``, any device: its BLAS), "triton" or "cuda" (their
rectangular kernels; "auto" as the single-process loss resolves it).
The per-row cross entropies are clamped at 0 in value as in one process. Bytes as Symile
"gather" without permutations: forward (W-1) n M D e + ar(f), backward
(W-1) n M D f + 2 ar(f), metadata (W-1) 96.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from .._ops import backend_module
from .._sampling import symile_negative_permutations
from .._validation import accumulation_dtype
from ..backends.pair import Coefs, Stats, lse
from ..objectives._symile_n import PAIR, _product, add_factor_gradients, add_positive_gradient, mip
from ..objectives.symile import _check_representations, _permutations
from . import _comm

#: negative_sampling values, coded in the metadata exchange
NEGATIVE_SAMPLING = ("n", "n_squared")

# ----------------------------------------------------------------------------- "gather"


def _factors(cols: Tensor, perms: Tensor, a: int, acc: torch.dtype) -> list:
    """The permuted others of anchor a from the gathered (N, M, D) representations:
    [x^{o_k}[pi_ak] for k] (N, D) each, in ``acc``."""
    others = [o for o in range(cols.shape[1]) if o != a]
    return [cols[perms[a, k], o].to(acc) for k, o in enumerate(others)]


def _rows(x: Tensor) -> list:
    """The M modalities of x (n, M, D) as contiguous (n, D) tensors (the engine's rows)."""
    return [x[:, k].contiguous() for k in range(x.shape[1])]


def _finish_forward(ctx, part: Tensor, m: int, lay: _comm.Layout, grad_scaling, backend, *saved):
    """The loss, (1 / (M N)) times the sum over ranks of ``part`` (0-d, this rank's sum of
    cross entropies), with ``saved`` and the call's state kept on ``ctx`` for the backward
    (which :func:`_start_backward` reads)."""
    ctx.save_for_backward(*saved)
    ctx.lay, ctx.grad_scaling, ctx.backend = lay, grad_scaling, backend
    return _comm.all_reduce(part.reshape(1), lay)[0] / (m * lay.total)


def _start_backward(ctx, grad_loss: Tensor) -> tuple[tuple, int, int, torch.dtype, Tensor]:
    """(the tensors :func:`_finish_forward` saved, n, M, the accumulation dtype, c) of a
    backward: c = g / (M N) (0-d) is the coefficient of every row's cross entropy in the
    loss, g the upstream gradient averaged over ranks."""
    saved = ctx.saved_tensors
    n, m = saved[0].shape[:2]  # x (n_r, M, D)
    acc = accumulation_dtype(saved[0].dtype)
    coef = _comm.mean_upstream(grad_loss, ctx.lay, acc) / (m * ctx.lay.total)
    return saved, n, m, acc, coef


class _SymileDist(torch.autograd.Function):
    """Symile "n", "gather": per anchor one engine sweep ``Pair("rows")`` of the local
    rows (global rows o_r ..) against W^a (all N columns, offset 0) with the positive
    logits s MIP as the override (the positive of global row i is column i); W^a built
    from the gathered representations, rebuilt in the backward; dW^a reaches the
    gathered representations by the product rule and a reduce-scatter routes them to
    their owners."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, scale, perms, lay, grad_scaling, backend):
        # x: (n_r, M, D) local representations
        acc = accumulation_dtype(x.dtype)
        engine = backend_module(backend, "pair")
        n, m, _ = x.shape
        cols = _comm.all_gather_rows(x, lay)  # (N, M, D)
        reps = _rows(x)
        p = scale * mip(reps, acc)  # (n,)
        row_max = torch.full((m, n), float("-inf"), dtype=acc, device=x.device)
        row_sum = torch.zeros((m, n), dtype=acc, device=x.device)
        if n > 0:
            for a in range(m):
                w = _product(_factors(cols, perms, a, acc), acc).to(x.dtype)
                st = engine.pair_forward(
                    reps[a], w, scale, None, PAIR, lay.offset, 0, None, None, p
                )
                row_max[a], row_sum[a] = st.row_max, st.row_sum
        part = lse(row_max, row_sum).sum() - m * p.sum()
        saved = (x, scale, perms, cols, row_max, row_sum)
        return _finish_forward(ctx, part, m, lay, grad_scaling, backend, *saved)

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        (x, scale, perms, cols, row_max, row_sum), n, m, acc, coef = _start_backward(ctx, grad_loss)
        lay = ctx.lay
        engine = backend_module(ctx.backend, "pair")
        reps = _rows(x)
        p = scale * mip(reps, acc)
        d = [torch.zeros(r.shape, dtype=acc, device=x.device) for r in reps]
        dcols = [torch.zeros(cols[:, 0].shape, dtype=acc, device=x.device) for _ in range(m)]
        dp = (-m * coef).expand(n).clone()  # d ce_a / d p = -1 for every anchor
        dscale = torch.zeros((), dtype=acc, device=x.device)
        for a in range(m if n > 0 else 0):
            factors = _factors(cols, perms, a, acc)
            w = _product(factors, acc).to(x.dtype)
            g = engine.pair_backward(
                reps[a], w, scale, None, PAIR, Stats(row_max=row_max[a], row_sum=row_sum[a]),
                Coefs(rows=coef.expand(n).contiguous()), lay.offset, 0, None, None, p, acc,
            )  # fmt: skip
            d[a] += g.da
            dp += g.dpos
            dscale += g.dscale
            add_factor_gradients(dcols, factors, perms, a, g.db, acc)
        dscale = (dscale + add_positive_gradient(d, reps, scale, dp, acc)).reshape(1)
        dx = torch.stack(d, 1) + _comm.reduce_scatter_rows(torch.stack(dcols, 1), lay)
        dx, dscale = _comm.round_grads(dx, x, dscale, scale, lay, ctx.grad_scaling)
        return dx, dscale, None, None, None, None


# ----------------------------------------------------------------------------- "n_squared"
# A rank's n_r rows meet all N gathered columns (n_r != N for W > 1): every backend's
# symile_n2 tiles ("torch", "triton", "cuda") take n rows against m columns. No offset is
# needed: the LSE runs over all N^2 tuples, the positive (i, i) among them, and the
# positive logit s MIP_i is local.


class _SymileN2Dist(torch.autograd.Function):
    """Symile "n_squared", M = 3, "gather": the (N, M, D) representations all-gathered,
    per anchor the local rows' LSE over all N^2 pairs of the other two (gathered), the
    per-row cross entropies LSE - s MIP (value clamped at 0 as in one process); backward:
    the gathered others' gradients reduce-scattered to their owners."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, scale, lay, grad_scaling, backend):
        acc = accumulation_dtype(x.dtype)
        m = x.shape[1]
        cols = _comm.all_gather_rows(x, lay)  # (N, M, D)
        ya = cols.to(acc)
        xa = x.to(acc)
        others = [[o for o in range(m) if o != a] for a in range(m)]
        tiles = backend_module(backend, "symile")
        row_lse = torch.stack(
            [
                tiles.symile_n2_forward(xa[:, a], *(ya[:, o] for o in others[a]), scale)
                for a in range(m)
            ]
        )  # (M, n)
        ce = row_lse - scale * mip(_rows(x), acc)
        part = ce.clamp_min(0).sum()
        return _finish_forward(ctx, part, m, lay, grad_scaling, backend, x, scale, cols, row_lse)

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        (x, scale, cols, row_lse), n, m, acc, coef = _start_backward(ctx, grad_loss)
        lay = ctx.lay
        xa, ya = x.to(acc), cols.to(acc)
        dx = torch.zeros_like(xa)
        dy = torch.zeros_like(ya)
        dscale = torch.zeros((), dtype=acc, device=x.device)
        g = coef.expand(n).contiguous()
        tiles = backend_module(ctx.backend, "symile")
        for a in range(m):
            o1, o2 = [o for o in range(m) if o != a]
            da, d1, d2, ds = tiles.symile_n2_backward(
                xa[:, a], ya[:, o1], ya[:, o2], scale, row_lse[a], g
            )
            dx[:, a] += da
            dy[:, o1] += d1
            dy[:, o2] += d2
            dscale += ds
        d = [dx[:, k] for k in range(m)]  # views: the positive's gradient lands in dx
        dp = (-m * coef).expand(n)  # d ce_a / d p = -1: p = s MIP
        dscale = (dscale + add_positive_gradient(d, _rows(x), scale, dp, acc)).reshape(1)
        dx += _comm.reduce_scatter_rows(dy, lay)
        dx, dscale = _comm.round_grads(dx, x, dscale, scale, lay, ctx.grad_scaling)
        return dx, dscale, None, None, None


# ----------------------------------------------------------------------------- "ring"


@dataclass
class _RingPlan:
    """Who sends which factor rows to whom, the same on every rank (derived from perms).

    Rank r's factor rows are F[a, k, j] = x^{o_k}[pi_ak(j)], j in R_r, flattened in
    (a, k, j) order to M (M-1) n_r positions. ``recv_pos[p]``: the positions whose row
    lives on rank p, in order (rank p sends them in that order); ``send_rows[q]``: for
    every other rank q, the rows of this rank's x, flattened (n_r M,) as row * M +
    modality, that q's positions need, in q's order (``send_rows[r]``: the local ones,
    matching ``recv_pos[r]``)."""

    recv_pos: list
    send_rows: list

    def send_counts(self, rank: int) -> list:
        return [0 if q == rank else t.numel() for q, t in enumerate(self.send_rows)]

    def recv_counts(self, rank: int) -> list:
        return [0 if p == rank else t.numel() for p, t in enumerate(self.recv_pos)]


def _plan(perms: Tensor, lay: _comm.Layout) -> _RingPlan:
    """The all-to-all plan of rank ``lay.rank`` for perms (M, M-1, N) (global indices in
    range(N), checked by the caller).

    Built on the CPU (one device-to-host copy of ``perms`` when they are on a GPU): the
    split sizes of the all-to-all are host integers anyway, and on the GPU each boolean
    selection below would be a host synchronization (2 W + 1 per call). The index tensors
    then go to the features' device (``lay.device``) in ONE host-to-device copy, so the
    gathers / index_add_ of :func:`_fetch_factors` and :func:`_return_factor_grads` index
    tensors of their own device."""
    m = perms.shape[0]
    perms = perms.to(device="cpu", dtype=torch.int64)
    others = torch.tensor([[o for o in range(m) if o != a] for a in range(m)])
    ends = torch.tensor(lay.sizes, dtype=torch.int64).cumsum(0)
    offs, r = lay.offsets, lay.rank

    def flat(q: int) -> tuple:
        """Rank q's factor rows: (global row, modality, owner), each (M (M-1) n_q,)."""
        idx = perms[:, :, offs[q] : offs[q] + lay.sizes[q]]
        mod = others[:, :, None].expand_as(idx)
        idx, mod = idx.reshape(-1), mod.reshape(-1)
        return idx, mod, torch.searchsorted(ends, idx.contiguous(), right=True)

    recv_pos, send_rows = [], []
    for q in range(lay.world):
        idx, mod, src = flat(q)
        if q == r:
            recv_pos = [torch.nonzero(src == p).squeeze(1) for p in range(lay.world)]
        mine = src == r
        send_rows.append((idx[mine] - offs[r]) * m + mod[mine])
    host = [*recv_pos, *send_rows]
    moved = torch.cat(host).to(lay.device).split([t.numel() for t in host])
    return _RingPlan(list(moved[: lay.world]), list(moved[lay.world :]))


def _fetch_factors(x: Tensor, plan: _RingPlan, lay: _comm.Layout) -> Tensor:
    """This rank's factor rows F (M, M-1, n_r, D) (x's dtype) by one all-to-all."""
    n, m, d = x.shape
    x_flat = x.reshape(n * m, d)
    r = lay.rank
    send = torch.cat([x_flat[t] for q, t in enumerate(plan.send_rows) if q != r] or [x_flat[:0]])
    got = _comm.all_to_all_rows(send, plan.send_counts(r), plan.recv_counts(r), lay)
    f = x.new_empty((m * (m - 1) * n, d))
    f[plan.recv_pos[r]] = x_flat[plan.send_rows[r]]
    start = 0
    for p, pos in enumerate(plan.recv_pos):
        if p != r:
            f[pos] = got[start : start + pos.numel()]
            start += pos.numel()
    return f.view(m, m - 1, n, d)


def _return_factor_grads(df: Tensor, plan: _RingPlan, lay: _comm.Layout, dx: Tensor) -> None:
    """Scatter-add the factor rows' gradients df (M, M-1, n_r, D) into their owners' dx
    (n, M, D): locally with index_add_, the others by the reverse all-to-all."""
    n, m, d = dx.shape
    df = df.reshape(-1, d)
    dx_flat = dx.view(n * m, d)
    r = lay.rank
    dx_flat.index_add_(0, plan.send_rows[r], df[plan.recv_pos[r]])
    back = [df[pos] for p, pos in enumerate(plan.recv_pos) if p != r]
    send = torch.cat(back) if back else df[:0]
    got = _comm.all_to_all_rows(send, plan.recv_counts(r), plan.send_counts(r), lay)
    rows = [t for q, t in enumerate(plan.send_rows) if q != r]
    if rows:
        dx_flat.index_add_(0, torch.cat(rows), got)


def _products(f: Tensor) -> Tensor:
    """Column shard W (M, n_r, D) = prod_k F[:, k] (differentiable)."""
    w = f[:, 0]
    for k in range(1, f.shape[1]):
        w = w * f[:, k]
    return w


class _SymileRing(torch.autograd.Function):
    """Symile "n", "ring": the visiting anchor rows (global rows o_q ..) against this
    rank's columns of W^a (global columns o_r ..) are one engine sweep ``Pair("rows")``
    per anchor, the positive logits s MIP as the override when the visitor is this rank's
    own shard (then global row i meets global column i), none otherwise (no entry of the
    block is a positive). Each visit's row pairs travel back as one logsumexp per row
    (logaddexp), and the backward forms the softmax from it as the pair (lse, 1), as
    CLIP "ring" does for its columns."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, scale, plan, lay, grad_scaling, backend):
        # x: (n_r, M, D) local representations
        acc = accumulation_dtype(x.dtype)
        engine = backend_module(backend, "pair")
        n, m = x.shape[:2]
        f = _fetch_factors(x, plan, lay)  # (M, M-1, n_r, D)
        w = _products(f.to(acc)).to(x.dtype)  # (M, n_r, D): this rank's columns of every W^a
        diag = scale * mip(_rows(x), acc)  # (n_r,)

        def visit(q: int, shard: Sequence[Tensor]) -> Tensor:
            xq = shard[0]
            part = torch.full((xq.shape[0], m), float("-inf"), dtype=acc, device=x.device)
            if xq.shape[0] == 0 or n == 0:
                return part  # no entries: an empty visitor, or no columns here
            dq = diag if q == lay.rank else None
            for a in range(m):
                st = engine.pair_forward(
                    xq[:, a].contiguous(), w[a], scale, None, PAIR, lay.offsets[q],
                    lay.offset, None, None, dq,
                )  # fmt: skip
                part[:, a] = lse(st.row_max, st.row_sum)
            return part

        row_lse = _comm.ring_pass(lay, [x], visit, torch.logaddexp)  # (n_r, M)
        ctx.plan = plan
        part = row_lse.sum() - m * diag.sum()
        return _finish_forward(ctx, part, m, lay, grad_scaling, backend, x, scale, f, row_lse)

    @_comm.exchange_backward
    def backward(ctx, grad_loss):
        (x, scale, f, row_lse), n, m, acc, coef = _start_backward(ctx, grad_loss)
        lay = ctx.lay
        engine = backend_module(ctx.backend, "pair")
        with torch.enable_grad():
            fl = f.to(acc).detach().requires_grad_(True)
            w = _products(fl)
        w_in = w.detach().to(x.dtype)
        reps = _rows(x)
        diag = scale * mip(reps, acc)
        dw = torch.zeros(w.shape, dtype=acc, device=x.device)
        dscale = torch.zeros((), dtype=acc, device=x.device)
        dp = (-m * coef).expand(n).clone()  # the -s MIP_i terms, M anchors

        def visit(q: int, shard: Sequence[Tensor]) -> Tensor:
            xq, lse_q = shard[0], shard[1]
            nq = xq.shape[0]
            out = torch.zeros(xq.shape, dtype=acc, device=x.device)  # (n_q, M, D)
            if nq == 0 or n == 0:
                return out
            dq = diag if q == lay.rank else None
            c = coef.expand(nq).contiguous()
            for a in range(m):
                st = Stats(row_max=lse_q[:, a].contiguous(), row_sum=torch.ones_like(lse_q[:, a]))
                g = engine.pair_backward(
                    xq[:, a].contiguous(), w_in[a], scale, None, PAIR, st, Coefs(rows=c),
                    lay.offsets[q], lay.offset, None, None, dq, acc,
                )  # fmt: skip
                out[:, a] = g.da
                dw[a] += g.db
                dscale.add_(g.dscale)
                if dq is not None:
                    dp.add_(g.dpos)
            return out

        dx = _comm.ring_pass(lay, [x, row_lse], visit, torch.add)  # (n_r, M, D)
        (df,) = torch.autograd.grad(w, (fl,), dw)  # the engine's dB already holds s
        d = [dx[:, k] for k in range(m)]  # views: the positive's gradient lands in dx
        dscale = (dscale + add_positive_gradient(d, reps, scale, dp, acc)).reshape(1)
        _return_factor_grads(df, ctx.plan, lay, dx)
        dx, dscale = _comm.round_grads(dx, x, dscale, scale, lay, ctx.grad_scaling)
        return dx, dscale, None, None, None, None


def _check_shard_representations(representations: object) -> list:
    """``objectives.symile._check_representations`` for this rank's shard: n_r = 0
    allowed."""
    return _check_representations(
        representations, check=_comm.check_shard, clip_loss="flashcontrast.distributed.clip_loss"
    )


def _checksum(t: Tensor) -> int:
    """A position-weighted sum of the CPU tensor ``t`` (the metadata's permutations field)."""
    flat = t.reshape(-1).to(dtype=torch.int64)
    weights = torch.arange(flat.numel(), dtype=torch.int64) % 1000003 + 1
    return int((flat * weights).sum())


def symile_loss(
    representations: Sequence[Tensor],
    logit_scale,
    *,
    negative_sampling: str = "n",
    generator: Optional[torch.Generator] = None,
    permutations: Optional[Union[Tensor, Sequence]] = None,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """Symile with negative_sampling="n" over the global batch of a process group.

    Each rank passes its own rows: M >= 3 tensors (n_r, D) (n_r may differ between ranks
    and be 0; M, D, dtype, ``strategy``, ``backend`` and ``grad_scaling`` may not:
    checked, a mismatch raises on every rank). Every rank returns
    :func:`flashcontrast.symile_loss` of the concatenation of the shards in rank order
    with the same permutations: group rank 0 draws them over the GLOBAL N from
    ``generator`` (or its default CPU generator), as the single-process call would, and
    broadcasts them; explicit ``permutations`` (M, M-1, N) hold GLOBAL row indices and
    must be identical on every rank (checked). Gradients as
    :func:`flashcontrast.distributed.clip_loss`. ``strategy="gather"`` (all-gather the
    (N, M, D) representations) or ``"ring"`` (an all-to-all of the factor rows of each
    rank's columns, then the anchor shards travel the ring: O(M^2 n D) memory; see the
    module doc). ``backend``: "auto", "torch", "triton", "cuda" or "reference" (the
    "torch" tiles): the pair engine the local tiles of "n" run on, resolved on every rank
    among its setup checks (``_comm.engine_backend``: one that cannot run fails every
    rank).

    ``negative_sampling="n_squared"`` (M = 3, ``strategy="gather"``): every anchor row
    against all N^2 pairs of the other two modalities, the (N, M, D) representations
    all-gathered; every rank returns the single-process n_squared loss of the
    concatenated batch. Its rank-local part runs on the "torch", "triton" or "cuda"
    symile_n2 tiles (n_r rows against N columns; the dispatcher's
    "symile_n_squared_rectangular" call variant); "ring" and M > 3 raise
    NotImplementedError on every rank, ``permutations`` a ValueError (as in one process).
    """
    group, strategy, backend, grad_scaling = _comm.options("symile_loss", options)

    def check():
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}"
            )
        reps = _check_shard_representations(representations)
        squared = negative_sampling == "n_squared"
        if squared and strategy == "ring":
            raise NotImplementedError(
                'strategy="ring" runs only negative_sampling="n"; negative_sampling='
                '"n_squared" takes strategy="gather"'
            )
        if squared and len(reps) != 3:
            raise NotImplementedError(
                'negative_sampling="n_squared" over a process group takes M = 3 '
                f"modalities, got M = {len(reps)} (use flashcontrast.symile_loss in one "
                "process)"
            )
        if squared and permutations is not None:
            raise ValueError('permutations only apply to negative_sampling="n"')
        variant = "symile_n_squared_rectangular" if squared else None
        chosen = _comm.engine_backend("symile", backend, reps[0], variant)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if permutations is not None and generator is not None:
            raise ValueError("give either permutations or generator, not both")
        scale = _comm.scalar("logit_scale", logit_scale, reps[0])
        p, fields = None, [len(reps), 0, 0, 0]
        if permutations is not None:
            p = permutations
            if not isinstance(p, Tensor):
                try:
                    p = torch.as_tensor(p, dtype=torch.long)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise TypeError(
                        f"permutations must be an (M, M-1, N) integer tensor: {exc}"
                    ) from exc
            _comm.check_dense("permutations", p)
            if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                raise TypeError(f"permutations must be an integer tensor, got {p.dtype}")
            if p.dim() != 3:
                raise ValueError(f"permutations must be (M, M-1, N), got {tuple(p.shape)}")
            p = p.to("cpu")  # the one copy to the host: checksum, range check, ring plan
            fields = [len(reps), 1, p.shape[-1], _checksum(p)]
        n, d = reps[0].shape
        fields.append(NEGATIVE_SAMPLING.index(negative_sampling))
        return (reps, scale, p, chosen), n, d, reps[0].dtype, reps[0].device, fields

    fields = [
        "number of modalities M", "permutations given", "permutations N", "permutations",
        ("negative_sampling", NEGATIVE_SAMPLING.__getitem__),
    ]  # fmt: skip
    lay, (reps, scale, p, chosen) = _comm.setup_checked(
        "symile_loss", group, strategy, grad_scaling, backend, fields, check,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    m, n_tot, device = len(reps), lay.total, reps[0].device
    if negative_sampling == "n_squared":
        stacked = torch.stack(reps, dim=1)
        return _SymileN2Dist.apply(stacked, scale, lay, grad_scaling, chosen)
    host = None  # the permutations on the CPU, when known without a copy
    if p is not None:
        # p is the CPU copy, identical on every rank (checksum): the shape and range
        # checks raise on every rank alike, also for permutations given on a GPU (whose
        # values _permutations does not check on the device, and which the "ring" plan
        # would otherwise silently mis-route)
        host = _permutations(p, m, n_tot, torch.device("cpu"))
        perms = host.to(device)
    else:
        if lay.rank == 0:
            perms = symile_negative_permutations(m, n_tot, generator=generator, device=device)
        else:
            perms = torch.empty((m, m - 1, n_tot), dtype=torch.int64, device=device)
        perms = _comm.broadcast(perms.contiguous(), lay)
    x = torch.stack(reps, dim=1)  # (n_r, M, D), differentiable
    if strategy == "ring":
        plan = _plan(perms if host is None else host, lay)
        return _SymileRing.apply(x, scale, plan, lay, grad_scaling, chosen)
    return _SymileDist.apply(x, scale, perms, lay, grad_scaling, chosen)
