"""MV-InfoNCE and MV-DHEL over a process group: the "gather" and "ring" strategies.

Rank r holds samples [o_r, o_r + n_r) of every view: a (V, n_r, D) shard; N = sum n_q.
The negatives of row (l, i) are a row logsumexp over columns (m, j) of the global
self-similarity s <u_il, u_jm> (MV-InfoNCE: every (m, j) != (l, i); MV-DHEL: m = l,
j != i; with ``groups``, different samples of one group are dropped). The matrix is
symmetric but only ROW statistics are needed, and the positives of sample i are local,
so each rank computes its own rows against every column, a block of samples at a time
(the blockwise backend's element budget), and the loss is one scalar all-reduce:
L = (1/N) sum_r (sum of rank r's per-sample terms).

Backward: with G_il = dL/d row_lse_il (local: the softmax over views for MV-InfoNCE, 1 for
MV-DHEL, times g/N), each (rows x columns) tile contributes the gradient of
sum G_il exp(S_il,jm - row_lse_il) (row_lse fixed), recomputed tile by tile and
differentiated by autograd inside the tile (one block at a time). The column gradients
belong to the columns' owners: a reduce-scatter ("gather") or an accumulator travelling
behind the shard ("ring"), as for :func:`flashcontrast.distributed.clip_loss`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._amp import autocast_off
from .._validation import FEATURE_DTYPES, accumulation_dtype, check_pair
from ..backends.blockwise import block_rows
from ..objectives.multiview import Views, _check_groups
from . import _comm

_NEG_INF = float("-inf")


def _tile(x, y, scale, per_view, row0, col0, gx, gy):
    """Logits of local rows x (V, b, D) (global samples row0..) against columns y
    (V, m, D) (global samples col0..), excluded entries -inf. Shape (V, b, V * m) for
    MV-InfoNCE, (V, b, m) for MV-DHEL."""
    v, b, _ = x.shape
    m = y.shape[1]
    ri = torch.arange(row0, row0 + b, device=x.device)
    cj = torch.arange(col0, col0 + m, device=x.device)
    same = ri[:, None] == cj[None, :]  # (b, m)
    other_group = None
    if gx is not None:
        other_group = (gx[:, None] == gy[None, :]) & ~same
    if per_view:
        s = torch.bmm(x, y.transpose(1, 2)) * scale  # (V, b, m)
        mask = same if other_group is None else same | other_group
        return s.masked_fill(mask, _NEG_INF)
    d = x.shape[-1]  # not -1 in the reshapes: ambiguous for an empty shard
    s = (torch.mm(x.reshape(v * b, d), y.reshape(v * m, d).t()) * scale).view(v, b, v, m)
    eye = torch.eye(v, dtype=torch.bool, device=x.device)
    mask = eye[:, None, :, None] & same[None, :, None, :]
    if other_group is not None:
        mask = mask | other_group[None, :, None, :]
    return s.masked_fill(mask, _NEG_INF).reshape(v, b, v * m)


def _head(u: Tensor, scale: Tensor, row_lse: Tensor, per_view: bool) -> Tensor:
    """Sum over the local samples of the per-sample terms, from the (V, n) row LSEs and
    the local positives (as objectives/multiview.py)."""
    v = u.shape[0]
    pos = scale * torch.einsum("lnd,knd->nlk", u, u)
    if per_view:
        rows, cols = torch.triu_indices(v, v, offset=1, device=u.device)
        return (row_lse.sum(0) - torch.logsumexp(pos[:, rows, cols], dim=1)).sum()
    eye = torch.eye(v, dtype=torch.bool, device=u.device)
    log_num = torch.logsumexp(pos.masked_fill(eye, _NEG_INF).flatten(1), dim=1)
    return (torch.logsumexp(row_lse, 0) - log_num).sum()


def _samples_per_block(v: int, n: int, m: int, per_view: bool, device) -> int:
    """Local samples per block for n local samples against m column samples (m = 0, an
    empty visiting shard: one block of all n samples, which holds no elements)."""
    if m == 0:
        return max(n, 1)
    width = v * m if not per_view else m
    return max(1, block_rows(width, device) // v)


def _fold_lse(u, scale, per_view, row0, y, col0, gx, gy, row_lse):
    """row_lse (V, n) <- logaddexp with the local rows' LSE over columns y."""
    n = u.shape[1]
    step = _samples_per_block(u.shape[0], n, y.shape[1], per_view, u.device)
    for a in range(0, n, step):
        b = min(a + step, n)
        s = _tile(u[:, a:b], y, scale, per_view, row0 + a, col0, _sl(gx, a, b), gy)
        row_lse[:, a:b] = torch.logaddexp(row_lse[:, a:b], torch.logsumexp(s, -1))


