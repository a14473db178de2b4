"""nn.Module wrappers over :mod:`flashcontrast.functional`."""

from __future__ import annotations

from typing import Optional

import torch

from . import functional
from ._module import BackendLoss
from ._validation import Scalar
from .objectives.contrastive_gap import ContrastiveGapLoss
from .objectives.cwcl import CWCLLoss
from .objectives.gram import GramLoss
from .objectives.multipositive import MultiPositiveInfoNCELoss
from .objectives.multiview import MultiviewDHELLoss, MultiviewInfoNCELoss
from .objectives.siglip import SigLipLoss
from .objectives.supcon import SupConLoss
from .objectives.symile import SymileLoss

__all__ = [
    "CWCLLoss",
    "ClipLoss",
    "ContrastiveGapLoss",
    "GramLoss",
    "MultiPositiveInfoNCELoss",
    "MultiviewDHELLoss",
    "MultiviewInfoNCELoss",
    "SigLipLoss",
    "SupConLoss",
    "SymileLoss",
]


class ClipLoss(BackendLoss):
    """CLIP's symmetric InfoNCE as a module: ``ClipLoss()(img, txt, logit_scale)``.

    Computes what OpenCLIP's single-process ``ClipLoss`` computes and returns the loss
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
        groups: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(N, D), (N, D), scalar, optional scalar, optional (N,) int group ids -> 0-d mean
        loss. ``groups``: see :func:`flashcontrast.clip_loss` (same-group pairs i != j are
        not negatives)."""
        return functional.clip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            groups=groups,
            backend=self.backend,
        )
