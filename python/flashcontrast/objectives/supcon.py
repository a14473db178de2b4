"""Supervised contrastive loss (SupCon; Khosla et al. 2020) on the pair engine.

Features z (V, N, D): V views of N samples with labels y (N,) (None: every sample its own
label, SimCLR's NT-Xent over V views). Every (view, sample) row i = (l, n) is an anchor;
its positives P(i) are every other row of a sample with its label (the sample's other
views included), its denominator every row but itself. As HobbitLong/SupContrast's
``SupConLoss`` (contrast_mode "all") computes it, with s = 1 / temperature:

    L_i = -(temperature / base_temperature) [ (1 / |P(i)|) sum_{p in P(i)} s z_i.z_p
                                              - LSE_{a != i} s z_i.z_a ]     (|P(i)| > 0)
    L_i = 0                                                                  (|P(i)| = 0)
    L = mean over all V N rows.

The denominator is the only pairwise part: one "rows" sweep of the (V N, D) stack against
itself, every other row a negative, the anchor excluded (``backends/pair.py``). The
positive part reduces to per-label sums of the features, C_c = sum_{y(j) = c} z_j (K, D):
sum_{p in P(i)} z_i.z_p = z_i.(C_{y(i)} - z_i), and |P(i)| = V count(y(i)) - 1, so it is
O(V N D) (``flashcontrast::label_positive_dots``, whose backward is again per-label sums:
d z_j = w_j (C_{y(j)} - 2 z_j) + W_{y(j)}, W_c = sum_{y(i) = c} w_i z_i).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._amp import autocast_off
from .._module import BackendLoss
from .._validation import accumulation_dtype, as_scalar_tensor, check_groups
from ..backends.pair import Pair
from ._pair_op import sweep
from .multiview import Views, _stack

__all__ = ["SupConLoss", "supcon_loss"]

#: the denominator: every other row of the stack, the anchor itself left out
PAIR = Pair("rows", positives=False, exclude_self=True)


def _label_sums(z: Tensor, labels: Tensor, k: int, acc: torch.dtype) -> Tensor:
    """C (k, D) in ``acc``: C_c = sum of the rows of z (R, D) with label c."""
    out = torch.zeros((k, z.shape[1]), dtype=acc, device=z.device)
    return out.index_add_(0, labels, z.to(acc))


@torch.library.custom_op("flashcontrast::label_positive_dots", mutates_args=())
@autocast_off
def label_positive_dots(z: Tensor, labels: Tensor, classes: int) -> Tensor:
    """(R,) z_i.(C_{y(i)} - z_i) in the accumulation dtype, for z (R, D) and labels (R,)
    int64 in [0, classes): the sum of z_i's dot products with the other rows of its label."""
    acc = accumulation_dtype(z.dtype)
    c = _label_sums(z, labels, classes, acc)
    za = z.to(acc)
    return (za * (c[labels] - za)).sum(dim=1)


@label_positive_dots.register_fake
def _label_positive_dots_fake(z, labels, classes):
    return z.new_empty(z.shape[0], dtype=accumulation_dtype(z.dtype))


@torch.library.custom_op("flashcontrast::label_positive_dots_bwd", mutates_args=())
@autocast_off
def label_positive_dots_bwd(z: Tensor, labels: Tensor, classes: int, grad: Tensor) -> Tensor:
    """d z (R, D) in z's dtype: w_j (C_{y(j)} - 2 z_j) + W_{y(j)}, w = grad, W_c = sum of
    w_i z_i over label c."""
    acc = accumulation_dtype(z.dtype)
    za = z.to(acc)
    w = grad.to(acc)[:, None]
    c = _label_sums(za, labels, classes, acc)
    wz = _label_sums(w * za, labels, classes, acc)
    return (w * (c[labels] - 2 * za) + wz[labels]).to(z.dtype)


