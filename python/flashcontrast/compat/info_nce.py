"""``info_nce.InfoNCE`` (pip ``info-nce-pytorch``), with a fused path for in-batch negatives.

    from flashcontrast.compat.info_nce import InfoNCE, info_nce   # was: from info_nce import ...
    loss = InfoNCE(temperature=0.1, reduction="mean", negative_mode="unpaired")(
        query, positive_key, negative_keys=None)

Semantics (the published ones): query, positive_key and negative_keys are L2-normalized
inside (``F.normalize(x, dim=-1)``), logits are cosine similarities divided by
``temperature``, and the loss is a cross entropy with ``reduction`` "mean", "sum" or
"none":

* ``negative_keys=None``: the other samples' positive keys are the negatives. Row i of
  ``q @ k^T / T`` is classified with its positive on the diagonal: a ROW-ONLY InfoNCE
  (one direction of CLIP). This path runs on the pair engine
  (``flashcontrast.infonce_loss``, one "rows" sweep that owns the
  positive term too): O(N D) memory, no N x N logit matrix.
* ``negative_mode="unpaired"``, ``negative_keys`` (M, D): every query's candidates are
  its positive (column 0) and all M negatives.
* ``negative_mode="paired"``, ``negative_keys`` (N, M, D): query i's candidates are its
  positive and its own M negatives.

With "unpaired" negatives the loss is one "rows" sweep too, of the queries against the
N + M keys ``cat([positive_key, negative_keys])`` with group ids that mask the other
queries' positives (equal id, different sample: ``backends/pair.py``): row i keeps its
positive and the M negatives, no (N, M + 1) logits are stored. (The masked N x N block
is swept too: N (N + M) tile entries where the published code computes N (M + 1).)
"paired" negatives are the published formula (``flashcontrast.reference.info_nce_loss``):
its (N, M + 1) logits are the size of the (N, M, D) input divided by D, so there is no
batch-squared matrix to tile. ``backend="reference"`` sends the other cases there too.

Deliberate differences: on the fused path 16-bit inputs give a float32 loss (the kernels
accumulate in float32; the published code works in the inputs' dtype), and the logits
are ``cos * (1 / T)`` rather than ``cos / T`` (the same to rounding). Input checks raise
the published ValueErrors.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import _dispatch, reference
from .._module import BackendLoss
from .._validation import as_scalar_tensor, check_features
from ..backends.pair import Pair
from ..objectives._pair_op import sweep
from ..objectives.infonce import infonce_loss

__all__ = ["InfoNCE", "info_nce"]

Temperature = Union[float, torch.Tensor]
_REDUCTIONS = ("none", "sum", "mean")
_NEGATIVE_MODES = ("paired", "unpaired")


def _check(query, positive_key, negative_keys, negative_mode, reduction) -> None:
    """The published checks, in the published order, with the published messages."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if negative_mode not in _NEGATIVE_MODES:
        raise ValueError(f"negative_mode must be one of {_NEGATIVE_MODES}, got {negative_mode!r}")
    if query.dim() != 2:
        raise ValueError("<query> must have 2 dimensions.")
    if positive_key.dim() != 2:
        raise ValueError("<positive_key> must have 2 dimensions.")
    if negative_keys is not None:
        if negative_mode == "unpaired" and negative_keys.dim() != 2:
            raise ValueError(
                "<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired'."
            )
        if negative_mode == "paired" and negative_keys.dim() != 3:
            raise ValueError(
                "<negative_keys> must have 3 dimensions if <negative_mode> == 'paired'."
            )
    if len(query) != len(positive_key):
        raise ValueError("<query> and <positive_key> must must have the same number of samples.")
    if negative_keys is not None and negative_mode == "paired" and len(query) != len(negative_keys):
        raise ValueError(
            "If negative_mode == 'paired', then <negative_keys> must have the same number of "
            "samples as <query>."
        )
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError(
            "Vectors of <query> and <positive_key> should have the same number of components."
        )
    if negative_keys is not None and query.shape[-1] != negative_keys.shape[-1]:
        raise ValueError(
            "Vectors of <query> and <negative_keys> should have the same number of components."
        )


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


