"""Multi-View-CL's ``MVINFONCE`` and ``MVDHEL`` (pakoromilas/Multi-View-CL,
``models/losses.py``), on the fused kernels.

Same constructors, same input, same return::

    from flashcontrast.compat.multiview import MVDHEL   # was: from models.losses import MVDHEL
    loss, _ = MVDHEL(tau=0.2, multiplier=V)(z)          # z: (V * N, D), view-major

* ``z`` stacks the V views view-major: rows ``[l * N, (l + 1) * N)`` are view l of the N
  samples (``torch.cat([view_0, ..., view_{V-1}])``), ``V = multiplier``.
* The rows are L2-normalized inside (``F.normalize(z, p=2, dim=1)``), as the published
  code does; ``tau`` is the temperature (logit scale 1 / tau).
* ``forward`` returns ``(loss, 0)``: the published second element (an accuracy slot) is
  the constant 0.

The published names ``MVINFONCE`` and ``MVDHEL`` are both available; ``MVInfoNCE`` is
``MVINFONCE``.

Deliberate differences: the published code sums raw ``exp(u.u' / tau)`` (and MV-DHEL
multiplies the V per-view sums): at small tau or with many views these overflow to inf
(float32: any exp argument above ~88, i.e. tau below ~0.011 for unit vectors) and the
loss and gradients become inf / NaN. Here everything is in log space (logsumexp): finite
loss and gradients at any tau, equal to the published values wherever those are finite.
16-bit inputs give a float32 loss. ``distributed=True`` (the published diffdist gather)
raises NotImplementedError: gather the (V * N, D) features yourself or use one process.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .._module import BackendLoss
from ..objectives.multiview import multiview_dhel_loss, multiview_infonce_loss

__all__ = ["MVDHEL", "MVINFONCE", "MVInfoNCE"]


def _views(z: torch.Tensor, k_views: int) -> torch.Tensor:
    """(V * N, D) view-major -> normalized (V, N, D)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(
            f"z must be a (V * N, D) tensor, got {getattr(z, 'shape', type(z).__name__)}"
        )
    if k_views < 2:
        raise ValueError(f"multiplier (the number of views V) must be >= 2, got {k_views}")
    n_total, d = z.shape
    if n_total % k_views != 0:
        raise ValueError(f"z has {n_total} rows, not a multiple of multiplier = {k_views} views")
    z = F.normalize(z, p=2, dim=1)
    return z.view(k_views, n_total // k_views, d)


class _MultiViewCLLoss(BackendLoss):
    """What Multi-View-CL's two losses share: tau, the number of views V ("multiplier")
    and the refused ``distributed=True``."""

    option_names = ("tau", "multiplier")

    def __init__(self, tau, multiplier: int, distributed: bool, backend: str) -> None:
        super().__init__(backend)
        if distributed:
            raise NotImplementedError(
                f"flashcontrast.compat.multiview.{type(self).__name__}(distributed=True) is "
                "not supported: all-gather the (V * N, D) features (view-major) and call it "
                "with distributed=False"
            )
        self.tau = tau
        self.k_views = multiplier
        self.distributed = distributed

    @property
    def multiplier(self) -> int:
        """V, the number of views stacked in z (the published attribute is ``k_views``)."""
        return self.k_views


class MVINFONCE(_MultiViewCLLoss):
    """Multi-View-CL ``MVINFONCE(tau=1., multiplier=2, distributed=False)``.

    ``forward(z)`` with z the (V * N, D) view-major features (normalized inside) returns
    ``(loss, 0)``, ``loss = -mean_i log[ sum_{l != l'} e^{u_il.u_il' / tau}
    / sum_l sum_{(j,m) != (i,l)} e^{u_il.u_jm / tau} ]``
    (:func:`flashcontrast.multiview_infonce_loss`).

    Args:
        tau: the temperature (a float, or a one-element tensor that gets a gradient).
        multiplier: V, the number of views stacked in z.
        distributed: must be False (see the module docstring).
        backend: flashcontrast's backend ("auto", "cuda", "triton", "torch",
            "reference").
    """

    def __init__(
        self, tau=1.0, multiplier: int = 2, distributed: bool = False, *, backend: str = "auto"
    ) -> None:
        super().__init__(tau, multiplier, distributed, backend)

    def forward(self, z: torch.Tensor):
        u = _views(z, self.k_views)
        return multiview_infonce_loss(u, 1.0 / self.tau, backend=self.backend), 0


MVInfoNCE = MVINFONCE


class MVDHEL(_MultiViewCLLoss):
    """Multi-View-CL ``MVDHEL(tau=0.2, multiplier=2, distributed=False, pwe=False,
    average=False)``.

    ``forward(z)`` with z the (V * N, D) view-major features (normalized inside) returns
    ``(loss, 0)``. Default mode: ``loss = -mean_i [ log sum_{l < l'} e^{u_il.u_il' / tau}
    - sum_l log sum_{j != i} e^{u_il.u_jl / tau} ]``
    (:func:`flashcontrast.multiview_dhel_loss`; with V = 2 this is DHEL).

    The published baselines are kept: ``pwe=True`` averages the two-view DHEL loss over
    all unordered pairs of views; ``average=True`` averages, over the views l, the
    two-view DHEL loss of view l against the mean of the other views (re-normalized, as
    the published pairwise loss normalizes its input). Both run one fused two-view
    MV-DHEL per pair.

    Args:
        tau: the temperature (a float, or a one-element tensor that gets a gradient).
        multiplier: V, the number of views stacked in z.
        distributed: must be False (see the module docstring).
        pwe, average: the published pairwise baselines (at most one is used: pwe first).
        backend: flashcontrast's backend.
    """

    option_names = ("tau", "multiplier", "pwe", "average")

    def __init__(
        self,
        tau=0.2,
        multiplier: int = 2,
        distributed: bool = False,
        pwe: bool = False,
        average: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(tau, multiplier, distributed, backend)
        self.pwe = pwe
        self.average = average

    def _pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = F.normalize(torch.stack([a, b]), p=2, dim=-1)
        return multiview_dhel_loss(u, 1.0 / self.tau, backend=self.backend)

    def forward(self, z: torch.Tensor):
        u = _views(z, self.k_views)
        if self.pwe:
            pairs = list(itertools.combinations(range(self.k_views), 2))
            loss = sum(self._pair(u[i], u[j]) for i, j in pairs) / len(pairs)
        elif self.average:
            v = self.k_views
            terms = []
            for i in range(v):
                rest = sum(u[k] for k in range(v) if k != i) / (v - 1)
                terms.append(self._pair(u[i], rest))
            loss = sum(terms) / v
        else:
            loss = multiview_dhel_loss(u, 1.0 / self.tau, backend=self.backend)
        return loss, 0
