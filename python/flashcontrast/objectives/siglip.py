"""SigLIP (objectives.md section 2): checks, torch.library ops, autograd, public API.

S = s A B^T + b, z_ij = +1 on the diagonal and -1 elsewhere,
L = -(1/N) sum_ij log sigmoid(z_ij S_ij). Every pair is independent, so the backends
return one number, the tile sum ``total = sum_ij -log sigmoid(z_ij S_ij)`` (no O(N)
statistics at all), and the backward recomputes each tile with
dL/dS_ij = (1/N) (sigmoid(S_ij) - [i == j]). The division by N happens here, once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _dispatch, reference
from .._amp import autocast_off
from .._ops import backend_module
from .._validation import (
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_features,
    check_pair,
)

__all__ = ["SigLipLoss", "siglip_loss"]


@torch.library.custom_op("flashcontrast::siglip_fwd", mutates_args=())
@autocast_off
def siglip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """The loss (0-d): total / N, total = sum_ij -log sigmoid(z_ij S_ij)."""
    total = backend_module(backend, "siglip").siglip_forward(a, b, scale, bias)
    return total / a.shape[0]


@siglip_fwd.register_fake
def _siglip_fwd_fake(a, b, scale, bias, backend):
    return a.new_empty((), dtype=accumulation_dtype(a.dtype))


@torch.library.custom_op("flashcontrast::siglip_bwd", mutates_args=())
@autocast_off
def siglip_bwd(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    grad: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dA (N, D), dB (N, D), d(scale) and d(bias) (0-d) for upstream gradient ``grad``."""
    return backend_module(backend, "siglip").siglip_backward(a, b, scale, bias, grad)


@siglip_bwd.register_fake
def _siglip_bwd_fake(a, b, scale, bias, grad, backend):
    acc = accumulation_dtype(a.dtype)
    return (
        torch.empty_like(a, memory_format=torch.contiguous_format),
        torch.empty_like(b, memory_format=torch.contiguous_format),
        a.new_empty((), dtype=acc),
        a.new_empty((), dtype=acc),
    )


def _siglip_setup_context(ctx, inputs, output) -> None:
    a, b, scale, bias, backend = inputs
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, b, scale, bias)


def _siglip_backward(ctx, grad_loss):
    a, b, scale, bias = ctx.saved_tensors
    acc = accumulation_dtype(a.dtype)
    da, db, dscale, dbias = siglip_bwd(a, b, scale, bias, grad_loss.to(acc), ctx.backend)
    return da, db, dscale, (dbias if ctx.has_bias else None), None


torch.library.register_autograd(
    "flashcontrast::siglip_fwd", _siglip_backward, setup_context=_siglip_setup_context
)


@autocast_off
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, without materializing the N x N logits.

    S = logit_scale * image_features @ text_features.T + logit_bias, z = +1 on the
    diagonal and -1 elsewhere, L = -(1/N) sum_ij log sigmoid(z_ij S_ij): a sum over all
    N^2 pairs divided by N, as OpenCLIP's SigLipLoss (single process). Features are used
    as given: normalize them first, as OpenCLIP does.

    Args:
        image_features: (N, D) float32, float16, bfloat16 or float64.
        text_features: (N, D), same dtype and device as ``image_features``.
        logit_scale: the multiplier s (already exponentiated): a float or a one-element
            tensor, which receives a gradient when it requires one.
        logit_bias: the bias b (SigLIP learns it, initialised at -10), a float or a
            one-element tensor; required positionally as in OpenCLIP, None means 0.
        backend: "auto", "cuda", "triton", "torch" or "reference"
            (see :func:`flashcontrast.backend_for`).

    Returns:
        The loss, a 0-d tensor: float32 for float32/float16/bfloat16 features (the
        kernels accumulate in float32), float64 for float64 features.

    NaN or inf in the inputs are not checked for and propagate to the loss.
    """
    a = check_features("image_features", image_features)
    b = check_features("text_features", text_features)
    check_pair("image_features", a, "text_features", b)
    scale = as_scalar_tensor("logit_scale", logit_scale, a)
    bias = as_scalar_tensor("logit_bias", logit_bias, a, required=False)
    chosen = _dispatch.resolve("siglip", a.device, backend, a.dtype)
    if chosen == "reference":
        return reference.siglip_loss(a, b, scale, bias)
    if chosen == "triton" and a.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16, not float64")
    return siglip_fwd(a, b, scale, bias, chosen)


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss as a module: ``SigLipLoss()(img, txt, logit_scale, logit_bias)``.

    Computes what OpenCLIP's single-process ``SigLipLoss`` computes and returns the loss
    tensor itself. Holds no parameters: the logit scale and bias belong to the model.

    Args:
        backend: "auto", "cuda", "triton", "torch" or "reference".
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scalar,
        logit_bias: Optional[Scalar] = None,
    ) -> torch.Tensor:
        """(N, D), (N, D), scalar, scalar (None: 0) -> 0-d loss."""
        return siglip_loss(
            image_features, text_features, logit_scale, logit_bias, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
