"""The public loss functions. Each checks its inputs, resolves the backend and calls the
shared ops of ``_ops.py``; the semantics live here once, whatever backend runs."""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _ops, reference
from ._validation import Scalar, as_scalar_tensor, check_features, check_pair


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
    loss, _, _ = _ops.clip_fwd(a, b, scale, bias, chosen)
    return loss
