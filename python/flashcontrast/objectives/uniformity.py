"""Alignment and uniformity (Wang & Isola 2020), the uniformity term on the pair engine.

As their published ``align_loss`` / ``uniform_loss`` compute them:

    align(x, y; alpha) = mean_i ||x_i - y_i||^alpha                      O(N D), plain torch
    uniform(x; t)      = log mean_{i < j} exp(-t ||x_i - x_j||^2)        (torch.pdist there)

Every published implementation forms the N (N - 1) / 2 pairwise distances. Here the mean
over i < j is the mean over i != j (the summand is symmetric), and

    -t ||x_i - x_j||^2 = 2t <x_i, x_j> - t |x_i|^2 - t |x_j|^2 = <a_i, b_j>,
    a_i = (sqrt(2t) x_i, -t |x_i|^2, 1),   b_j = (sqrt(2t) x_j, 1, -t |x_j|^2),

exactly, so uniform(x) = LSE_{i != j} <a_i, b_j> - log(N (N - 1)): one "rows" sweep of a
against b with the diagonal excluded (``backends/pair.py``) and a logsumexp over the N row
statistics. a and b are (N, D + 2) in float32 (float64 for float64 x), built inside the
sweep's op in its forward and again in its backward, and the gradient maps back to x by
the chain rule (the norms' part included; ``_augmented.py``): no float32 copy of 16-bit x
lives until the backward. For unit-norm x the two extra columns are constants, -t and 1.

Cross-modal uniformity (Fahim, Murphy & Fyshe 2024, the "contrastive gap" paper's
L_XUniform; :mod:`.contrastive_gap`) is the same sweep with b built from the other
modality: -t ||x_i - y_j||^2 = <a(x)_i, b(y)_j>, so

    cross_uniform(x, y; t) = log mean_{i != j} exp(-t ||x_i - y_j||^2)
                           = LSE_{i != j} <a(x)_i, b(y)_j> - log(N (N - 1)),

the N (N - 1) ordered image-text pairs that are not matching pairs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._amp import autocast_off
from .._validation import accumulation_dtype, check_features, check_pair
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = ["align_loss", "cross_uniform_loss", "paired_distances", "uniform_loss"]

#: every ordered pair i != j, no positives
PAIR = Pair("rows", positives=False, exclude_self=True)


@torch.library.custom_op("flashcontrast::paired_distances", mutates_args=())
@autocast_off
def paired_distances(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    """(N,) ||x_i - y_i||_2^alpha of paired (N, D) features, in the accumulation dtype.

    Its backward recomputes x_i - y_i from the inputs: d x_i = -d y_i = g_i alpha
    ||x_i - y_i||^(alpha - 2) (x_i - y_i), 0 where x_i = y_i (the subgradient 0 for any
    alpha). So only the inputs are saved, never a float32 difference of 16-bit features.
    """
    acc = accumulation_dtype(x.dtype)
    return (x.to(acc) - y.to(acc)).norm(p=2, dim=1).pow(alpha)


@paired_distances.register_fake
def _paired_distances_fake(x, y, alpha):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


def _distances_setup(ctx, inputs, output) -> None:
    x, y, ctx.alpha = inputs
    ctx.save_for_backward(x, y)


def _distances_backward(ctx, grad):
    x, y = ctx.saved_tensors
    acc = accumulation_dtype(x.dtype)
    diff = x.to(acc) - y.to(acc)
    norm = diff.norm(p=2, dim=1)
    coef = torch.where(norm > 0, ctx.alpha * norm.pow(ctx.alpha - 2.0), torch.zeros_like(norm))
    dx = diff.mul_((grad.to(acc) * coef)[:, None])
    return dx.to(x.dtype), (-dx).to(y.dtype), None


torch.library.register_autograd(
    "flashcontrast::paired_distances", _distances_backward, setup_context=_distances_setup
)


def align_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """mean_i ||x_i - y_i||_2^alpha for paired (N, D) features (Wang & Isola's
    ``align_loss``; O(N D), no pairwise part). 0-d, float32 for 16-bit features (float64
    for float64); differentiable in x and y (:func:`paired_distances`)."""
    x = check_features("x", x)
    y = check_features("y", y)
    check_pair("x", x, "y", y)
    return paired_distances(x, y, float(alpha)).mean()


def check_t(t: object) -> None:
    """The kernel's temperature must be a positive number (not a bool)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"t must be a positive number, got {t!r}")


def _mean_exp_log(x: Tensor, y: Optional[Tensor], t: float, chosen: str) -> Tensor:
    """log mean_{i != j} exp(-t ||x_i - y_j||^2) (y = x when None) by one row sweep."""
    unit = torch.ones((), dtype=accumulation_dtype(x.dtype), device=x.device)
    rows = sweep(x, y, unit, None, PAIR, chosen, augment_t=t)["row"]  # LSE_{j != i} <a_i, b_j>
    n = x.shape[0]
    return torch.logsumexp(rows, dim=0) - math.log(n * (n - 1))


@autocast_off
def uniform_loss(x: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    """log mean_{i < j} exp(-t ||x_i - x_j||^2) of x (N, D), N >= 2, without the N (N - 1) / 2
    distances (Wang & Isola's ``uniform_loss``; see the module docstring).

    Args:
        x: (N, D) float32, float16, bfloat16 or float64 features (normalize them first, as
            the paper does; any x is computed exactly as the published formula).
        t: the kernel's temperature t > 0 (a float).
        backend: "auto", "cuda", "triton", "torch" or "reference" (torch.pdist).

    Returns:
        0-d, float32 (float64 for float64 x). NaN or inf in x propagate.
    """
    x = check_features("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"uniform_loss needs N >= 2 samples (pairs i < j), got N = {x.shape[0]}")
    check_t(t)
    chosen = _dispatch.resolve("uniformity", x.device, backend, x.dtype)
    if chosen == "reference":
        return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
    return _mean_exp_log(x, None, t, chosen)


@autocast_off
def cross_uniform_loss(x: Tensor, y: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    """Cross-modal uniformity, log mean_{i != j} exp(-t ||x_i - y_j||^2), of paired (N, D)
    features x, y, N >= 2: every ordered pair of x's row i and y's row j but the N matching
    pairs i = j, without the N x N distances (the "contrastive gap" paper's L_XUniform, as
    its authors compute it: ``torch.cdist`` of the normalized image and text embeddings,
    squared, the off-diagonal entries selected; see :mod:`.contrastive_gap` and the module
    docstring). Symmetric in x and y.

    Args:
        x, y: (N, D) float32, float16, bfloat16 or float64 features of one shape, dtype and
            device (normalize them first, as the paper does).
        t: the kernel's temperature t > 0 (a float; the paper uses 2).
        backend: "auto", "cuda", "triton", "torch" or "reference" (the dense N x N
            distances).

    Returns:
        0-d, float32 (float64 for float64 features). NaN or inf propagate.
    """
    x = check_features("x", x)
    y = check_features("y", y)
    check_pair("x", x, "y", y)
    if x.shape[0] < 2:
        raise ValueError(
            f"cross_uniform_loss needs N >= 2 samples (pairs i != j), got N = {x.shape[0]}"
        )
    check_t(t)
    chosen = _dispatch.resolve("uniformity", x.device, backend, x.dtype)
    if chosen == "reference":
        sq = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
        off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        return sq[off].mul(-t).exp().mean().log()
    return _mean_exp_log(x, y, t, chosen)
