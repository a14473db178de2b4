"""CWCL, the continuously weighted contrastive loss, memory-linear.

"CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss" (Srinivasa et
al., NeurIPS 2023) replaces CLIP's one-hot targets by soft ones taken from a frozen,
pre-trained modality: with u the frozen embeddings (N, Du) and c_ij = cos(u_i, u_j),

    w_ij = (1 + c_ij) / 2                      (in [0, 1]; w_ii = 1)
    S = s A B^T + b                            (A, B: the two towers' features (N, D))
    rows      L_i = -sum_j (w_ij / W_i) log softmax_j(S_i:)_j = LSE_j S_ij - T_i / W_i
    columns   L'_j = -sum_i (w_ij / W_j) log softmax_i(S_:j)_i = LSE_i S_ij - T'_j / W_j
    with W_i = sum_j w_ij (w is symmetric: the column sums are the row sums),
    T_i = sum_j w_ij S_ij, T'_j = sum_i w_ij S_ij.

The logsumexps are one "softmax" sweep of the pair engine without positives
(``backends/pair.py``, every backend). The soft-target sums are linear in the logits and,
for the paper's weights, factor through (D, Du) products (``flashcontrast::cwcl_target_sums``):

    sum_j w_ij <a_i, b_j> = 1/2 [<a_i, sum_j b_j> + a_i^T (B^T U^) u^_i]
    sum_j w_ij            = 1/2 [N + <u^_i, sum_j u^_j>]            (u^ = u / |u|)

so the whole loss costs the sweep plus O(N D Du) GEMM work, nothing N x N. A weight
``weight_fn(c)`` other than the paper's (any elementwise function of the cosine; it need
not factor) takes a blockwise path instead: (block, N) tiles of w and of <a_i, b_j>,
recomputed in the backward (O(N^2 (D + Du)) work, O(block N) memory).

The frozen embeddings get no gradient (they are the locked modality's; pass them
detached or not, they are treated as constants).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._amp import autocast_off
from .._module import BackendLoss
from .._validation import (
    FEATURE_DTYPES,
    Scalar,
    accumulation_dtype,
    check_strided,
    pair_arguments,
)
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = ["CWCLLoss", "cwcl_loss"]

DIRECTIONS = ("both", "image_to_text", "text_to_image")
#: rows of a (N, D) processed at a time by the soft-target sums: bounds their transients
_BLOCK = 4096
_BOTH = Pair("softmax", positives=False)
_ROWS = Pair("rows", positives=False)


def _unit(u: Tensor, acc: torch.dtype) -> Tensor:
    """u / max(|u|, 1e-12) per row (F.normalize's rule), in ``acc``."""
    u = u.to(acc)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _blocks(n: int, block: int):
    return ((i, min(i + block, n)) for i in range(0, n, block))


# ----------------------------------------------------------------------------- factored sums
# R_i = sum_j w_ij <a_i, b_j>, C_j = sum_i w_ij <a_i, b_j>, W_i = sum_j w_ij for
# w_ij = (1 + u^_i . u^_j) / 2. With Mb = B^T U^ and Ma = A^T U^ (D, Du):
#   R_i = 1/2 [a_i . sum(b) + a_i . Mb u^_i],  C_j = 1/2 [b_j . sum(a) + b_j . Ma u^_j].
# Backward, upstream gR, gC (N,):
#   dA = 1/2 [gR (sum(b) + U^ Mb^T) + 1 (gC^T B) + U^ (U^^T diag(gC) B)]
#   dB = 1/2 [gC (sum(a) + U^ Ma^T) + 1 (gR^T A) + U^ (U^^T diag(gR) A)]
# Every product is accumulated over row blocks, so no (N, D) float32 copy is made.


def moments(
    a: Tensor, b: Tensor, u: Tensor, ga: Optional[Tensor] = None, gb: Optional[Tensor] = None
) -> tuple:
    """sum(a), sum(b), A^T U^, B^T U^ (the weights ga, gb (N,) applied to a's and b's rows
    when given), sum(u^), in the accumulation dtype, over row blocks."""
    acc = accumulation_dtype(a.dtype)
    d, du = a.shape[1], u.shape[1]
    sa = a.new_zeros(d, dtype=acc)
    sb = a.new_zeros(d, dtype=acc)
    ma = a.new_zeros((d, du), dtype=acc)
    mb = a.new_zeros((d, du), dtype=acc)
    su = a.new_zeros(du, dtype=acc)
    for i0, i1 in _blocks(a.shape[0], _BLOCK):
        ab, bb, ub = a[i0:i1].to(acc), b[i0:i1].to(acc), _unit(u[i0:i1], acc)
        if ga is not None:
            ab = ga[i0:i1, None] * ab
        if gb is not None:
            bb = gb[i0:i1, None] * bb
        sa += ab.sum(0)
        sb += bb.sum(0)
        ma += ab.T @ ub
        mb += bb.T @ ub
        su += ub.sum(0)
    return sa, sb, ma, mb, su


def target_sums(a: Tensor, b: Tensor, u: Tensor, moments: tuple, n_total: int) -> tuple:
    """(R, C, W) (n,) of the rows a, b (n, D), u (n, Du) from the batch's ``moments``
    (:func:`moments` summed over the whole batch of ``n_total`` rows: over a process group
    the all-reduced ones)."""
    acc = accumulation_dtype(a.dtype)
    sa, sb, ma, mb, su = moments
    n = a.shape[0]
    r, c, w = (a.new_empty(n, dtype=acc) for _ in range(3))
    for i0, i1 in _blocks(n, _BLOCK):
        ab, bb, ub = a[i0:i1].to(acc), b[i0:i1].to(acc), _unit(u[i0:i1], acc)
        r[i0:i1] = 0.5 * (ab @ sb + ((ab @ mb) * ub).sum(1))
        c[i0:i1] = 0.5 * (bb @ sa + ((bb @ ma) * ub).sum(1))
        w[i0:i1] = 0.5 * (n_total + ub @ su)
    return r, c, w


def target_grads(
    a: Tensor,
    b: Tensor,
    u: Tensor,
    grad_r: Tensor,
    grad_c: Tensor,
    moments: tuple,
    weighted: tuple,
    direct: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(dA, dB) of the rows a, b (n, D) in their dtype for upstream gradients of R and C
    (n,) (derivation above :func:`cwcl_target_sums`): ``moments`` as for
    :func:`target_sums`, ``weighted`` the batch's :func:`moments` weighted by the
    upstream gradients (``ga`` = grad_r, ``gb`` = grad_c); ``direct`` (0-d, optional)
    adds direct * b to dA and direct * a to dB (a loss term linear in <a_i, b_i>)."""
    acc = accumulation_dtype(a.dtype)
    gr, gc = grad_r.to(acc), grad_c.to(acc)
    sa, sb, ma, mb, _ = moments
    ga_sum, gb_sum, qa, qb, _ = weighted  # gR^T A, gC^T B, A^T diag(gR) U^, B^T diag(gC) U^
    da, db = torch.empty_like(a), torch.empty_like(b)
    for i0, i1 in _blocks(a.shape[0], _BLOCK):
        ub = _unit(u[i0:i1], acc)
        dab = 0.5 * (gr[i0:i1, None] * (sb + ub @ mb.T) + gb_sum + ub @ qb.T)
        dbb = 0.5 * (gc[i0:i1, None] * (sa + ub @ ma.T) + ga_sum + ub @ qa.T)
        if direct is not None:
            dab = dab + direct * b[i0:i1].to(acc)
            dbb = dbb + direct * a[i0:i1].to(acc)
        da[i0:i1], db[i0:i1] = dab, dbb
    return da, db


@torch.library.custom_op("flashcontrast::cwcl_target_sums", mutates_args=())
@autocast_off
def cwcl_target_sums(a: Tensor, b: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(R, C, W), each (N,) in the accumulation dtype, for the paper's weights
    w_ij = (1 + cos(u_i, u_j)) / 2: R_i = sum_j w_ij <a_i, b_j>, C_j = sum_i w_ij <a_i, b_j>,
    W_i = sum_j w_ij. a, b (N, D); u (N, Du), any floating dtype."""
    return target_sums(a, b, u, moments(a, b, u), a.shape[0])


@cwcl_target_sums.register_fake
def _cwcl_target_sums_fake(a, b, u):
    acc = accumulation_dtype(a.dtype)
    return tuple(a.new_empty(a.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op("flashcontrast::cwcl_target_sums_bwd", mutates_args=())
@autocast_off
def cwcl_target_sums_bwd(
    a: Tensor, b: Tensor, u: Tensor, grad_r: Tensor, grad_c: Tensor
) -> tuple[Tensor, Tensor]:
    """(dA, dB) in the features' dtype for upstream gradients of R and C (N,) each
    (derivation above the forward)."""
    acc = accumulation_dtype(a.dtype)
    gr, gc = grad_r.to(acc), grad_c.to(acc)
    weighted = moments(a, b, u, gr, gc)
    return target_grads(a, b, u, gr, gc, moments(a, b, u), weighted)


@cwcl_target_sums_bwd.register_fake
def _cwcl_target_sums_bwd_fake(a, b, u, grad_r, grad_c):
    return torch.empty_like(a), torch.empty_like(b)


def _sums_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sums_backward(ctx, grad_r, grad_c, grad_w):
    a, b, u = ctx.saved_tensors
    n, acc = a.shape[0], accumulation_dtype(a.dtype)
    zero = a.new_zeros(n, dtype=acc)
    gr = zero if grad_r is None else grad_r
    gc = zero if grad_c is None else grad_c
    da, db = cwcl_target_sums_bwd(a, b, u, gr, gc)
    return da, db, None  # W depends on u only: no gradient


torch.library.register_autograd(
    "flashcontrast::cwcl_target_sums", _sums_backward, setup_context=_sums_setup
)


# ----------------------------------------------------------------------------- blockwise sums
# Any elementwise weight w_ij = f(c_ij): per row block, the (block, N) tiles
# Wt = f(U^_blk U^^T) and P = A_blk B^T; R = rowsum(Wt * P), C += colsum(Wt * P),
# W = rowsum(Wt). Backward: dP = Wt * (gR_i + gC_j); dA_blk = dP B, dB += dP^T A_blk.


class _BlockwiseTargetSums(torch.autograd.Function):
    """(R, C, W) as :func:`cwcl_target_sums` for any elementwise ``weight_fn``."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, u: Tensor, weight_fn: Callable, block: int):
        acc = accumulation_dtype(a.dtype)
        n = a.shape[0]
        r, w = (a.new_empty(n, dtype=acc) for _ in range(2))
        c = a.new_zeros(n, dtype=acc)
        for i0, i1, wt, bt in _weight_tiles(a, b, u, weight_fn, block):
            p = wt * (a[i0:i1].to(acc) @ bt.T)
            r[i0:i1] = p.sum(1)
            c += p.sum(0)
            w[i0:i1] = wt.sum(1)
        ctx.save_for_backward(a, b, u)
        ctx.weight_fn, ctx.block = weight_fn, block
        ctx.mark_non_differentiable(w)
        return r, c, w

    @staticmethod
    def backward(ctx, grad_r, grad_c, grad_w):
        a, b, u = ctx.saved_tensors
        acc = accumulation_dtype(a.dtype)
        n = a.shape[0]
        gr = a.new_zeros(n, dtype=acc) if grad_r is None else grad_r.to(acc)
        gc = a.new_zeros(n, dtype=acc) if grad_c is None else grad_c.to(acc)
        da = torch.empty_like(a)
        db = a.new_zeros(b.shape, dtype=acc)
        for i0, i1, wt, bt in _weight_tiles(a, b, u, ctx.weight_fn, ctx.block):
            dp = wt * (gr[i0:i1, None] + gc[None, :])
            da[i0:i1] = dp @ bt
            db += dp.T @ a[i0:i1].to(acc)
        return da, db.to(b.dtype), None, None, None


def _weight_tiles(a: Tensor, b: Tensor, u: Tensor, weight_fn: Callable, block: int):
    """(i0, i1, the (i1 - i0, N) weight tile f(c), B in the accumulation dtype) per row
    block; checks that ``weight_fn`` is elementwise (keeps the tile's shape)."""
    acc = accumulation_dtype(a.dtype)
    unit, bt = _unit(u, acc), b.to(acc)
    for i0, i1 in _blocks(a.shape[0], block):
        cos = unit[i0:i1] @ unit.T
        wt = weight_fn(cos)
        if not isinstance(wt, Tensor) or wt.shape != cos.shape:
            raise ValueError(
                "weight_fn must map the (block, N) cosine tile to weights of the same shape "
                f"(elementwise), got {getattr(wt, 'shape', type(wt).__name__)}"
            )
        yield i0, i1, wt.to(acc), bt


# ----------------------------------------------------------------------------- public API


def _check_weight_features(u: object, a: Tensor) -> Tensor:
    if not isinstance(u, Tensor):
        raise TypeError(f"weight_features must be a torch.Tensor (N, Du), got {type(u).__name__}")
    check_strided("weight_features", u)
    if u.dim() != 2 or u.shape[0] != a.shape[0] or u.shape[1] == 0:
        raise ValueError(
            f"weight_features must be (N, Du) with N = {a.shape[0]} and Du >= 1, "
            f"got {tuple(u.shape)}"
        )
    if u.dtype not in FEATURE_DTYPES:
        raise TypeError(
            f"weight_features must be float32, float16, bfloat16 or float64, got {u.dtype}"
        )
    if u.device != a.device:
        raise ValueError(f"weight_features must be on {a.device}, got {u.device}")
    return u.detach()


def _dense_terms(a, b, u, scale, bias, weight_fn) -> tuple[Tensor, Tensor]:
    """``backend="reference"``: (L (N,), L' (N,)) from the dense N x N logits and weights."""
    acc = accumulation_dtype(a.dtype)
    logits = scale.to(acc) * (a.to(acc) @ b.to(acc).T)
    if bias is not None:
        logits = logits + bias.to(acc)
    unit = _unit(u, acc)
    cos = unit @ unit.T
    w = (1 + cos) / 2 if weight_fn is None else weight_fn(cos).to(acc)
    rows = -((w / w.sum(1, keepdim=True)) * torch.log_softmax(logits, 1)).sum(1)
    cols = -((w / w.sum(0, keepdim=True)) * torch.log_softmax(logits, 0)).sum(0)
    return rows, cols


@autocast_off
def cwcl_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    weight_features: Tensor,
    weight_fn: Optional[Callable[[Tensor], Tensor]] = None,
    direction: str = "both",
    reduction: str = "mean",
    block_size: int = 1024,
    backend: str = "auto",
) -> Tensor:
    """CWCL (module docstring), without materializing an N x N matrix.

    Args:
        image_features: A (N, D) float32, float16, bfloat16 or float64 (one modality).
        text_features: B (N, D), same dtype and device (the other).
        logit_scale: s = 1 / tau (a float, or a one-element tensor that gets a gradient).
        logit_bias: optional b (cancels in every soft-target cross entropy; its gradient
            is 0 up to rounding).
        weight_features: u (N, Du), the frozen modality's embeddings that define the
            weights (in the paper the locked pre-trained tower's, which may be one of the
            two inputs); any floating dtype, the features' device; no gradient.
        weight_fn: None for the paper's w = (1 + c) / 2 (the factored O(N D Du) path), or
            an elementwise function of the (block, N) cosine tile c returning
            non-negative weights with positive row sums (the blockwise path; it is
            called again in the backward).
        direction: "both" (1/2 (mean_i L_i + mean_j L'_j), CLIP's convention; the
            paper's total is the sum of its two directions, twice this),
            "image_to_text" (mean_i L_i) or "text_to_image" (mean_j L'_j).
        reduction: "mean" (above) or "none": the tuple (L (N,), L' (N,)) (with one
            direction, the other is None).
        block_size: rows per tile of the blockwise ``weight_fn`` path.
        backend: "auto", "cuda", "triton", "torch" or "reference" (the dense formula)
            for the logsumexp sweep; the soft-target sums are torch GEMMs on any backend.

    Returns:
        0-d (or per-sample terms) in the accumulation dtype: float32 for 16-bit and
        float32 features, float64 for float64. NaN or inf in the inputs propagate.

    With weights w_ij = [i = j] (e.g. ``weight_fn=lambda c: (c > 1 - 1e-6).double()``
    for distinct u) the loss is CLIP's (:func:`flashcontrast.clip_loss`). No published
    implementation exists to match; ``tests/test_cwcl.py`` checks it against the
    formula in float64.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    a, b, scale, bias = pair_arguments(
        "image_features", image_features, "text_features", text_features, logit_scale, logit_bias
    )
    u = _check_weight_features(weight_features, a)
    chosen = _dispatch.resolve("clip", a.device, backend, a.dtype)
    if chosen == "reference":
        rows, cols = _dense_terms(a, b, u, scale, bias, weight_fn)
    else:
        if weight_fn is None:
            r, c, w = cwcl_target_sums(a, b, u)
        else:
            r, c, w = _BlockwiseTargetSums.apply(a, b, u, weight_fn, block_size)
        # T / W = s R / W + b: the bias cancels against the logsumexp's
        shift = 0 if bias is None else bias
        if direction == "both":
            st = sweep(a, b, scale, bias, _BOTH, chosen)
            rows = st["row"] - (scale * r / w + shift)
            cols = st["col"] - (scale * c / w + shift)
        elif direction == "image_to_text":
            rows = sweep(a, b, scale, bias, _ROWS, chosen)["row"] - (scale * r / w + shift)
        else:
            cols = sweep(b, a, scale, bias, _ROWS, chosen)["row"] - (scale * c / w + shift)
    if direction == "image_to_text":  # the other direction's terms are not the loss's
        cols = None
    elif direction == "text_to_image":
        rows = None
    if reduction == "none":
        return rows, cols
    if rows is None:
        return cols.mean()
    if cols is None:
        return rows.mean()
    return 0.5 * (rows.mean() + cols.mean())


class CWCLLoss(BackendLoss):
    """:func:`cwcl_loss` as a module:
    ``CWCLLoss()(image_features, text_features, logit_scale, weight_features=u)``.

    Args:
        weight_fn, direction: as :func:`cwcl_loss`.
        backend: "auto", "cuda", "triton", "torch" or "reference".
    """

    option_names = ("weight_fn", "direction")

    def __init__(
        self,
        weight_fn: Optional[Callable[[Tensor], Tensor]] = None,
        direction: str = "both",
        backend: str = "auto",
    ) -> None:
        super().__init__(backend)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.weight_fn = weight_fn
        self.direction = direction

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Optional[Scalar] = None,
        *,
        weight_features: Tensor,
    ) -> Tensor:
        """(N, D), (N, D), scalar, optional scalar, weight_features (N, Du) -> 0-d loss."""
        return cwcl_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            weight_features=weight_features,
            **self.call_options(),
        )
