"""CWCL over a process group: CLIP's process-group sweep plus the soft targets' moments.

Rank r holds rows [o_r, o_r + n_r) of A, B (n_r, D) and of the frozen embeddings U
(n_r, Du). The single-process loss (:func:`flashcontrast.cwcl_loss`, direction "both") is

    L = 1/2 [mean_i (LSE_j S_ij - T_i / W_i) + mean_j (LSE_i S_ij - T'_j / W_j)]
      = L_CLIP + mean_i [S_ii - 1/2 (T_i / W_i + T'_i / W_i)]
      = L_CLIP + (1/N) sum_i [s <a_i, b_i> - (s / 2) (R_i + C_i) / W_i]

(the bias cancels in the second term). L_CLIP is :mod:`.clip`'s process-group CLIP
(its strategies, statistics and gradients unchanged). R, C and W factor through the
batch's moments sum(a), sum(b), A^T U^, B^T U^, sum(u^) ((D, Du) matrices:
``objectives/cwcl.py``), so the soft-target term needs one all-reduce of
2 D + 2 D Du + Du floats in the forward and one of the upstream-weighted moments in the
backward, whatever N: every rank then has its rows' R, C, W and their gradients
locally. Bytes per rank beyond CLIP's: ar((2 D + 2 D Du + Du + 1) f) forward,
ar((2 D + 2 D Du + Du + 2) f) backward (the moments, the term's value, d scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack
from .._validation import accumulation_dtype, check_pair
from ..objectives import cwcl as single
from . import _comm
from .clip import _ClipDist

__all__ = ["cwcl_loss"]


def _all_reduce_moments(parts: tuple, lay: _comm.Layout) -> tuple:
    """The moments (sum(a), sum(b), A^T U^, B^T U^, sum(u^)) summed over ranks, in one
    all-reduce of their concatenation."""
    flat = _comm.all_reduce(torch.cat([x.reshape(-1) for x in parts]), lay)
    out, at = [], 0
    for x in parts:
        out.append(flat[at : at + x.numel()].view(x.shape))
        at += x.numel()
    return tuple(out)


class _SoftTargetTerm(torch.autograd.Function):
    """(1/N) sum_i [s <a_i, b_i> - (s/2) (R_i + C_i) / W_i] over the global batch (0-d,
    the same on every rank); gradients for this rank's a, b and for s."""

    @staticmethod
    @autocast_off
    def forward(ctx, a, b, u, scale, lay, grad_scaling):
        acc = accumulation_dtype(a.dtype)
        mom = _all_reduce_moments(single.moments(a, b, u), lay)
        r, c, w = single.target_sums(a, b, u, mom, lay.total)
        dots = (a.to(acc) * b.to(acc)).sum()  # transient: nothing of it is kept
        soft = ((r + c) / (2 * w)).sum()
        part = torch.stack([dots, soft])
        total = _comm.all_reduce(part.clone(), lay)  # (sum <a_i, b_i>, sum (R + C) / 2W)
        ctx.save_for_backward(a, b, u, scale, w, *mom)
        ctx.lay, ctx.grad_scaling, ctx.parts = lay, grad_scaling, part
        return scale * (total[0] - total[1]) / lay.total

    @_comm.exchange_backward
    def backward(ctx, grad):
        a, b, u, scale, w, *mom = ctx.saved_tensors
        lay = ctx.lay
        acc = accumulation_dtype(a.dtype)
        g = _comm.mean_upstream(grad, lay, acc) / lay.total
        # d/dR_i = d/dC_i = -g s / (2 W_i); d/d<a_i, b_i> = g s
        gr = -g * scale / (2 * w)
        weighted = _all_reduce_moments(single.moments(a, b, u, gr, gr), lay)
        da, db = single.target_grads(a, b, u, gr, gr, tuple(mom), weighted, direct=g * scale)
        dscale = _comm.all_reduce((g * (ctx.parts[0] - ctx.parts[1])).reshape(1), lay)[0]
        if ctx.grad_scaling == "ddp":
            da, db = da * lay.world, db * lay.world
        return da, db, None, dscale, None, None


def cwcl_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    weight_features: Tensor,
    **options: Unpack[_comm.ProcessGroupOptions],
) -> Tensor:
    """CWCL (:func:`flashcontrast.cwcl_loss`, the paper's weights, direction "both") over
    the global batch of a process group.

    Each rank passes its shard (n_r, D) of both towers' features and (n_r, Du) of the
    frozen embeddings (n_r may differ between ranks, and be 0 on some); every rank
    returns the single-process loss of the concatenation in rank order. Gradients as
    :func:`flashcontrast.distributed.clip_loss` (``grad_scaling`` "ddp": feature
    gradients W x the single-process ones of this rank's rows, ``logit_scale`` /
    ``logit_bias`` the single-process ones on every rank; "sum": 1x); the frozen
    embeddings get none. ``strategy`` and ``backend`` choose CLIP's sweep (module
    docstring). D, Du, dtype, bias given, strategy, backend and grad_scaling must agree
    on every rank (checked in one metadata exchange: a mismatch or a bad input on one
    rank raises on every rank).
    """
    group, strategy, backend, grad_scaling = _comm.options("cwcl_loss", options)

    def check():
        a = _comm.check_shard("image_features", image_features)
        b = _comm.check_shard("text_features", text_features)
        check_pair("image_features", a, "text_features", b)
        u = _comm.check_shard("weight_features", weight_features)
        if u.shape[0] != a.shape[0] or u.device != a.device:
            raise ValueError(
                f"weight_features must be ({a.shape[0]}, Du) on {a.device} like this rank's "
                f"features, got {tuple(u.shape)} on {u.device}"
            )
        scale = _comm.scalar("logit_scale", logit_scale, a)
        bias = _comm.scalar("logit_bias", logit_bias, a, required=False)
        chosen = _comm.engine_backend("clip", backend, a)
        flags = [bias is not None, u.shape[1]]
        return (a, b, u.detach(), scale, bias, chosen), *a.shape, a.dtype, a.device, flags

    fields = ["logit_bias given", "weight_features' Du"]
    lay, (a, b, u, scale, bias, chosen) = _comm.setup_checked(
        "cwcl_loss", group, strategy, grad_scaling, backend, fields, check,
        backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    clip = _ClipDist.apply(a, b, scale, bias, None, lay, strategy, grad_scaling, chosen)
    return clip + _SoftTargetTerm.apply(a, b, u, scale, lay, grad_scaling)
