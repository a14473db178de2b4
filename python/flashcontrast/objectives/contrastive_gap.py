"""The "contrastive gap" objectives, L_CUA and L_CUAXU: CLIP plus uniformity and alignment.

Fahim, Murphy & Fyshe 2024, "It's Not a Modality Gap: Characterizing and Addressing the
Contrastive Gap" (arXiv 2405.18570, https://arxiv.org/abs/2405.18570) add Wang & Isola's
uniformity and alignment terms, adapted to two modalities, to the CLIP loss:

    L_CUA   = L_CLIP + w_u L_Uniform + w_a L_Align
    L_CUAXU = L_CLIP + w_u L_Uniform + w_a L_Align + w_x L_XUniform

    L_CLIP     = 1/2 [CE(S, arange N) + CE(S^T, arange N)],  S = s X Y^T
    L_Uniform  = 1/2 [uniform(X) + uniform(Y)]
    uniform(Z) = log mean_{i < j} exp(-t ||z_i - z_j||^2)
    L_Align    = mean_i ||x_i - y_i||^2
    L_XUniform = log mean_{i != j} exp(-t ||x_i - y_j||^2)

with X the image and Y the text embeddings (N, D), t = 2 and w_u = w_a = w_x = 1.

Where each piece comes from. The stored copy of the paper
(https://arxiv.org/html/2405.18570v3) could be read only up to its abstract and
introduction here: it names the two objectives L_CUA and L_CUAXU and says they add the
uniformity and alignment properties of unimodal contrastive loss, adapted to the
multi-modal setting, to the CLIP loss. The term definitions and weights above are read
from the authors' code, https://github.com/abrar-fahim/contrastive-gap (snapshot
8c1a17bff93a83db48163d604376c0f876c959e8), ``clips/hf_clip.py``:

* the embeddings are L2-normalized first (line 342); the logits are
  ``normalized_image @ normalized_text.T * logit_scale.exp()`` (line 369), and the CLIP
  term is ``CE(logits_per_image) * 0.5 + CE(logits_per_text) * 0.5`` (line 564, the
  weights ``i_t_loss_weight`` = ``t_i_loss_weight`` = 0.5 of ``src/config.py``; their
  ``MyCrossEntropyLoss`` is the mean cross entropy);
* L_Uniform: ``torch.pdist(z, p=2).pow(2).mul(-2).exp().mean().log()`` for each modality,
  averaged with weights 1/2 (lines 387-393): t = 2, the pairs i < j within a modality;
* L_XUniform: ``torch.cdist(image, text)`` squared, the entries off the diagonal
  selected (both triangles: the N (N - 1) ordered pairs i != j), ``.mul(-2).exp().mean()
  .log()`` (lines 396-403);
* L_Align: ``(image - text).norm(dim=1).pow(2).mean()`` (line 417): alpha = 2;
* each added with weight 1: ``loss += 1 * uniformity_loss``, ``loss += 1 *
  cross_encoder_uniform_loss``, ``loss += 1 * alignment_loss`` (lines 653, 658, 672),
  each switched on by its config flag. The authors' checkpoints name the two
  combinations: ``'cua'`` is ``Lituniform_align`` and ``'cuaxu'``
  ``Lituniform_align_xuniform`` (``tests/evaluate_mistakes.ipynb``).

Assumed or differing here: the features are used as given (normalize them first, as the
authors' model does before every term); ``logit_scale`` is the multiplier s, already
exponentiated (their ``logit_scale.exp()``, 1 / 0.01 by default, clamped to at most 100
during training); the weights are exposed as keywords, defaulting to the authors' 1.

Every term is memory-linear on every backend: L_CLIP is :func:`flashcontrast.clip_loss`
(one "softmax" sweep), each uniformity :func:`flashcontrast.uniform_loss` and L_XUniform
:func:`flashcontrast.cross_uniform_loss` (one "rows" sweep each of
(sqrt(2t) x, -t |x|^2, 1) against (sqrt(2t) y, 1, -t |y|^2), the diagonal excluded;
``objectives/uniformity.py``), L_Align O(N D) torch.
"""

from __future__ import annotations

import inspect
import math
from typing import Mapping, Optional, TypedDict

import torch
from torch import Tensor

from .._amp import autocast_off
from .._keywords import Unpack, check_keywords
from .._module import BackendLoss
from .._validation import Scalar, check_features
from .clip import clip_loss
from .uniformity import align_loss, check_t, cross_uniform_loss, uniform_loss

__all__ = ["ContrastiveGapLoss", "GapOptions", "contrastive_gap_loss"]

#: the paper's two objectives: "cua" (CLIP + uniformity + alignment), "cuaxu" (+ cross-modal
#: uniformity)
VARIANTS = ("cua", "cuaxu")


