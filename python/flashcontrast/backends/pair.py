"""The pair engine: the one rectangular sweep every pairwise objective is an epilogue of.

A row block ``a`` (n, D) is swept against columns ``b`` (m, D) (the same tensor for a
self-similarity), S_ij = scale <a_i, b_j> + bias accumulated in float32 (float64 on the
"torch" backend for float64 inputs), and a few O(n + m) statistics come out; nothing of
size n x m is stored. The backward recomputes the tiles from the merged statistics. Every
backend ("torch": ``blockwise/pair.py``, "triton": ``triton/pair.py``, "cuda": ``cuda.py``
over ``csrc/kernels/pair.cu``) implements exactly this; the objectives (``objectives/``),
the process-group losses (``distributed/``) and the drop-ins (``compat/``) call it and
nothing else multiplies feature matrices. docs/engine.md has the derivations.

Indices and the entry sets
--------------------------
Row i of the block is global row ``row_offset + i``, column j global column
``col_offset + j``; both are samples ``sample(k) = k mod period`` (``period = 0``: k
itself). Three sets of entries (i, j), all decided per tile from these integers and the
optional group ids, never from an n x m mask:

* excluded (``exclude_self``): the entry of a row with itself, global row == global
  column (a self-similarity's diagonal). Excluded entries are in no statistic.
* masked (``groups``): different samples with equal group id (false negatives): also in
  no statistic. ``row_groups`` (n,) and ``col_groups`` (m,) int32/int64.
* positives E (``positives``): entries of one sample, sample(i) == sample(j), not
  excluded. With ``period = 0`` and no ``exclude_self`` that is the single entry
  global row == global column (CLIP's diagonal, wherever the block sits); with
  ``period = N`` on a (V N)-row stack and ``exclude_self``, the other views of the sample
  (MV-InfoNCE's numerator).

Every other entry is a negative. Positives are in the full statistics too (a softmax's
denominator holds its numerator).

Epilogues (``epilogue``)
------------------------
* "softmax": per row, the online logsumexp pair (max, sum of exp(S - max)) over the
  allowed columns, and over the positives; per column the same two pairs over this
  block's rows: column statistics are PARTIAL, merged across blocks and ranks with
  :func:`merge_lse` (exact: max, then rescaled sums). CLIP (both directions), the
  multi-view losses, InfoNCE.
* "rows": the row pairs only (no column statistics are computed). Row-only InfoNCE,
  Symile "n", MV-DHEL's per-view blocks, OpenCLIP's local loss.
* "sigmoid": SigLIP's total, sum_ij softplus(-z_ij S_ij) with z = +1 on positives and
  -1 elsewhere (exclusions and masks left out), in the accumulation dtype.

A row whose allowed set is empty has max -inf and sum 0 (its logsumexp is -inf).
Logsumexps are kept as (max, sum) pairs, not as one float: at logit scale 1e4 an fp32
lse carries ~1e-3 absolute rounding, which exp(S - lse) turns into a 1e-3 relative error
in every softmax weight; exp((S - max) - log(sum)) with the recomputed S equal to the
forward's keeps it at fp32 rounding.

``positive_logits`` (optional, (n,), "rows" epilogue with single positives): the logit of
row i's positive is this value instead of S_i,pos (Symile "n": the positive is the
multilinear product, not a column of b). Its gradient is returned, not pushed into b.

Backward
--------
Given the merged statistics and per-row / per-column coefficients of the loss

    L = sum_i gr_i LSE_i - gpr_i LSE+_i + sum_j gc_j LSE_j - gpc_j LSE+_j     (softmax)
    L = g sum_ij softplus(-z_ij S_ij)                                           (sigmoid)

(LSE+ over the positives), the tile coefficient is

    dS_ij = gr_i P_ij - gpr_i Q_ij + gc_j Pc_ij - gpc_j Qc_ij
    dS_ij = g (sigmoid(S_ij) - [ij in E])                                       (sigmoid)

with P the row softmax over the allowed columns, Q the row softmax over the positives
(0 off E), Pc, Qc the column ones. Positives are subtracted INSIDE the tile, before dS is
rounded to the input dtype for the tensor-core products: near convergence P ~ Q on the
positives and their difference is small; rounded apart, each carries 2^-9 of ~1 (bf16).
Outputs: dA = scale dS B (n, D), dB = scale dS^T A (m, D), dscale = sum dS <a_i, b_j>,
dbias = sum dS, in ``out_dtype`` (None: the inputs' dtype; float32 for partial sums that
are added across blocks or ranks before one rounding), and with ``positive_logits``
d positive_logits (n,) (the positive's entry then adds nothing to dA or dB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

EPILOGUES = ("softmax", "rows", "sigmoid")


@dataclass(frozen=True)
class Pair:
    """The static options of one sweep (Triton constexprs, CUDA template arguments)."""

    epilogue: str = "softmax"
    positives: bool = True  # E as in the module docstring; False: every entry a negative
    exclude_self: bool = False
    period: int = 0  # sample(k) = k mod period; 0: k

    def __post_init__(self) -> None:
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {self.epilogue!r}")
        if self.period < 0:
            raise ValueError(f"period must be >= 0, got {self.period}")


class Stats(NamedTuple):
    """One sweep's statistics, each a (max, sum) logsumexp pair (module docstring).
    Unused fields are None: column fields with the "rows" epilogue, positive fields
    without positives, everything but ``total`` with "sigmoid"."""

    row_max: Optional[Tensor] = None  # (n,)
    row_sum: Optional[Tensor] = None
    pos_max: Optional[Tensor] = None  # (n,) over the row's positives
    pos_sum: Optional[Tensor] = None
    col_max: Optional[Tensor] = None  # (m,) partial over this block's rows
    col_sum: Optional[Tensor] = None
    cpos_max: Optional[Tensor] = None  # (m,) positives of the column, partial
    cpos_sum: Optional[Tensor] = None
    total: Optional[Tensor] = None  # 0-d, "sigmoid"


class Grads(NamedTuple):
    """One sweep's gradients (module docstring)."""

    da: Tensor
    db: Tensor
    dscale: Tensor
    dbias: Tensor
    dpos: Optional[Tensor] = None  # (n,), with positive_logits