def _sl(g, a, b):
    return None if g is None else g[a:b]


def _tile_grads(u, scale, per_view, row0, y, col0, gx, gy, row_lse, grow, du, dscale):
    """Add the local rows' gradients to du (V, n, D) and dscale (1,); return dy."""
    n = u.shape[1]
    dy = torch.zeros_like(y)
    step = _samples_per_block(u.shape[0], n, y.shape[1], per_view, u.device)
    for a in range(0, n, step):
        b = min(a + step, n)
        with torch.enable_grad():
            xl = u[:, a:b].detach().requires_grad_(True)
            yl = y.detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            s = _tile(xl, yl, sl, per_view, row0 + a, col0, _sl(gx, a, b), gy)
            sur = (grow[:, a:b, None] * (s - row_lse[:, a:b, None]).exp()).sum()
            gx_, gy_, gs_ = torch.autograd.grad(sur, (xl, yl, sl))
        du[:, a:b] += gx_
        dy += gy_
        dscale += gs_
    return dy


class _MultiviewDist(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, u, scale, groups, lay, per_view, strategy, grad_scaling):
        acc = accumulation_dtype(u.dtype)
        ua = u.to(acc)
        v, n, _ = u.shape
        row_lse = torch.full((v, n), _NEG_INF, dtype=acc, device=u.device)
        if strategy == "gather":
            cols = _comm.all_gather_rows(u.transpose(0, 1).contiguous(), lay)  # (N, V, D)
            g_all = None if groups is None else _comm.all_gather_rows(groups, lay)
            y = cols.transpose(0, 1).to(acc)
            _fold_lse(ua, scale, per_view, lay.offset, y, 0, groups, g_all, row_lse)
            ctx.save_for_backward(u, scale, groups, row_lse, cols, g_all)
        else:
            travel = [u.transpose(0, 1).contiguous()]
            if groups is not None:
                travel.append(groups.contiguous())

            def visit(q, shard):
                y = shard[0].transpose(0, 1).to(acc)
                gy = shard[1] if groups is not None else None
                _fold_lse(ua, scale, per_view, lay.offset, y, lay.offsets[q], groups, gy, row_lse)

            _comm.ring_pass(lay, travel, visit, torch.add)
            ctx.save_for_backward(u, scale, groups, row_lse)
        part = _head(ua, scale, row_lse, per_view).reshape(1)
        loss = _comm.all_reduce(part, lay)[0] / lay.total
        ctx.lay, ctx.per_view, ctx.strategy, ctx.grad_scaling = (
            lay,
            per_view,
            strategy,
            grad_scaling,
        )
        return loss

    @staticmethod
    @once_differentiable  # double backward raises (the exchanges are not differentiable)
    @autocast_off
    def backward(ctx, grad_loss):
        u, scale, groups, row_lse, *rest = ctx.saved_tensors
        lay, per_view = ctx.lay, ctx.per_view
        acc = row_lse.dtype
        g = _comm.mean_upstream(grad_loss, lay, acc)
        ua = u.to(acc)
        with torch.enable_grad():
            ul = ua.detach().requires_grad_(True)
            sl = scale.detach().requires_grad_(True)
            ll = row_lse.detach().requires_grad_(True)
            h = _head(ul, sl, ll, per_view) * (g / lay.total)
            du, ds, grow = torch.autograd.grad(h, (ul, sl, ll))
        du = du.clone()
        dscale = ds.reshape(1).clone()
        if ctx.strategy == "gather":
            cols, g_all = rest
            y = cols.transpose(0, 1).to(acc)
            dy = _tile_grads(
                ua, scale, per_view, lay.offset, y, 0, groups, g_all, row_lse, grow, du, dscale
            )
            dcols = _comm.reduce_scatter_rows(dy.transpose(0, 1).contiguous(), lay)
        else:
            travel = [u.transpose(0, 1).contiguous()]
            if groups is not None:
                travel.append(groups.contiguous())

            def visit(q, shard):
                y = shard[0].transpose(0, 1).to(acc)
                gy = shard[1] if groups is not None else None
                dy = _tile_grads(
                    ua, scale, per_view, lay.offset, y, lay.offsets[q], groups, gy,
                    row_lse, grow, du, dscale,
                )  # fmt: skip
                return dy.transpose(0, 1).contiguous()

            dcols = _comm.ring_pass(lay, travel, visit, torch.add)
        du += dcols.transpose(0, 1)
        _comm.all_reduce(dscale, lay)
        factor = lay.world if ctx.grad_scaling == "ddp" else 1
        return (du * factor).to(u.dtype), dscale[0].to(scale.dtype), None, None, None, None, None


