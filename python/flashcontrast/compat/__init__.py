"""Drop-in replacements for the published contrastive losses: switch with one import.

=============================================  ============================================
published                                      flashcontrast.compat
=============================================  ============================================
``open_clip.loss.ClipLoss``                    ``open_clip.ClipLoss``
``open_clip.loss.SigLipLoss``                  ``open_clip.SigLipLoss``
``symile.Symile``                              ``symile.Symile``
GRAM ``utils/volume.py::volume_computation``   ``gram.volume_computation``
GRAM d2a + a2d volume loss (``model/gram``)    ``gram.gram_contrastive_loss`` (+ module)
Multi-View-CL ``models/losses.py::MVINFONCE``  ``multiview.MVInfoNCE`` (alias ``MVINFONCE``)
Multi-View-CL ``models/losses.py::MVDHEL``     ``multiview.MVDHEL``
``info_nce.InfoNCE`` (info-nce-pytorch)        ``info_nce.InfoNCE`` / ``info_nce.info_nce``
``pytorch_metric_learning.losses.SupConLoss``  ``pytorch_metric_learning.SupConLoss``
``sentence_transformers.losses.*RankingLoss``  ``sentence_transformers.*`` (same names)
=============================================  ============================================

Each class keeps the published constructor and call signature and return value (OpenCLIP's
``output_dict``, Multi-View-CL's ``(loss, 0)`` pair, ...) and computes with the fused,
memory-linear kernels of :mod:`flashcontrast`. Where the result deliberately differs from
the published one (finite gradients where theirs are NaN, no overflow where theirs
overflows, float32 results for 16-bit inputs) the class docstring says so.

Usage: ``from flashcontrast.compat.open_clip import ClipLoss`` where the code had
``from open_clip.loss import ClipLoss``.
"""

# sentence_transformers imports its package lazily, on first use of a class
from . import (
    gram,
    info_nce,
    multiview,
    open_clip,
    pytorch_metric_learning,
    sentence_transformers,
    symile,
)

__all__ = [
    "gram",
    "info_nce",
    "multiview",
    "open_clip",
    "pytorch_metric_learning",
    "sentence_transformers",
    "symile",
]
