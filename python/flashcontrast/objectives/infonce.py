"""Row-only InfoNCE on the pair engine: queries against a (possibly longer) key set.

L_i = LSE_j (s <q_i, k_j> + b) - (s <q_i, k_{o + i}> + b), j over the M keys, query i's
positive at key ``offset + i``. One "rows" sweep (``backends/pair.py``) returns both
logsumexps, the positive's included, and its backward differentiates the whole row term
(the positive subtracted inside the tile): nothing above the op multiplies features.

This is the primitive that info-nce-pytorch's in-batch ``info_nce``
(``compat/info_nce.py``), OpenCLIP's ``local_loss=True`` (``compat/open_clip.py``) and a
process-group InfoNCE share; it was ``symile_rowce`` before it had its own name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._amp import autocast_off
from .._validation import Scalar, as_scalar_tensor, check_rows_and_columns
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = ["infonce_loss"]

#: Row-only softmax, the positive of global row i at global column i.
PAIR = Pair("rows")


@autocast_off
def infonce_loss(
    query: Tensor,
    keys: Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    offset: int = 0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """One-directional InfoNCE (each query against every key), without materializing the
    N x M logits: the row half of CLIP, info-nce-pytorch's in-batch ``info_nce``.

    Args:
        query: (N, D) float32, float16, bfloat16 or float64.
        keys: (M, D), same dtype and device, M >= offset + N: every key is a candidate,
            query i's positive is key ``offset + i``.
        logit_scale: s (a float or a one-element tensor, which gets a gradient).
        logit_bias: b or None (it shifts every logit of a row and cancels: a tensor bias
            receives its gradient, exactly 0).
        offset: where query 0's positive sits among the keys (a rank's shard: its offset
            in the gathered keys).
        reduction: "mean" (over the N queries), "sum" or "none".
        backend: "auto", "cuda", "triton", "torch" or "reference" (the dense formula).

    Returns:
        0-d ("mean", "sum") or (N,) ("none") in the accumulation dtype (float32 for 16-bit
        and float32 inputs, float64 for float64): the terms LSE_j S_ij - S_i,offset+i.
        NaN or inf in the inputs propagate.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    terms = _terms(query, keys, logit_scale, logit_bias, offset, backend)
    if reduction == "none":
        return terms
    return terms.mean() if reduction == "mean" else terms.sum()


def _terms(query, keys, logit_scale, logit_bias, offset, backend) -> Tensor:
    """(N,) LSE_j S_ij - S_i,offset+i, checked and dispatched (see :func:`infonce_loss`)."""
    q, k = check_rows_and_columns("query", query, "keys", keys)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if offset + q.shape[0] > k.shape[0]:
        raise ValueError(
            f"keys has {k.shape[0]} rows: too few for {q.shape[0]} queries at offset {offset}"
        )
    scale = as_scalar_tensor("logit_scale", logit_scale, q)
    bias = as_scalar_tensor("logit_bias", logit_bias, q, required=False)
    chosen = _dispatch.resolve("infonce", q.device, backend, q.dtype)
    if chosen == "reference":  # the dense formula, N x M logits
        logits = scale * (q @ k.T) + (0.0 if bias is None else bias)
        rows = torch.arange(q.shape[0], device=q.device)
        return torch.logsumexp(logits, 1) - logits[rows, rows + offset]
    # the engine's positive is global row == global column: the rows sit at ``offset``. b
    # shifts a row's every logit and cancels: it is left out of the sweep and enters as
    # b - b, so that its gradient is exactly 0 (and a NaN bias still reaches the value).
    st = sweep(q, k, scale, None, PAIR, chosen, row_offset=offset)
    terms = st["row"] - st["pos"]
    return terms if bias is None else terms + (bias - bias)