class Coefs(NamedTuple):
    """The backward's coefficients (module docstring): gr, gpr (n,), gc, gpc (m,) for
    "softmax" / "rows" (None: 0), g (0-d) for "sigmoid"."""

    rows: Optional[Tensor] = None
    pos_rows: Optional[Tensor] = None
    cols: Optional[Tensor] = None
    pos_cols: Optional[Tensor] = None
    total: Optional[Tensor] = None


def merge_lse(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """The (max, sum) pair of the union of two disjoint sets: exact up to rounding, any
    order. An empty side (max -inf, sum 0) leaves the other unchanged."""
    m = torch.maximum(m1, m2)
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return m, s1 * torch.exp(m1 - safe) + s2 * torch.exp(m2 - safe)


def lse(m: Tensor, s: Tensor) -> Tensor:
    """m + log s: the logsumexp (-inf for an empty set)."""
    return m + torch.log(s)


def sample_ids(offset: int, count: int, period: int, device) -> Tensor:
    """(count,) int64 samples of global indices offset .. offset + count - 1."""
    k = torch.arange(offset, offset + count, device=device, dtype=torch.int64)
    return k % period if period > 0 else k


def log_sum(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(max, log sum) for the backward's exp((S - max) - log sum): empty sets (max -inf)
    become (0, +inf), so their softmax weights are exactly 0, never NaN."""
    empty = torch.isneginf(m)
    return torch.where(empty, torch.zeros_like(m), m), torch.where(
        empty, torch.full_like(s, math.inf), torch.log(s)
    )