#: row-only softmax; the other queries' positives masked by their group id (see _unpaired_terms)
_UNPAIRED = Pair("rows")


def _unpaired_terms(q, k, negatives, scale, backend: str) -> torch.Tensor:
    """(N,) LSE(s q_i.k_i, s q_i.n_1, .., s q_i.n_M) - s q_i.k_i for q, k (N, D) and the
    shared negatives (M, D): one sweep of q against cat([k, negatives]) (N + M, D). Every
    query and positive key has group id 1, every negative 2: key j != i of row i is
    "equal id, different sample" and masked, key i is the positive, the negatives stay."""
    n, m = q.shape[0], negatives.shape[0]
    keys = torch.cat([k, negatives])
    row_groups = torch.ones(n, dtype=torch.int64, device=q.device)
    col_groups = torch.cat([row_groups, torch.full((m,), 2, dtype=torch.int64, device=q.device)])
    st = sweep(q, keys, scale, None, _UNPAIRED, backend, groups=(row_groups, col_groups))
    return st["row"] - st["pos"]


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: Optional[torch.Tensor] = None,
    temperature: Temperature = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``info_nce.info_nce``: see the module docstring. ``backend`` picks flashcontrast's
    backend for the in-batch-negatives case ("auto", "cuda", "triton", "torch"; "reference"
    runs the plain published formula)."""
    _check(query, positive_key, negative_keys, negative_mode, reduction)
    q = F.normalize(query, dim=-1)
    k = F.normalize(positive_key, dim=-1)
    negatives = None if negative_keys is None else F.normalize(negative_keys, dim=-1)
    if negatives is not None and negative_mode == "paired":
        return reference.info_nce_loss(q, k, negatives, temperature, reduction, negative_mode)

    check_features("query", q)
    check_features("positive_key", k)
    chosen = _dispatch.resolve("infonce", q.device, backend, q.dtype)
    if chosen == "reference":
        return reference.info_nce_loss(q, k, negatives, temperature, reduction, negative_mode)
    if k.dtype != q.dtype:
        raise TypeError(f"query and positive_key must share a dtype, got {q.dtype} and {k.dtype}")
    scale = as_scalar_tensor("1 / temperature", 1.0 / temperature, q)
    if negatives is not None:
        check_features("negative_keys", negatives)
        if negatives.dtype != q.dtype:
            raise TypeError(
                f"query and negative_keys must share a dtype, got {q.dtype} and {negatives.dtype}"
            )
        return _reduce(_unpaired_terms(q, k, negatives, scale, chosen), reduction)
    # (N,) LSE_j s q_i.k_j - s q_i.k_i: one engine sweep, the positive term included
    return _reduce(infonce_loss(q, k, scale, reduction="none", backend=chosen), reduction)


class InfoNCE(BackendLoss):
    """``info_nce.InfoNCE(temperature=0.1, reduction="mean", negative_mode="unpaired")``.

    Call: ``(query, positive_key, negative_keys=None)``: query and positive_key (N, D);
    negative_keys None, (M, D) for "unpaired" or (N, M, D) for "paired". Returns the loss
    (0-d for "mean" / "sum", (N,) for "none"). See the module docstring for the fused
    path and the deliberate differences.

    Args:
        temperature: T (a float, or a one-element tensor that gets a gradient).
        reduction: "mean", "sum" or "none".
        negative_mode: "unpaired" or "paired".
        backend: flashcontrast's backend for the in-batch-negatives case.
    """

    option_names = ("temperature", "reduction", "negative_mode")

    def __init__(
        self,
        temperature: Temperature = 0.1,
        reduction: str = "mean",
        negative_mode: str = "unpaired",
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(backend)
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode

    def forward(
        self,
        query: torch.Tensor,
        positive_key: torch.Tensor,
        negative_keys: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return info_nce(query, positive_key, negative_keys, **self.call_options())