def _stack_shard(views: Views) -> Tensor:
    """This rank's (V, n_r, D) views: ``objectives.multiview._stack``'s checks, with
    n_r = 0 (an empty shard) allowed and dense (strided) tensors only."""
    if isinstance(views, Tensor):
        u = _comm.check_dense("views", views)
        if u.dim() != 3:
            raise ValueError(
                f"views must be (V, N, D) or a sequence of (N, D), got {tuple(u.shape)}"
            )
    else:
        if isinstance(views, (str, bytes)) or not isinstance(views, Sequence):
            raise TypeError(
                f"views must be a (V, N, D) tensor or a sequence of (N, D) tensors, "
                f"got {type(views).__name__}"
            )
        views = list(views)
        for k, x in enumerate(views):
            if not isinstance(x, Tensor):
                raise TypeError(f"views[{k}] must be a torch.Tensor, got {type(x).__name__}")
            _comm.check_dense(f"views[{k}]", x)
            if x.dim() != 2:
                raise ValueError(f"views[{k}] must be 2-D (N, D), got {tuple(x.shape)}")
        if len(views) < 2:
            raise ValueError(f"multi-view losses need V >= 2 views, got V = {len(views)}")
        for k, x in enumerate(views[1:], 1):
            check_pair("views[0]", views[0], f"views[{k}]", x)
        u = torch.stack(views)  # the one copy a sequence costs
    if u.dtype not in FEATURE_DTYPES:
        raise TypeError(f"views must be float32, float16, bfloat16 or float64, got {u.dtype}")
    v, _, d = u.shape
    if v < 2:
        raise ValueError(f"multi-view losses need V >= 2 views, got V = {v}")
    if d == 0:
        raise ValueError("views have no features (D = 0)")
    return u


def _run(name, views, logit_scale, groups, group, strategy, backend, grad_scaling, per_view):
    def check():
        u = _stack_shard(views)
        if isinstance(groups, Tensor):
            _comm.check_dense("groups", groups)
        g = _check_groups(groups, u)
        scale = _comm.scalar("logit_scale", logit_scale, u)
        v, n, d = u.shape
        return (u, g, scale), n, d, u.dtype, u.device, [v, g is not None]

    lay, (u, g, scale) = _comm.setup_checked(
        name, group, strategy, grad_scaling, backend, ["number of views V", "groups given"], check
    )
    if per_view and lay.total < 2:
        raise ValueError(
            f"flashcontrast.distributed.{name}: MV-DHEL needs N >= 2 samples in the global "
            f"batch, got N = {lay.total} (every rank raises)"
        )
    if g is not None:
        g = g.to(torch.int64)
    return _MultiviewDist.apply(u, scale, g, lay, per_view, strategy, grad_scaling)


def multiview_infonce_loss(
    views: Views,
    logit_scale,
    *,
    groups: Optional[Tensor] = None,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
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
    return _run(
        "multiview_infonce_loss", views, logit_scale, groups, group, strategy, backend,
        grad_scaling, False,
    )  # fmt: skip


def multiview_dhel_loss(
    views: Views,
    logit_scale,
    *,
    groups: Optional[Tensor] = None,
    group=None,
    strategy: str = "gather",
    backend: str = "auto",
    grad_scaling: str = "ddp",
) -> Tensor:
    """MV-DHEL over the global batch of a process group (global N >= 2); arguments,
    result and gradients as :func:`multiview_infonce_loss`."""
    return _run(
        "multiview_dhel_loss", views, logit_scale, groups, group, strategy, backend,
        grad_scaling, True,
    )  # fmt: skip
