"""Symile (negative_sampling="n") over a process group: the "gather" and "ring" strategies.

Rank r holds rows R_r = [o_r, o_r + n_r) of every modality x^1..x^M; N = sum n_q. For
anchor a, column j of the logits is W^a_j = prod_k x^{o_k}[pi_ak(j)] (the other
modalities o_1 < o_2 < ... in list order, pi = perm[a, k] GLOBAL index maps into range(N)),
column i replaced by the positive s MIP_i;
L = 1/(M N) sum_a sum_i (LSE_j S^a_ij - s MIP_i). The loss is row-only: no column
statistics are needed.

"gather": the (N, M, D) representations are all-gathered once, every rank builds W^a
(N, D) and computes its anchor rows against it, a block of rows at a time (row statistics
only), one scalar all-reduce. Backward: the tiles' gradients (autograd inside each block,
row LSEs fixed) reach the gathered representations through the products W^a, and a
reduce-scatter routes them to their owners.

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
3. backward: the ring again with (x_q, row LSE_q); dS = c P on the tile gives
   dx_q = s dS W (an accumulator (n_q, M, D) travelling behind x_q to its owner) and
   dW = s dS^T x_q, which stays with the columns' owner; the chain rule through the
   products gives the factor rows' gradients, scatter-added (index_add_) locally or sent
   back to the rows' owners by the reverse all-to-all.

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

* metadata (W-1) 88 [+ M (M-1) N 8 for the broadcast permutations, when drawn];
* forward: A_r D e + (N - n_{r+1}) M D e + (N - n_r) M f + ar(f);
* backward: ar(f) + (N - n_{r+1}) M (D e + f) + (N - n_r) M D f + B_r D f + ar(f).

Equal shards: forward (W-1) n M D e + A D e + (W-1) n M f + ar(f); backward
(W-1) n M (D e + f) + (W-1) n M D f + B D f + 2 ar(f). Dominant, random permutations:
(W-1) n M D (2e + f + (M-1)(e + f)/W). Measured by tests/test_distributed_symile_ring.py
(which asserts the formula for W = 1..4): W = 4, n = 256, D = 512, float32, M = 3, one
draw of random permutations: 18,753,818 to 18,970,906 bytes per rank (expectation
18,893,082; "gather": 9,437,466). Twice "gather", as CLIP "ring" is: nothing O(N D) is
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._sampling import symile_negative_permutations
from .._validation import accumulation_dtype, check_pair
from ..backends.blockwise import block_rows
from ..objectives.symile import _permutations
from . import _comm

# ----------------------------------------------------------------------------- "gather"


def _columns(x_all: Tensor, perms: Tensor, a: int) -> Tensor:
    """W^a (N, D) from the gathered (N, M, D) representations."""
    m = x_all.shape[1]
    others = [o for o in range(m) if o != a]
    w = x_all[perms[a, 0], others[0]]
    for k in range(1, m - 1):
        w = w * x_all[perms[a, k], others[k]]
    return w


def _block(x_blk, w, scale, diag_blk, col0):
    """(b, N) logits of rows x_blk (global rows col0..) against w, positive on the diagonal."""
    s = torch.mm(x_blk, w.t()) * scale
    eye = torch.zeros_like(s)
    eye.diagonal(offset=col0).fill_(1.0)
    return torch.where(eye.bool(), diag_blk[:, None] * eye, s)


class _SymileDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, scale, perms, lay, grad_scaling):
        # x: (n_r, M, D) local representations
        acc = accumulation_dtype(x.dtype)
        xa = x.to(acc)
        n, m, _ = x.shape
        cols = _comm.all_gather_rows(x, lay)  # (N, M, D)
        ya = cols.to(acc)
        diag = scale * xa.prod(dim=1).sum(dim=1)  # (n,)
        rows = block_rows(lay.total, x.device)
        row_lse = torch.empty((m, n), dtype=acc, device=x.device)
        for a in range(m):
            w = _columns(ya, perms, a)
            for i in range(0, n, rows):
                j = min(i + rows, n)
                s = _block(xa[i:j, a], w, scale, diag[i:j], lay.offset + i)
                row_lse[a, i:j] = torch.logsumexp(s, 1)
        part = (row_lse.sum() - m * diag.sum()).reshape(1)
        loss = _comm.all_reduce(part, lay)[0] / (m * lay.total)
        ctx.save_for_backward(x, scale, perms, cols, row_lse)
        ctx.lay, ctx.grad_scaling = lay, grad_scaling
        return loss

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        x, scale, perms, cols, row_lse = ctx.saved_tensors
        lay = ctx.lay
        acc = row_lse.dtype
        n, m, _ = x.shape
        g = _comm.mean_upstream(grad_loss, lay, acc)
        coef = g / (m * lay.total)
        xa = x.to(acc)
        with torch.enable_grad():
            xl = xa.detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            diag = sl * xl.prod(dim=1).sum(dim=1)
        d_diag = (-m * coef).expand(n).clone()  # not torch.full: a 0-d fill syncs
        dx = torch.zeros_like(xa)
        dy = torch.zeros(cols.shape, dtype=acc, device=x.device)
        dscale = torch.zeros(1, dtype=acc, device=x.device)
        rows = block_rows(lay.total, x.device)
        for a in range(m):
            with torch.enable_grad():
                yl = cols.to(acc).detach().requires_grad_(True)
                w = _columns(yl, perms, a)
            dw = torch.zeros_like(w)
            for i in range(0, n, rows):
                j = min(i + rows, n)
                with torch.enable_grad():
                    xb = xa[i:j, a].detach().requires_grad_(True)
                    wl = w.detach().requires_grad_(True)
                    s_l = scale.detach().requires_grad_(True)
                    dl = diag[i:j].detach().requires_grad_(True)
                    s = _block(xb, wl, s_l, dl, lay.offset + i)
                    sur = coef * (s - row_lse[a, i:j, None]).exp().sum()
                    g_x, g_w, g_s, g_d = torch.autograd.grad(sur, (xb, wl, s_l, dl))
                dx[i:j, a] += g_x
                dw += g_w
                dscale += g_s
                d_diag[i:j] += g_d
            (g_y,) = torch.autograd.grad(w, (yl,), dw)
            dy += g_y
        g_x, g_s = torch.autograd.grad(diag, (xl, sl), d_diag)
        dx += g_x
        dscale += g_s
        dx += _comm.reduce_scatter_rows(dy, lay)
        _comm.all_reduce(dscale, lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        return (dx * factor).to(x.dtype), dscale[0].to(scale.dtype), None, None, None


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


def _logits(x_blk: Tensor, w: Tensor, scale: Tensor, diag: Optional[Tensor], start: int):
    """(raw (b, n_c) = x_blk w^T, s raw with the positive diag (b,) on diagonal ``start``)."""
    raw = torch.mm(x_blk, w.t())
    s = raw * scale
    if diag is not None:
        s.diagonal(offset=start).copy_(diag)
    return raw, s


def _rows_lse(x: Tensor, w: Tensor, scale: Tensor, diag: Optional[Tensor]) -> Tensor:
    """LSE (n_q,) of visiting anchor rows x (n_q, D) over the local columns w (n_c, D);
    ``diag`` (n_q,): the positives, when x is this rank's own shard (row i <-> column i)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = _comm.tile_rows(x.shape[0], w.shape[0], x.device)
    for i in range(0, x.shape[0], rows):
        j = min(i + rows, x.shape[0])
        _, s = _logits(x[i:j], w, scale, None if diag is None else diag[i:j], i)
        out[i:j] = torch.logsumexp(s, 1)
    return out


