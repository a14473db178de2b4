"""CLIP InfoNCE (docs/objectives.md section 1): checks, torch.library ops, autograd, public API.

L = 1/2 [mean_i (LSE_j S_ij - S_ii) + mean_j (LSE_i S_ij - S_jj)], S = s A B^T + b, on the pair
engine (``backends/pair.py``): one "softmax" sweep gives the row and column logsumexps and
the positives' (the diagonal), and its backward the gradients of the whole loss.

Groups (``groups=``, optional (N,) integer ids): S_ij with i != j and groups_i == groups_j
is excluded (-inf) from both LSEs; the backends mask per tile from the (N,) vector.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._amp import autocast_off
from .._validation import Scalar, check_groups, pair_arguments
from ..backends.pair import Pair
from ._pair_op import sweep


def _check_groups(groups: object, a: Tensor) -> Optional[Tensor]:
    """The (N,) group ids of ``a``'s rows, checked (``_validation.check_groups``)."""
    return check_groups(groups, a.shape[0], a.device)


def _reference_masked(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], groups: Tensor
) -> Tensor:
    """backend="reference" with groups: the dense N x N computation (tests, small N)."""
    logits = scale * (a @ b.T)
    if bias is not None:
        logits = logits + bias
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    logits = logits.masked_fill((groups[:, None] == groups[None, :]) & ~eye, float("-inf"))
    diag = logits.diagonal()
    return clip_loss_from_stats(logits.logsumexp(1), logits.logsumexp(0), diag)


def clip_loss_from_stats(row_lse: Tensor, col_lse: Tensor, diag: Tensor) -> Tensor:
    """L = 1/2 [mean_i (LSE_j S_ij - S_ii) + mean_j (LSE_i S_ij - S_jj)]."""
    return 0.5 * ((row_lse - diag).mean() + (col_lse - diag).mean())


#: CLIP on the pair engine: row and column softmaxes, the positive of row i at column i.
PAIR = Pair("softmax")


def clip_from_sweep(st: dict) -> Tensor:
    """The loss from the engine's logsumexps: 1/2 [mean(row - pos) + mean(col - cpos)]."""
    return 0.5 * ((st["row"] - st["pos"]).mean() + (st["col"] - st["cpos"]).mean())


@autocast_off
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    groups: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, without materializing the N x N logits.

    S = logit_scale * image_features @ text_features.T + logit_bias, positives on the
    diagonal, and L = 1/2 [CE(S, arange(N)) + CE(S.T, arange(N))], as OpenCLIP's ClipLoss
    (single process). Features are used as given: normalize them first, as OpenCLIP does.

    Args:
        image_features: (N, D) float32, float16, bfloat16 or float64.
        text_features: (N, D), same dtype and device as ``image_features``.
        logit_scale: the multiplier s (already exponentiated): a float or a one-element
            tensor, which receives a gradient when it requires one.
        logit_bias: optional additive bias b, a float or a one-element tensor.
        groups: optional int32 or int64 tensor of shape (N,), on the features' device:
            group ids for false-negative masking. Samples i != j with
            ``groups[i] == groups[j]`` are not negatives of each other: S_ij is excluded
            (treated as -inf) from BOTH the row logsumexp of row i and the column
            logsumexp of column j, i.e.

                L = 1/2 [ mean_i (LSE_{j in K_i} S_ij - S_ii)
                          + mean_j (LSE_{i in K_j} S_ij - S_jj) ],
                K_i = {i} U {j : groups[j] != groups[i]}

            (the relation is symmetric, so the same set serves rows and columns). The
            positive pair S_ii always stays, so every term is finite; a row whose
            samples all share its group contributes 0 and gets no gradient. All ids
            distinct is the same as ``groups=None``. Ids are compared only for equality
            (any values, negatives included); groups receives no gradient. The kernels
            load the (N,) ids per tile: no N x N mask is built (except by
            backend="reference", which materializes everything anyway).
        backend: "auto", "cuda", "triton", "torch" or "reference"
            (see :func:`flashcontrast.backend_for`).

    Returns:
        The mean loss, a 0-d tensor: float32 for float32/float16/bfloat16 features (the
        kernels accumulate in float32), float64 for float64 features.

    NaN or inf in the inputs are not checked for and propagate to the loss.
    """
    a, b, scale, bias = pair_arguments(
        "image_features", image_features, "text_features", text_features, logit_scale, logit_bias
    )
    g = _check_groups(groups, a)
    chosen = _dispatch.resolve("clip", a.device, backend, a.dtype)
    if chosen == "reference":
        if g is not None:
            return _reference_masked(a, b, scale, bias, g)
        return reference.clip_loss(a, b, scale, bias)
    groups_ = None if g is None else (g, g)
    return clip_from_sweep(sweep(a, b, scale, bias, PAIR, chosen, groups=groups_))
