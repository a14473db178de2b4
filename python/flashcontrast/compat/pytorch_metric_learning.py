"""``pytorch_metric_learning.losses.SupConLoss`` (pip ``pytorch-metric-learning``), fused.

    from flashcontrast.compat.pytorch_metric_learning import SupConLoss
    loss = SupConLoss(temperature=0.1)(embeddings, labels)     # (N, D), (N,)

Semantics (the published ones, with its defaults: ``CosineSimilarity`` distance and the
``AvgNonZeroReducer``): embeddings are L2-normalized, logits are cosines / temperature;
row i's positives are the other rows with its label, its denominator every row but
itself; its loss is minus the mean log-probability of its positives (0 for a row with
none); the loss is the mean of the row losses above 0, and 0 when the batch has no
positive pair or no negative pair. The pairwise part runs on the pair engine
(:func:`flashcontrast.supcon_loss`): O(N D) memory, no N x N matrix.

Deliberate differences: 16-bit embeddings give a float32 loss (the kernels accumulate in
float32); the published code's zero loss for a batch without pairs is
``sum(embeddings * 0)``, here a float32 0 with a zero gradient as well. Only
``forward(embeddings, labels)`` is fused: ``indices_tuple``, ``ref_emb`` and
``ref_labels`` (miners, reference sets) raise NotImplementedError, as do the published
options ``distance`` / ``reducer`` / ``embedding_regularizer`` other than the defaults.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._module import BackendLoss
from ..objectives.supcon import supcon_loss

__all__ = ["SupConLoss"]


class SupConLoss(BackendLoss):
    """``pytorch_metric_learning.losses.SupConLoss(temperature=0.1)``; see the module doc.

    Call: ``(embeddings (N, D), labels (N,))`` -> 0-d loss.
    """

    option_names = ("temperature",)

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", **kwargs) -> None:
        if kwargs:
            raise NotImplementedError(
                f"flashcontrast's SupConLoss takes the published defaults only; got "
                f"{sorted(kwargs)} (distance, reducer, embedding_regularizer are not fused)"
            )
        super().__init__(backend)
        self.temperature = temperature

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        indices_tuple=None,
        ref_emb=None,
        ref_labels=None,
    ) -> Tensor:
        for name, value in (
            ("indices_tuple", indices_tuple),
            ("ref_emb", ref_emb),
            ("ref_labels", ref_labels),
        ):
            if value is not None:
                raise NotImplementedError(f"SupConLoss: {name} is not supported by the fused path")
        if labels is None:
            raise ValueError("SupConLoss needs labels (miners' indices_tuple are not fused)")
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a (N, D) tensor")
        labels = labels.to(embeddings.device)
        z = F.normalize(embeddings, p=2, dim=1)
        # the published code's 1 / temperature: the row losses carry no tau / base factor
        losses = supcon_loss(
            z[None], labels, self.temperature, self.temperature, reduction="none",
            backend=self.backend,
        )[0]  # fmt: skip
        counts = torch.unique(labels, return_counts=True)[1]
        has_pairs = (counts > 1).any() & (counts.numel() > 1)  # a positive and a negative pair
        kept = losses > 0  # AvgNonZeroReducer
        mean = (losses * kept).sum() / kept.sum().clamp_min(1)
        return torch.where(has_pairs, mean, torch.zeros_like(mean))
