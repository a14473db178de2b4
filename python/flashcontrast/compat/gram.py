"""GRAM's volume and volume contrastive loss (ispamm/GRAM), on the fused kernels.

GRAM's code (``utils/volume.py`` and the training loss in ``model/gram.py``)::

    volume = volume_computation(feat_t, feat_v, feat_a) / contra_temp      # (N, N)
    volumeT = volume_computation(feat_t_all, feat_v, feat_a).T / contra_temp
    loss = (F.cross_entropy(-volume, targets, label_smoothing=0.1)         # d2a
            + F.cross_entropy(-volumeT, targets, label_smoothing=0.1)) / 2  # a2d

becomes, single process (where ``volumeT`` is ``volume.T``)::

    from flashcontrast.compat.gram import gram_contrastive_loss, volume_computation
    loss = gram_contrastive_loss(feat_t, feat_v, feat_a, temperature=contra_temp)

:func:`gram_contrastive_loss` never builds the (N, N, M, M) Gram tensor nor the (N, N)
volumes (:func:`flashcontrast.gram_loss`); :func:`volume_computation` (for retrieval and
evaluation) returns the (N_a, N_o) volumes, as the published function does.

Deliberate differences from the published code:

* The volume is ``sqrt(det G)`` above a degeneracy floor and exactly 0, with derivative
  0, where det G is within rounding of 0 (det G <= 64 eps |t|^2 prod |o^r|^2, Hadamard's
  bound; ``flashcontrast.objectives.gram``), where GRAM takes ``sqrt(|det G|)``: the
  values differ only there (GRAM's are sqrt of rounding noise, at most 0.3 % of the
  norms' product in float32), and the gradients are FINITE and free of rounding noise
  where det G = 0 (collinear or coincident vectors, e.g. an anchor equal to another
  modality's vector), where GRAM's are NaN. NaN inputs give NaN volumes, as GRAM's.
* The fused backends do not call ``torch.det`` per pair: det G_ij comes from the
  adjugate expansion det(H_j) t_i.t_i - u_ij^T adj(H_j) u_ij (docs/objectives.md), equal up
  to rounding.
* Gradient: by default the loss's full gradient. GRAM's training code gathers the
  features with a no-grad all_gather, even on one process, so its d2a term
  differentiates only the anchor and its a2d term only the other modalities:
  ``gram_contrastive_loss(..., gradient="published")`` reproduces that gradient (same
  value, one more backward sweep).
* dtype: GRAM computes ``torch.det(G.float())`` and so returns float32 volumes even for
  float64 inputs; here float64 inputs give float64 volumes and loss (32/16-bit inputs
  give float32, as GRAM).
"""

from __future__ import annotations

from typing import Union

import torch

from .._module import BackendLoss
from ..objectives.gram import gram_loss, gram_volume

__all__ = [
    "GramContrastiveLoss",
    "gram_contrastive_loss",
    "volume_computation",
    "volume_computation3",
    "volume_computation4",
    "volume_computation5",
]

Temperature = Union[float, torch.Tensor]


def volume_computation(anchor: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """GRAM ``volume_computation(anchor, *inputs)``: (N_a, N_o) Gramian volumes.

    ``out[i, j]`` is the volume of the parallelotope spanned by ``anchor[i]`` and
    ``inputs[k][j]`` for every k: ``sqrt(det Gram(anchor_i, inputs_1j, ..., inputs_Kj))``.
    Differentiable, finite gradients at det = 0 (module docstring).

    Args:
        anchor: (N_a, D), GRAM's ``language``.
        *inputs: K >= 1 tensors (N_o, D), same dtype and device as ``anchor``.
    """
    if not inputs:
        raise TypeError("volume_computation needs at least one other modality in *inputs")
    return gram_volume(anchor, list(inputs))


def volume_computation3(language, video, audio):
    """GRAM ``volume_computation3(language, video, audio)``."""
    return volume_computation(language, video, audio)


def volume_computation4(language, video, audio, subtitles):
    """GRAM ``volume_computation4(language, video, audio, subtitles)``."""
    return volume_computation(language, video, audio, subtitles)


def volume_computation5(language, video, audio, subtitles, depth):
    """GRAM ``volume_computation5(language, video, audio, subtitles, depth)``."""
    return volume_computation(language, video, audio, subtitles, depth)


def gram_contrastive_loss(
    anchor: torch.Tensor,
    *inputs: torch.Tensor,
    temperature: Temperature = 0.07,
    label_smoothing: float = 0.1,
    gradient: str = "full",
    backend: str = "auto",
) -> torch.Tensor:
    """GRAM's two-direction volume loss, ``(CE(-V / T) + CE(-V^T / T)) / 2``, label-smoothed.

    ``V = volume_computation(anchor, *inputs)``, positives on the diagonal; the first term
    classifies, for each anchor (text) sample, its own tuple of the other modalities
    ("d2a"), the second, for each tuple, its own anchor ("a2d"). GRAM divides the volumes
    by a learned temperature (``contra_temp``, initialised at 0.07) and trains with
    ``label_smoothing=0.1``.

    Args:
        anchor: (N, D). *inputs: K >= 1 tensors (N, D), same dtype and device.
        temperature: T, a float or a one-element tensor (gets a gradient when it requires
            one, like GRAM's ``nn.Parameter``).
        label_smoothing: in [0, 1), in both cross entropies.
        gradient: "full" (default): the gradient of the loss above. "published": the
            gradient GRAM's training code gets. Its loss (``model/gram.py``) takes
            ``volume = volume_computation(feat_t, feat_v_all, feat_a_all)`` and
            ``volumeT = volume_computation(feat_t_all, feat_v, feat_a).T`` where the
            ``*_all`` tensors come from ``concat_all_gather``, an all_gather WITHOUT
            gradient, even on one process: so the d2a term differentiates the anchor
            only and the a2d term the other modalities only (the temperature gets both).
            Same value; one more backward sweep. Choose "published" to reproduce a GRAM
            training run; "full" is the loss's true gradient.
        backend: flashcontrast's backend ("auto", "triton", "torch", "reference").

    Returns:
        The 0-d loss (float32 for 32/16-bit inputs, float64 for float64).
    """
    if not inputs:
        raise TypeError("gram_contrastive_loss needs at least one other modality in *inputs")
    return gram_loss(
        anchor,
        list(inputs),
        1.0 / temperature,
        label_smoothing=label_smoothing,
        gradient=gradient,
        backend=backend,
    )


class GramContrastiveLoss(BackendLoss):
    """:func:`gram_contrastive_loss` as a module: ``GramContrastiveLoss()(t, v, a, temperature=T)``.

    Args:
        temperature: the default T when the call gives none (GRAM learns it: pass the
            parameter at call time to get its gradient).
        label_smoothing: GRAM's 0.1 by default.
        gradient: "full" (default) or "published" (:func:`gram_contrastive_loss`).
        backend: flashcontrast's backend.
    """

    option_names = ("temperature", "label_smoothing", "gradient")

    def __init__(
        self,
        temperature: float = 0.07,
        label_smoothing: float = 0.1,
        *,
        gradient: str = "full",
        backend: str = "auto",
    ) -> None:
        super().__init__(backend)
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.gradient = gradient

    def forward(self, anchor: torch.Tensor, *inputs: torch.Tensor, temperature=None):
        options = self.call_options()
        if temperature is not None:
            options["temperature"] = temperature
        return gram_contrastive_loss(anchor, *inputs, **options)