def gap_weights(
    variant: str,
    t: object,
    uniformity_weight: object,
    alignment_weight: object,
    cross_uniformity_weight: object,
) -> tuple[float, float, float]:
    """The checked (w_u, w_a, w_x) of ``variant`` (w_x = 0 for "cua"; None: the authors'
    1 for "cuaxu"), after checking ``t``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_t(t)
    if variant == "cua" and cross_uniformity_weight is not None:
        raise ValueError(
            'cross_uniformity_weight is the weight of L_XUniform, which variant="cua" does '
            'not have: pass variant="cuaxu" (or leave it None)'
        )
    w_x = 0.0 if variant == "cua" else cross_uniformity_weight
    weights = (uniformity_weight, alignment_weight, 1.0 if w_x is None else w_x)
    names = ("uniformity_weight", "alignment_weight", "cross_uniformity_weight")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{name} must be a finite number, got {w!r}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]


class GapOptions(TypedDict, total=False):
    """The weighting keywords of :func:`contrastive_gap_loss`, which
    :class:`ContrastiveGapLoss` and ``flashcontrast.distributed.contrastive_gap_loss``
    take as ``**options``, with the function's defaults (one place: its signature):

    t: the uniformity kernel's temperature (2.0), for both uniformity terms.
    uniformity_weight, alignment_weight: w_u, w_a (1.0).
    cross_uniformity_weight: w_x, "cuaxu" only (None: 1.0).
    """

    t: float
    uniformity_weight: float
    alignment_weight: float
    cross_uniformity_weight: Optional[float]


def gap_options(name: str, variant: str, given: Mapping[str, object]) -> dict:
    """``variant`` and the :class:`GapOptions` ``given`` to ``name``, the defaults filled
    in (values unchecked: :func:`gap_weights` checks them); a key that is not an option
    raises the TypeError of a ``def``'s unknown keyword."""
    check_keywords(name, given, GapOptions.__annotations__)
    signature = inspect.signature(contrastive_gap_loss).parameters
    defaults = {k: signature[k].default for k in GapOptions.__annotations__}
    return {"variant": variant, **defaults, **given}


def gap_sum(clip: Tensor, unif: tuple, align: Tensor, xunif: Optional[Tensor], w: tuple) -> Tensor:
    """L_CLIP + w_u (U(X) + U(Y)) / 2 + w_a L_Align (+ w_x L_XUniform)."""
    loss = clip + w[0] * 0.5 * (unif[0] + unif[1]) + w[1] * align
    return loss if xunif is None else loss + w[2] * xunif


@autocast_off
def contrastive_gap_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    *,
    variant: str = "cua",
    t: float = 2.0,
    uniformity_weight: float = 1.0,
    alignment_weight: float = 1.0,
    cross_uniformity_weight: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """The "contrastive gap" paper's L_CUA (``variant="cua"``: CLIP + uniformity +
    alignment) or L_CUAXU (``"cuaxu"``: + cross-modal uniformity), without any N x N
    matrix (Fahim, Murphy & Fyshe 2024; the formula and its sources in the module
    docstring):

        L = clip_loss(X, Y, s) + w_u (uniform(X, t) + uniform(Y, t)) / 2
            + w_a mean_i ||x_i - y_i||^2 [+ w_x log mean_{i != j} exp(-t ||x_i - y_j||^2)]

    Args:
        image_features, text_features: (N, D), N >= 2, float32, float16, bfloat16 or
            float64, one dtype and device; used as given: L2-normalize them first, as the
            paper does.
        logit_scale: CLIP's multiplier s (already exponentiated, 1 / temperature): a
            float or a one-element tensor, which receives a gradient when it requires one.
        variant: "cua" or "cuaxu".
        t: the uniformity kernel's temperature (the paper's 2), for both uniformity terms.
        uniformity_weight, alignment_weight: w_u, w_a (the paper's 1).
        cross_uniformity_weight: w_x, "cuaxu" only (None: the paper's 1).
        backend: "auto", "cuda", "triton", "torch" or "reference", for every pairwise
            term.

    Returns:
        0-d: float32 for 32- and 16-bit features (the alignment term, too, is computed in
        float32), float64 for float64 features. NaN or inf propagate.
    """
    w = gap_weights(variant, t, uniformity_weight, alignment_weight, cross_uniformity_weight)
    x = check_features("image_features", image_features)
    y = check_features("text_features", text_features)
    if x.shape[0] < 2:
        raise ValueError(f"contrastive_gap_loss needs N >= 2 samples, got N = {x.shape[0]}")
    clip = clip_loss(x, y, logit_scale, backend=backend)  # checks the pair and the scale
    unif = (uniform_loss(x, t, backend=backend), uniform_loss(y, t, backend=backend))
    align = align_loss(x, y, 2.0)  # float32 for 16-bit features, no float32 copy saved
    xunif = cross_uniform_loss(x, y, t, backend=backend) if variant == "cuaxu" else None
    return gap_sum(clip, unif, align, xunif, w)


class ContrastiveGapLoss(BackendLoss):
    """L_CUA / L_CUAXU as a module: ``ContrastiveGapLoss("cuaxu")(img, txt, logit_scale)``
    (:func:`flashcontrast.contrastive_gap_loss`). Holds no parameters: the logit scale
    belongs to the model.

    Args:
        variant: "cua" or "cuaxu".
        backend: "auto", "cuda", "triton", "torch" or "reference".
        **options: t, uniformity_weight, alignment_weight, cross_uniformity_weight, as
            :func:`flashcontrast.contrastive_gap_loss` takes them (:class:`GapOptions`;
            checked here).
    """

    option_names = ("variant", *GapOptions.__annotations__)

    def __init__(
        self, variant: str = "cua", backend: str = "auto", **options: Unpack[GapOptions]
    ) -> None:
        super().__init__(backend)
        full = gap_options(type(self).__name__, variant, options)
        gap_weights(**full)
        for name, value in full.items():
            setattr(self, name, value)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar
    ) -> torch.Tensor:
        """(N, D), (N, D), scalar -> 0-d loss."""
        return contrastive_gap_loss(
            image_features, text_features, logit_scale, **self.call_options()
        )
