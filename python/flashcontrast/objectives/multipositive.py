"""Multi-positive InfoNCE (1-to-K contrast) on the pair engine.

N anchors a (N, D) (images) against M candidates c (M, D) (their captions in K languages,
say); anchor i's K positives are the candidates P_i = (p_i1, .., p_iK), all sharing one
denominator over every candidate, as the 1-to-K contrastive loss of "Improving the
Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive Learning"
(Nie et al., KDD 2024) treats the K languages equally. With S = s a c^T:

    anchor -> candidates   L_i = -(1/K) sum_k log softmax_j(S_i:)_{p_ik}
                               = LSE_j S_ij - (1/K) sum_k S_i,p_ik
    candidate -> anchors   L'_ik = LSE_l S_l,p_ik - S_i,p_ik      (each listed candidate)
    L = 1/2 (mean_i L_i + mean_ik L'_ik)

The pairwise part is one engine sweep (``backends/pair.py``) of the anchors against all
candidates with the "softmax" epilogue and no positives: its row logsumexps are the
anchors' denominators LSE_j S_ij, its column logsumexps the candidates' LSE_l S_lj, read
at the listed candidates (one sweep, 4 GEMM-equivalents of 2 N M D, where a second "rows"
sweep of the listed candidates against the anchors would recompute the same logits). The
positive logits S_i,p_ik are linear in the features: ``flashcontrast::positive_dots``,
O(N K D), whose backward is a gather and an index_add. Nothing N x M is stored.

``positives=None`` means the candidates are K stacked batches, (K N, D) with candidate
k of anchor i at row k N + i (K per-language batches concatenated). Given index lists
(N, K), only the positive dot products gather the listed candidates (O(N K D), never
saved).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._amp import autocast_off
from .._module import BackendLoss
from .._validation import (
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_rows_and_columns,
)
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = ["MultiPositiveInfoNCELoss", "multi_positive_infonce_loss"]

#: anchors against every candidate: the denominators of both directions, no positives
_BOTH_WAYS = Pair("softmax", positives=False)


@torch.library.custom_op("flashcontrast::positive_dots", mutates_args=())
@autocast_off
def positive_dots(a: Tensor, c: Tensor, positives: Tensor) -> Tensor:
    """(N, K) <a_i, c_{p_ik}> in the accumulation dtype, for a (N, D), c (M, D) and
    positives (N, K) int64 indices into c (O(N K D): the listed pairs only)."""
    acc = accumulation_dtype(a.dtype)
    n, k = positives.shape
    picked = c[positives.reshape(-1)].to(acc).view(n, k, c.shape[1])  # (N, K, D)
    return torch.bmm(picked, a.to(acc)[:, :, None])[:, :, 0]


@positive_dots.register_fake
def _positive_dots_fake(a, c, positives):
    return a.new_empty(positives.shape, dtype=accumulation_dtype(a.dtype))


@torch.library.custom_op("flashcontrast::positive_dots_bwd", mutates_args=())
@autocast_off
def positive_dots_bwd(
    a: Tensor, c: Tensor, positives: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """(d a (N, D), d c (M, D)) in the inputs' dtype, from grad (N, K): d a_i = sum_k
    g_ik c_{p_ik}, d c_j = sum over the (i, k) with p_ik = j of g_ik a_i."""
    acc = accumulation_dtype(a.dtype)
    n, k = positives.shape
    g = grad.to(acc)
    flat = positives.reshape(-1)
    picked = c[flat].to(acc).view(n, k, c.shape[1])
    da = torch.bmm(g[:, None, :], picked)[:, 0]  # (N, D)
    dc = torch.zeros(c.shape, dtype=acc, device=c.device)
    dc.index_add_(0, flat, (g[:, :, None] * a.to(acc)[:, None, :]).view(n * k, a.shape[1]))
    return da.to(a.dtype), dc.to(c.dtype)


@positive_dots_bwd.register_fake
def _positive_dots_bwd_fake(a, c, positives, grad):
    return torch.empty_like(a), torch.empty_like(c)


def _dots_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _dots_backward(ctx, grad):
    a, c, positives = ctx.saved_tensors
    da, dc = positive_dots_bwd(a, c, positives, grad)
    return da, dc, None


torch.library.register_autograd(
    "flashcontrast::positive_dots", _dots_backward, setup_context=_dots_setup
)


def stacked_positives(n: int, k: int, device: torch.device) -> Tensor:
    """(N, K) int64 p_ik = k N + i: anchor i's candidate in batch k of K stacked batches of
    N rows (the language-major stack)."""
    return torch.arange(k, device=device)[None, :] * n + torch.arange(n, device=device)[:, None]


def _check_positives(positives: object, n: int, m: int, device: torch.device) -> Tensor:
    """(N, K) int64 indices into the M candidates, each candidate listed at most once;
    None: the language-major stack (M = K N, p_ik = k N + i)."""
    if positives is None:
        if n == 0 or m % n != 0:
            raise ValueError(
                f"with positives=None the candidates must be K stacked batches of the N = {n} "
                f"anchors ((K N, D)), got {m} rows"
            )
        return stacked_positives(n, m // n, device)
    if not isinstance(positives, Tensor) or positives.dtype not in (torch.int32, torch.int64):
        raise TypeError("positives must be an int32 or int64 tensor (N, K) of candidate indices")
    if positives.dim() != 2 or positives.shape[0] != n or positives.shape[1] == 0:
        raise ValueError(
            f"positives must be (N, K) with N = {n}, K >= 1, got {tuple(positives.shape)}"
        )
    if positives.device != device:
        raise ValueError(f"positives must be on {device}, got {positives.device}")
    p = positives.long()
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= m):
        raise ValueError(f"positives must index the {m} candidates, got values outside [0, {m})")
    if torch.unique(p).numel() != p.numel():
        raise ValueError("a candidate is listed as the positive of two anchors (or twice)")
    return p


@autocast_off
def multi_positive_infonce_loss(
    anchors: Tensor,
    candidates: Tensor,
    logit_scale: Scalar,
    positives: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """1-to-K multi-positive InfoNCE, both directions, memory-linear (module docstring).

    Args:
        anchors: (N, D) float32, float16, bfloat16 or float64.
        candidates: (M, D), same dtype and device: every candidate is in every anchor's
            denominator.
        logit_scale: s (a float, or a one-element tensor that gets a gradient).
        positives: (N, K) int32 / int64 indices into the candidates, anchor i's K
            positives, no candidate listed twice; or None: candidates (K N, D) are K
            stacked batches of N, anchor i's positives at rows k N + i.
        reduction: "mean" (1/2 (mean_i L_i + mean_ik L'_ik)) or "none" (the tuple
            (L (N,), L' (N, K))).
        backend: "auto", "cuda", "triton", "torch" or "reference" (the dense N x M logits).

    Returns:
        0-d, or the per-anchor and per-positive terms, in the accumulation dtype (float32
        for 16-bit and float32 inputs, float64 for float64). NaN or inf propagate.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    a, c = check_rows_and_columns("anchors", anchors, "candidates", candidates)
    n, m = a.shape[0], c.shape[0]
    p = _check_positives(positives, n, m, a.device)
    scale = as_scalar_tensor("logit_scale", logit_scale, a)
    chosen = _dispatch.resolve("infonce", a.device, backend, a.dtype)
    if chosen == "reference":
        rows, cols = _dense_terms(a, c, scale, p)
    else:
        st = sweep(a, c, scale, None, _BOTH_WAYS, chosen)  # LSE_j S_ij, LSE_l S_lj
        pos = scale * positive_dots(a, c, p)  # (N, K) S_i,p_ik
        rows = st["row"] - pos.mean(1)
        cols = st["col"][p] - pos
    if reduction == "none":
        return rows, cols
    return 0.5 * (rows.mean() + cols.mean())


def _dense_terms(a: Tensor, c: Tensor, scale: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """The dense formula (``backend="reference"``): (L (N,), L' (N, K)) from the N x M
    logits, in the accumulation dtype."""
    acc = accumulation_dtype(a.dtype)
    logits = scale.to(acc) * (a.to(acc) @ c.to(acc).T)
    pos = logits.gather(1, p)  # (N, K)
    rows = torch.logsumexp(logits, 1) - pos.mean(1)
    cols = torch.logsumexp(logits, 0)[p] - pos
    return rows, cols


class MultiPositiveInfoNCELoss(BackendLoss):
    """:func:`multi_positive_infonce_loss` as a module:
    ``MultiPositiveInfoNCELoss()(anchors, candidates, logit_scale, positives)``."""

    def forward(
        self,
        anchors: Tensor,
        candidates: Tensor,
        logit_scale: Scalar,
        positives: Optional[Tensor] = None,
    ) -> Tensor:
        return multi_positive_infonce_loss(
            anchors, candidates, logit_scale, positives, backend=self.backend
        )
