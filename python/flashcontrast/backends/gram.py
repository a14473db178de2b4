"""GRAM's backend contract: one rectangular block, its inputs as one value.

Every backend's ``gram_forward(block)`` and ``gram_backward(block, coefs)`` (``blockwise/
gram.py``, ``triton/gram.py``, ``cuda.py``; the math in ``backends/__init__.py`` and
docs/objectives.md section 4) takes a :class:`GramBlock`: the anchor rows, the columns of
the other modalities and their per-column constants travel together, so that a caller
cannot hand a backend the constants of other columns in a swapped position, and the
contract is spelled once here instead of in every backend's signature.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["GramBlock", "GramCoefs"]


class GramBlock(NamedTuple):
    """Rows ``anchor`` (n, D) against the m columns of ``others`` (K, m, D).

    Fields:
        anchor: (n, D) the anchor modality's rows.
        others: (K, m, D) the K = M - 1 other modalities' columns, one dtype with anchor.
        scale: one-element tensor, the logit scale s (L = -s V).
        det_h: (m,) det H_j of each column's K x K Gram matrix.
        adj_h: (m, K, K) adj H_j.
        floor_h: (m,) the degeneracy floor rtol prod_r |o^r_j|^2.
        row_offset: global index of column 0 minus that of row 0: row i's own column is
            row_offset + i (the single-process call: 0, n = m).
    """

    anchor: Tensor
    others: Tensor
    scale: Tensor
    det_h: Tensor
    adj_h: Tensor
    floor_h: Tensor
    row_offset: int = 0


class GramCoefs(NamedTuple):
    """The backward's inputs beside its :class:`GramBlock`: the merged statistics and the
    loss's constants (``gram_backward(block, coefs, out_dtype=None)``).

    Fields:
        row_lse: (n,) the merged (global) LSEs of the block's rows.
        col_lse: (m,) the merged LSEs of its columns.
        grad: 0-d, the upstream scalar g of L.
        label_smoothing: eps of torch's label-smoothed cross entropy.
        total: the N of 1/(2N) and eps/N (None: m, the single-process call).
    """

    row_lse: Tensor
    col_lse: Tensor
    grad: Tensor
    label_smoothing: float
    total: Optional[int] = None
