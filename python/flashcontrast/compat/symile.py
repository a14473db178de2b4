"""``symile.Symile`` (pip ``symile``), on the fused kernels.

    from flashcontrast.compat.symile import Symile   # was: from symile import Symile
    loss = Symile(negative_sampling="n")([x, y, z], logit_scale)

Same constructor (``negative_sampling="n" | "n_squared"``), same call
``(representations, logit_scale)``, same 0-d loss. With ``"n"`` the negatives are drawn
exactly as the published package draws them: one ``torch.randperm(N)`` on the default CPU
generator per (anchor, other modality), anchors in list order, others in list order
(:func:`flashcontrast._sampling.symile_negative_permutations`), so after
``torch.manual_seed(k)`` the loss, the gradients and the generator state afterwards are
the published ones. ``"n_squared"`` draws nothing.

Deliberate differences: 16-bit representations give a float32 loss (the kernels
accumulate in float32; the published code works in the inputs' dtype). With M = 2
modalities (which the fused Symile kernels do not take: it is CLIP) the loss is computed
here: "n_squared" as :func:`flashcontrast.clip_loss` (all N candidates for both anchors,
which is CLIP's loss; the published 0.1.0 raises IndexError for M = 2), and "n" on the
pair engine (Symile's "n" op with M = 2), consuming the same random stream and returning
the published value (``backend="reference"``: the dense transcription,
``flashcontrast.reference.symile_two_modality_n_loss``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _dispatch, reference
from .._module import BackendLoss
from .._sampling import symile_negative_permutations
from .._validation import as_scalar_tensor, check_features
from ..objectives._symile_n import symile_n
from ..objectives.clip import clip_loss
from ..objectives.symile import NEGATIVE_SAMPLING, symile_loss

__all__ = ["Symile"]


def _two_modality_n(reps: Sequence[torch.Tensor], logit_scale, backend: str) -> torch.Tensor:
    """The published "n" loss for M = 2, drawing its permutations in its order: per anchor
    one "rows" sweep of the pair engine against the other modality's shuffled rows, the
    positive's logit overridden (the ``flashcontrast::symile_n`` op, M = 2)."""
    x = check_features("representations[0]", reps[0])
    y = check_features("representations[1]", reps[1])
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(
            "the two representations must share one (N, D) shape, dtype and device, got "
            f"{tuple(x.shape)} {x.dtype} on {x.device} and {tuple(y.shape)} {y.dtype} on "
            f"{y.device}"
        )
    perms = symile_negative_permutations(2, x.shape[0], device=x.device)  # (2, 1, N)
    scale = as_scalar_tensor("logit_scale", logit_scale, x)
    chosen = _dispatch.resolve("symile", x.device, backend, x.dtype)
    if chosen == "reference":
        return reference.symile_two_modality_n_loss([x, y], scale, perms)
    ce, _, _ = symile_n([x, y], perms, scale, chosen)  # (2, N)
    return ce.mean(dim=1).sum() / 2


class Symile(BackendLoss):
    """``symile.Symile``: ``Symile(negative_sampling="n")(representations, logit_scale)``.

    Args:
        negative_sampling: "n" (N - 1 shuffled negatives per positive, drawn from the
            default generator as the published package does) or "n_squared" (all
            N^(M-1) index tuples).
        backend: flashcontrast's backend ("auto", "cuda", "triton", "torch",
            "reference").

    Call: ``(representations, logit_scale)``: a list of M tensors (N, D) and the
    multiplier s (already exponentiated; float or tensor, which receives a gradient).
    Returns the 0-d loss (mean over anchors of the mean cross entropy).

    An invalid ``negative_sampling`` raises ValueError at construction (the published
    class raises it at the first call).
    """

    option_names = ("negative_sampling",)

    def __init__(self, negative_sampling: str = "n", *, backend: str = "auto") -> None:
        super().__init__(backend)
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"Invalid value for negative_sampling: expected 'n' or 'n_squared', "
                f"got {negative_sampling!r}"
            )
        self.negative_sampling = negative_sampling

    def forward(self, representations: Sequence[torch.Tensor], logit_scale) -> torch.Tensor:
        reps = list(representations)
        if len(reps) == 2:
            if self.negative_sampling == "n_squared":
                return clip_loss(reps[0], reps[1], logit_scale, backend=self.backend)
            return _two_modality_n(reps, logit_scale, self.backend)
        return symile_loss(
            reps, logit_scale, negative_sampling=self.negative_sampling, backend=self.backend
        )
