"""SigLIP (docs/objectives.md section 2): checks, torch.library ops, autograd, public API.

S = s A B^T + b, z_ij = +1 on the diagonal and -1 elsewhere,
L = -(1/N) sum_ij log sigmoid(z_ij S_ij), on the pair engine (``backends/pair.py``): the
"sigmoid" epilogue returns one number, the tile sum ``total = sum_ij -log sigmoid(z_ij
S_ij)`` (no O(N) statistics at all), and its backward recomputes each tile with
dL/dS_ij = (1/N) (sigmoid(S_ij) - [i == j]). The division by N happens here, once.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, reference
from .._amp import autocast_off
from .._module import BackendLoss
from .._validation import Scalar, pair_arguments
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = ["SigLipLoss", "siglip_loss"]


#: SigLIP on the pair engine: z = +1 on the positive (column i of row i), -1 elsewhere.
PAIR = Pair("sigmoid")


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
    a, b, scale, bias = pair_arguments(
        "image_features", image_features, "text_features", text_features, logit_scale, logit_bias
    )
    chosen = _dispatch.resolve("siglip", a.device, backend, a.dtype)
    if chosen == "reference":
        return reference.siglip_loss(a, b, scale, bias)
    return sweep(a, b, scale, bias, PAIR, chosen)["total"] / a.shape[0]


class SigLipLoss(BackendLoss):
    """SigLIP's sigmoid loss as a module: ``SigLipLoss()(img, txt, logit_scale, logit_bias)``.

    Computes what OpenCLIP's single-process ``SigLipLoss`` computes and returns the loss
    tensor itself. Holds no parameters: the logit scale and bias belong to the model.

    Args:
        backend: "auto", "cuda", "triton", "torch" or "reference".
    """

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
