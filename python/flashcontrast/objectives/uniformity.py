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
statistics. a and b are (N, D + 2) in float32 (float64 for float64 x), built by torch and
differentiated by autograd back to x (the norms' gradient included); for unit-norm x the
two extra columns are constants, -t and 1.

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

__all__ = ["align_loss", "cross_uniform_loss", "uniform_loss"]

#: every ordered pair i != j, no positives
PAIR = Pair("rows", positives=False, exclude_self=True)


def align_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """mean_i ||x_i - y_i||_2^alpha for paired (N, D) features (Wang & Isola's
    ``align_loss``; O(N D), no pairwise part)."""
    x = check_features("x", x)
    y = check_features("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def augmented(x: Tensor, t: float, y: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(a from x, b from y (N, D + 2), the unit scale): <a_i, b_j> = -t ||x_i - y_j||^2
    (y = x when None), in the accumulation dtype (the rows and columns of the uniformity
    sweep)."""
    acc = accumulation_dtype(x.dtype)
    root = math.sqrt(2.0 * t)

    def parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        za = z.to(acc)
        sq = -t * (za * za).sum(dim=1, keepdim=True)  # (N, 1)
        return root * za, sq, torch.ones_like(sq)

    xr, xsq, one = parts(x)
    yr, ysq, _ = (xr, xsq, one) if y is None else parts(y)
    a = torch.cat([xr, xsq, one], dim=1)
    b = torch.cat([yr, one, ysq], dim=1)
    return a, b, torch.ones((), dtype=acc, device=x.device)


def check_t(t: object) -> None:
    """The kernel's temperature must be a positive number (not a bool)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"t must be a positive number, got {t!r}")


def _mean_exp_log(x: Tensor, y: Optional[Tensor], t: float, chosen: str) -> Tensor:
    """log mean_{i != j} exp(-t ||x_i - y_j||^2) (y = x when None) by one row sweep."""
    a, b, unit = augmented(x, t, y)
    rows = sweep(a, b, unit, None, PAIR, chosen)["row"]  # LSE_{j != i} <a_i, b_j>
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
