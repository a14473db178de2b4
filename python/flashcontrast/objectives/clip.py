"""CLIP InfoNCE (objectives.md section 1): checks, torch.library ops, autograd, public API.

L = 1/2 [mean_i (LSE_j S_ij - S_ii) + mean_j (LSE_i S_ij - S_jj)], S = s A B^T + b. The
backends compute (row LSE, column LSE, diagonal) and, from them, the gradients; the loss
is reduced here, once for all backends.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._ops import backend_module
from .._validation import (
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_features,
    check_pair,
)


def clip_loss_from_stats(row_lse: Tensor, col_lse: Tensor, diag: Tensor) -> Tensor:
    """L = 1/2 [mean_i (LSE_j S_ij - S_ii) + mean_j (LSE_i S_ij - S_jj)]."""
    return 0.5 * ((row_lse - diag).mean() + (col_lse - diag).mean())


@torch.library.custom_op("flashcontrast::clip_fwd", mutates_args=())
def clip_fwd(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d), row LSE (N,) and column LSE (N,) of S = scale * a @ b^T + bias."""
    row_lse, col_lse, diag = backend_module(backend, "clip").clip_forward(a, b, scale, bias)
    return clip_loss_from_stats(row_lse, col_lse, diag), row_lse, col_lse


@clip_fwd.register_fake
def _clip_fwd_fake(a, b, scale, bias, backend):
    acc = accumulation_dtype(a.dtype)
    n = a.shape[0]
    return a.new_empty((), dtype=acc), a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc)


@torch.library.custom_op("flashcontrast::clip_bwd", mutates_args=())
def clip_bwd(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    row_lse: Tensor,
    col_lse: Tensor,
    grad: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dA (N, D), dB (N, D), d(scale) and d(bias) (0-d) for upstream gradient ``grad``."""
    return backend_module(backend, "clip").clip_backward(a, b, scale, bias, row_lse, col_lse, grad)


@clip_bwd.register_fake
def _clip_bwd_fake(a, b, scale, bias, row_lse, col_lse, grad, backend):
    acc = accumulation_dtype(a.dtype)
    return (
        torch.empty_like(a, memory_format=torch.contiguous_format),
        torch.empty_like(b, memory_format=torch.contiguous_format),
        a.new_empty((), dtype=acc),
        a.new_empty((), dtype=acc),
    )


def _clip_setup_context(ctx, inputs, output) -> None:
    a, b, scale, bias, backend = inputs
    _, row_lse, col_lse = output
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _clip_backward(ctx, grad_loss, _grad_row, _grad_col):
    a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
    da, db, dscale, dbias = clip_bwd(
        a, b, scale, bias, row_lse, col_lse, grad_loss.to(row_lse.dtype), ctx.backend
    )
    return da, db, dscale, (dbias if ctx.has_bias else None), None


torch.library.register_autograd(
    "flashcontrast::clip_fwd", _clip_backward, setup_context=_clip_setup_context
)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
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
        backend: "auto", "cuda", "triton", "torch" or "reference"
            (see :func:`flashcontrast.backend_for`).

    Returns:
        The mean loss, a 0-d tensor: float32 for float32/float16/bfloat16 features (the
        kernels accumulate in float32), float64 for float64 features.

    NaN or inf in the inputs are not checked for and propagate to the loss.
    """
    a = check_features("image_features", image_features)
    b = check_features("text_features", text_features)
    check_pair("image_features", a, "text_features", b)
    scale = as_scalar_tensor("logit_scale", logit_scale, a)
    bias = as_scalar_tensor("logit_bias", logit_bias, a, required=False)
    chosen = _dispatch.resolve("clip", a.device, backend)
    if chosen == "reference":
        return reference.clip_loss(a, b, scale, bias)
    if chosen == "triton" and a.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16, not float64")
    loss, _, _ = clip_fwd(a, b, scale, bias, chosen)
    return loss