@label_positive_dots_bwd.register_fake
def _label_positive_dots_bwd_fake(z, labels, classes, grad):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _dots_setup(ctx, inputs, output) -> None:
    z, labels, classes = inputs
    ctx.classes = classes
    ctx.save_for_backward(z, labels)


def _dots_backward(ctx, grad):
    z, labels = ctx.saved_tensors
    return label_positive_dots_bwd(z, labels, ctx.classes, grad), None, None


torch.library.register_autograd(
    "flashcontrast::label_positive_dots", _dots_backward, setup_context=_dots_setup
)


def _check_labels(labels: object, n: int, device: torch.device) -> Tensor:
    """(N,) int64 label ids 0 .. K-1 (any integer values in, compacted by torch.unique)."""
    if labels is None:
        return torch.arange(n, device=device)
    check_groups(labels, n, device, "the features")  # the same rules as group ids
    return torch.unique(labels, return_inverse=True)[1]


@autocast_off
def supcon_loss(
    features: Views,
    labels: Optional[Tensor] = None,
    temperature: object = 0.07,
    base_temperature: float = 0.07,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Supervised contrastive loss, memory-linear (HobbitLong/SupContrast ``SupConLoss``,
    contrast_mode "all"; module docstring for the formula).

    Args:
        features: (V, N, D) (V views of N samples; V >= 1) or (N, D) (one view), or a
            sequence of V (N, D) tensors; float32, float16, bfloat16 or float64. Used as
            given: normalize them first, as the published code expects.
        labels: (N,) int32 / int64 class ids, or None (every sample its own class: the
            positives are its other views, SimCLR).
        temperature: tau (a float, or a one-element tensor that gets a gradient).
        base_temperature: the published code's loss factor tau / base_tau (a float).
        reduction: "mean" (over the V N anchors, rows without positives counted as 0,
            as the published code does) or "none" ((V, N) per-anchor losses).
        backend: "auto", "cuda", "triton", "torch" or "reference" (the dense (V N, V N)
            computation, reduction "mean" only).

    Returns:
        0-d or (V, N) in the accumulation dtype. NaN or inf in the inputs propagate.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if isinstance(features, Tensor) and features.dim() == 2:
        features = features.unsqueeze(0)
    u = _stack(features, min_views=1)
    v, n, d = u.shape
    y = _check_labels(labels, n, u.device)
    tau = as_scalar_tensor("temperature", temperature, u)
    scale = 1.0 / tau
    chosen = _dispatch.resolve("supcon", u.device, backend, u.dtype)
    if chosen == "reference":
        if reduction != "mean":
            raise ValueError('backend="reference" computes reduction="mean" only')
        return reference.supcon_loss(u, None if labels is None else y, tau, base_temperature)
    flat = u.reshape(v * n, d)  # a view wherever u's strides allow one
    rows = y.repeat(v)  # the label of every row of the stack
    classes = n  # labels are compacted to 0 .. K-1 < N
    log_den = sweep(flat, None, scale, None, PAIR, chosen)["row"]  # LSE_{a != i}
    count = torch.bincount(rows, minlength=classes)[rows] - 1  # |P(i)|
    pos = scale * label_positive_dots(flat, rows, classes)  # sum_p s z_i.z_p
    has = count > 0
    mean_log_prob = torch.where(has, pos / count.clamp_min(1) - log_den, torch.zeros_like(pos))
    losses = (-(tau / base_temperature) * mean_log_prob).view(v, n)
    return losses.mean() if reduction == "mean" else losses


class SupConLoss(BackendLoss):
    """:func:`supcon_loss` as a module: ``SupConLoss(temperature)(features, labels)``."""

    option_names = ("temperature", "base_temperature")

    def __init__(
        self, temperature: float = 0.07, base_temperature: float = 0.07, backend: str = "auto"
    ) -> None:
        super().__init__(backend)
        self.temperature = temperature
        self.base_temperature = base_temperature

    def forward(self, features: Views, labels: Optional[Tensor] = None) -> Tensor:
        return supcon_loss(features, labels, **self.call_options())
