"""Symile (negative_sampling="n") over a process group: the "gather" strategy.

Rank r holds rows [o_r, o_r + n_r) of every modality x^1..x^M; N = sum n_q. For anchor a,
column j of the logits is W^a_j = prod_k x^{o_k}[perm[a, k, j]] (the other modalities in
list order, shuffled by GLOBAL permutations of range(N)), column i replaced by the
positive s MIP_i. A column is built from rows of any rank, so the strategy is "gather":
the (N, M, D) representations are all-gathered once, every rank builds W^a (N, D) and
computes its anchor rows against it, a block of rows at a time (row statistics only);
L = 1/(M N) sum_r sum_a sum_{i in r} (row_lse^a_i - s MIP_i), one scalar all-reduce.
Backward: the tiles' gradients (autograd inside each block, row LSEs fixed) reach the
gathered representations through the products W^a, and a reduce-scatter routes them to
their owners. "ring" is not implemented (the columns index arbitrary ranks).

Permutations: the single-process loss draws ONE (M, M-1, N) tensor with
``symile_negative_permutations(M, N, generator=generator)`` (the default CPU generator
when ``generator`` is None). Here group rank 0 draws it the same way with the GLOBAL N
(from its ``generator``, or its default generator) and broadcasts it, so the loss equals
``flashcontrast.symile_loss`` of the concatenated batch run with the generator state of
rank 0; other ranks' generators are neither read nor advanced. Explicit ``permutations``
(M, M-1, N) with global row indices must be identical on every rank (a checksum in the
metadata exchange verifies it: a mismatch raises on every rank).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._sampling import symile_negative_permutations
from .._validation import accumulation_dtype, as_scalar_tensor
from ..backends.blockwise import block_rows
from ..objectives.symile import _check_representations, _permutations
from . import _comm


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
        d_diag = torch.full((n,), -m * coef, dtype=acc, device=x.device)
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


def _checksum(t: Tensor) -> int:
    flat = t.reshape(-1).to(device="cpu", dtype=torch.int64)
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

    Each rank passes its own rows: M >= 3 tensors (n_r, D) (n_r may differ between ranks;
    M, D and dtype may not). Every rank returns :func:`flashcontrast.symile_loss` of the
    concatenation of the shards in rank order with the same permutations: group rank 0
    draws them over the GLOBAL N from ``generator`` (or its default CPU generator), as the
    single-process call would, and broadcasts them; explicit ``permutations``
    (M, M-1, N) hold GLOBAL row indices and must be identical on every rank (checked).
    Gradients as :func:`flashcontrast.distributed.clip_loss`. ``strategy="gather"`` only
    ("ring" raises NotImplementedError); ``negative_sampling="n_squared"`` raises
    NotImplementedError.
    """
    _comm.check_backend("symile_loss", backend)

    def check():
        if negative_sampling != "n":
            raise NotImplementedError(
                'only negative_sampling="n" is distributed; got '
                f"{negative_sampling!r} (use flashcontrast.symile_loss in one process)"
            )
        reps = _check_representations(representations)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if permutations is not None and generator is not None:
            raise ValueError("give either permutations or generator, not both")
        scale = as_scalar_tensor("logit_scale", logit_scale, reps[0])
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
            if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                raise TypeError(f"permutations must be an integer tensor, got {p.dtype}")
            if p.dim() != 3:
                raise ValueError(f"permutations must be (M, M-1, N), got {tuple(p.shape)}")
            fields = [len(reps), 1, p.shape[-1], _checksum(p)]
        n, d = reps[0].shape
        return (reps, scale, p), n, d, reps[0].dtype, reps[0].device, fields

    lay, (reps, scale, p) = _comm.setup_checked(
        "symile_loss",
        group,
        strategy,
        grad_scaling,
        ["number of modalities M", "permutations-or-not", "permutations N", "permutations"],
        check,
        ring=False,
    )
    m, n_tot, device = len(reps), lay.total, reps[0].device
    if p is not None:
        perms = _permutations(p, m, n_tot, device)  # the same outcome on every rank
    else:
        if lay.rank == 0:
            perms = symile_negative_permutations(m, n_tot, generator=generator, device=device)
        else:
            perms = torch.empty((m, m - 1, n_tot), dtype=torch.int64, device=device)
        perms = _comm.broadcast(perms.contiguous(), lay)
    x = torch.stack(reps, dim=1)  # (n_r, M, D), differentiable
    return _SymileDist.apply(x, scale, perms, lay, grad_scaling)
