"""sentence-transformers' hardness penalty (``hardness_mode``, ``hardness_strength``) on
the query-to-document logits, without the (N, N (1 + H)) matrix.

The package adds alpha * stop_grad(sim_ij) to the logit s sim_ij of the negatives its mode
names ("in_batch_negatives": the columns of other queries; "hard_negatives": the query's
own hard negatives; "all_negatives": both), never to the positive. Split by the columns
of the query's own documents:

- the in-batch negatives and the positive are one "rows" sweep of the queries against the
  documents whose own hard negatives are left out (the caller's groups: the query each
  column belongs to). Penalized, the sweep runs at scale s + alpha with the positive given
  as its logit s sim_ii; the stop-gradient makes d logit / d sim = s, so the features
  enter through :class:`ScaledGradient` with r = s / (s + alpha) and their gradients are
  the sweep's times r (the positive's, dpos, is not scaled);
- the N x H own hard negatives' logits are O(N H D) dot products (penalized or not),
  joined to the sweep's row LSE by logsumexp.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .multipositive import positive_dots, stacked_positives

__all__ = ["ScaledGradient", "hard_query_rows"]

# mode -> (the in-batch negatives penalized, the own hard negatives penalized)
PENALIZED = {
    "in_batch_negatives": (True, False),
    "hard_negatives": (False, True),
    "all_negatives": (True, True),
}


class ScaledGradient(torch.autograd.Function):
    """x itself in the forward (no copy, no rounding); the gradient times r (a float)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: float) -> Tensor:
        ctx.r = r
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.r, None


# in_batch_rows(queries, documents, scale, positive_logits or None) -> (n,) row LSE
RowsSweep = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]


def hard_query_rows(
    q: Tensor,
    docs: Tensor,
    columns: int,
    s: Tensor,
    scale: float,
    mode: str,
    alpha: float,
    in_batch_rows: RowsSweep,
) -> tuple[Tensor, Tensor]:
    """(row LSE (n,), positive logit (n,)) of query_to_doc with the penalty (module doc).

    ``q`` (n, D) this rank's queries, ``docs`` (columns n, D) its documents stacked
    (positives, then each hard negative column: query i's at c n + i); ``s`` the scale as
    a 0-d tensor, ``scale`` the same as a float; ``in_batch_rows`` the caller's sweep of
    queries against every document with the own hard negatives left out."""
    n = q.shape[0]
    own = positive_dots(q, docs, stacked_positives(n, columns, q.device)).unbind(1)
    positive = s * own[0]
    in_batch, own_hard = PENALIZED[mode]
    hard = [s * o + alpha * o.detach() if own_hard else s * o for o in own[1:]]
    if in_batch:
        r = scale / (scale + alpha)
        a, b = ScaledGradient.apply(q, r), ScaledGradient.apply(docs, r)
        rows = in_batch_rows(a, b, s + alpha, positive)
    else:
        rows = in_batch_rows(q, docs, s, None)
    return torch.logsumexp(torch.stack([rows, *hard]), 0), positive