def _rows_backward(
    x: Tensor,
    w: Tensor,
    scale: Tensor,
    lse: Tensor,
    coef: Tensor,
    diag: Optional[Tensor],
    dw: Tensor,
    dscale: Tensor,
    d_diag: Tensor,
) -> Tensor:
    """Gradient of coef * sum_i LSE_i (LSE (n_q,) fixed) for the tile x (n_q, D) x w
    (n_c, D). Returns dx (n_q, D); adds dS^T x to ``dw`` (n_c, D) (times s later),
    sum dS x.w to ``dscale`` (1,) and, with ``diag``, the diagonal's dS to ``d_diag``."""
    # dS_ij = c P_ij = c exp(S_ij - LSE_i); S_ij = s x_i.w_j off the diagonal, so
    # dx_i = s sum_j dS_ij w_j, dw_j = s sum_i dS_ij x_i, ds = sum_ij dS_ij x_i.w_j; the
    # diagonal dS_ii belongs to the positive logit s MIP_i instead.
    dx = torch.empty_like(x)
    rows = _comm.tile_rows(x.shape[0], w.shape[0], x.device)
    for i in range(0, x.shape[0], rows):
        j = min(i + rows, x.shape[0])
        raw, s = _logits(x[i:j], w, scale, None if diag is None else diag[i:j], i)
        ds = (s - lse[i:j, None]).exp_().mul_(coef)
        if diag is not None:
            d_diag[i:j] += ds.diagonal(offset=i)
            ds.diagonal(offset=i).zero_()
        dscale += (ds * raw).sum()
        dx[i:j] = torch.mm(ds, w).mul_(scale)
        dw.addmm_(ds.t(), x[i:j])
    return dx


class _SymileRing(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, scale, plan, lay, grad_scaling):
        # x: (n_r, M, D) local representations
        acc = accumulation_dtype(x.dtype)
        m = x.shape[1]
        f = _fetch_factors(x, plan, lay)  # (M, M-1, n_r, D)
        w = _products(f.to(acc))  # (M, n_r, D): this rank's columns of every W^a
        diag = scale * x.to(acc).prod(dim=1).sum(dim=1)  # (n_r,)

        def visit(q: int, shard: Sequence[Tensor]) -> Tensor:
            xq = shard[0].to(acc)
            dq = diag if q == lay.rank else None
            return torch.stack([_rows_lse(xq[:, a], w[a], scale, dq) for a in range(m)], 1)

        row_lse = _comm.ring_pass(lay, [x], visit, torch.logaddexp)  # (n_r, M)
        part = (row_lse.sum() - m * diag.sum()).reshape(1)
        loss = _comm.all_reduce(part, lay)[0] / (m * lay.total)
        ctx.save_for_backward(x, scale, f, row_lse)
        ctx.plan, ctx.lay, ctx.grad_scaling = plan, lay, grad_scaling
        return loss

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        x, scale, f, row_lse = ctx.saved_tensors
        lay = ctx.lay
        acc = row_lse.dtype
        n, m, _ = x.shape
        coef = _comm.mean_upstream(grad_loss, lay, acc) / (m * lay.total)
        with torch.enable_grad():
            fl = f.to(acc).detach().requires_grad_(True)
            w = _products(fl)
            xl = x.to(acc).detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            diag = sl * xl.prod(dim=1).sum(dim=1)
        wd, diag_d = w.detach(), diag.detach()
        dw = torch.zeros_like(wd)
        dscale = torch.zeros(1, dtype=acc, device=x.device)
        d_diag = (-m * coef).expand(n).clone()  # the -s MIP_i terms, M anchors

        def visit(q: int, shard: Sequence[Tensor]) -> Tensor:
            xq, lse_q = shard[0].to(acc), shard[1]
            dq = diag_d if q == lay.rank else None
            parts = [
                _rows_backward(xq[:, a], wd[a], scale, lse_q[:, a], coef, dq, dw[a], dscale, d_diag)
                for a in range(m)
            ]
            return torch.stack(parts, 1)  # (n_q, M, D)

        dx = _comm.ring_pass(lay, [x, row_lse], visit, torch.add)  # (n_r, M, D)
        dw.mul_(scale)
        (df,) = torch.autograd.grad(w, (fl,), dw)
        g_x, g_s = torch.autograd.grad(diag, (xl, sl), d_diag)
        dx += g_x
        dscale += g_s
        _return_factor_grads(df, ctx.plan, lay, dx)
        _comm.all_reduce(dscale, lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        return (dx * factor).to(x.dtype), dscale[0].to(scale.dtype), None, None, None


def _check_shard_representations(representations: object) -> list:
    """``objectives.symile._check_representations`` for this rank's shard: n_r = 0
    allowed."""
    if isinstance(representations, Tensor) or not isinstance(representations, (list, tuple)):
        raise TypeError(
            "representations must be a list or tuple of M >= 3 tensors (N, D), got "
            f"{type(representations).__name__}"
        )
    reps = list(representations)
    if len(reps) == 2:
        raise ValueError(
            "Symile with M = 2 modalities is CLIP InfoNCE (the multilinear inner product "
            "of two vectors is their dot product): use flashcontrast.distributed.clip_loss"
        )
    if len(reps) < 3:
        raise ValueError(f"Symile needs M >= 3 representations, got {len(reps)}")
    for k, r in enumerate(reps):
        _comm.check_shard(f"representations[{k}]", r)
    for k, r in enumerate(reps[1:], start=1):
        check_pair("representations[0]", reps[0], f"representations[{k}]", r)
    return reps


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
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
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
    module doc); ``negative_sampling="n_squared"`` raises NotImplementedError on every
    rank.
    """

    def check():
        if negative_sampling != "n":
            raise NotImplementedError(
                'only negative_sampling="n" is distributed; got '
                f"{negative_sampling!r} (use flashcontrast.symile_loss in one process)"
            )
        reps = _check_shard_representations(representations)
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
        return (reps, scale, p), n, d, reps[0].dtype, reps[0].device, fields

    lay, (reps, scale, p) = _comm.setup_checked(
        "symile_loss",
        group,
        strategy,
        grad_scaling,
        backend,
        ["number of modalities M", "permutations given", "permutations N", "permutations"],
        check,
    )
    m, n_tot, device = len(reps), lay.total, reps[0].device
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
        return _SymileRing.apply(x, scale, plan, lay, grad_scaling)
    return _SymileDist.apply(x, scale, perms, lay, grad_scaling)
