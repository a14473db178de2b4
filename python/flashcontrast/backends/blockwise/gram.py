"""GRAM volume loss on the "torch" backend (contract: ``flashcontrast.backends``).

Rectangular form: anchor rows t (n, D) against the columns of others (K, m, D), with the
per-column constants det_h, adj_h, floor_h of those m columns. Row i's own sample is
column ``row_offset + i`` (its positive, the diagonal term and the [i == j] of the
backward); a row whose own column is outside [0, m) has no positive in this block (its
``diag`` entry is 0). The single-process loss is the square case n = m, row_offset = 0;
``flashcontrast.distributed.gram_loss`` sweeps a rank's rows against each column block
(its own, or another rank's) with row_offset = (the rows' global offset) - (the columns'
global offset), and merges the partial statistics itself.

The (n, m) logits L_ij = -s V_ij are visited one block of rows at a time:

    u_r  = T_blk @ O_r^T                          K dot-product blocks (rows x m)
    v_r  = sum_s adj_h[:, r, s] * u_s             (adj_h u)_r, elementwise per column
    det  = det_h_j |t_i|^2 - sum_r u_r v_r        the quadratic form, never (n, m, M, M)
    V    = sqrt(det) where det > |t_i|^2 floor_h_j, else 0 (the degeneracy floor; NaN kept)

forward   row LSE / sums / diagonal directly per block; column LSE online (running max and
          sum of exp), column sums by accumulation. Row statistics cover this block's m
          columns and column statistics this block's n rows: both are PARTIAL when the
          rows or columns are split over several calls. They are LSEs (and plain sums)
          the caller merges exactly: logaddexp (or max, then rescaled sums of exp) for the
          LSEs, + for the sums and the diagonal.
backward  recompute u, v, det with the MERGED row and column LSEs; with N = ``total`` (the
          global batch, default m), dL = g/(2N) (P_row + P_col - 2(1-eps) [j = row_offset
          + i] - 2 eps/N), w = dL (-s) / (2V) above the floor (else 0), then
          d_anchor_blk = 2 (w det_h) t_blk - 2 sum_r (w * v_r) @ O_r
          d_others_u[r] += -2 (w * v_r)^T @ T_blk,  col_tt += tt_blk @ w,
          col_uu[:, r, s] += sum_i w u_r u_s,  dscale += sum dL (-V): this block's part of
          each, summed by the caller over blocks (``out_dtype``: the dtype of d_anchor and
          d_others_u; None: the inputs', the accumulation dtype for partial sums).

Memory: about 2K + 6 (rows x m) blocks in the accumulation dtype (float32, or float64 for
float64 inputs); the rows per block are chosen so they fit the block budget of
``blockwise.MAX_BLOCK_ELEMENTS``. Features are cast to the accumulation dtype once per call
(a visible O(K (n + m) D) copy for 16-bit inputs).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import accumulation_dtype
from ..gram import GramBlock, GramCoefs
from . import MAX_BLOCK_ELEMENTS, block_rows


def _rows(m: int, k: int, device: torch.device, max_block_elements: Optional[int]) -> int:
    """Rows per block against m > 0 columns."""
    budget = max_block_elements or MAX_BLOCK_ELEMENTS.get(device.type, 1 << 22)
    return block_rows(m, device, max(1, budget // (2 * k + 6)))


def _diagonal(x, start: int, row_offset: int):
    """(first row, view): the entries (i, row_offset + i) of the (rows, m) block x whose
    rows start at ``start`` (those with 0 <= row_offset + i < m), as a view of x, and the
    (block-relative) row of the first."""
    offset = row_offset + start
    return max(0, -offset), x.diagonal(offset=offset)


def _inputs(block: GramBlock, acc, max_block_elements):
    """anchor (n, D), others (K, m, D) and the column constants (m,), (m, K, K), (m,) in
    ``acc``, then tt = |t_i|^2 (n,) and the rows per block: what both passes start from."""
    t, o = block.anchor.to(acc), block.others.to(acc)
    consts = block.det_h.to(acc), block.adj_h.to(acc), block.floor_h.to(acc)
    rows = _rows(o.shape[1], o.shape[0], t.device, max_block_elements)
    return t, o, *consts, (t * t).sum(dim=1), rows


def _block(t_blk, tt_blk, o, det_h, adj_h, floor_h, scale):
    """u (K, rows, N), v = adj u (K, rows, N), keep (rows, N) (det above the degeneracy
    floor), V (rows, N), logits (rows, N)."""
    k = o.shape[0]
    u = torch.matmul(t_blk, o.transpose(1, 2))  # (K, rows, N)
    v = torch.empty_like(u)
    for r in range(k):
        torch.mul(u[0], adj_h[:, r, 0], out=v[r])
        for s in range(1, k):
            v[r].addcmul_(u[s], adj_h[:, r, s])
    det = torch.outer(tt_blk, det_h)
    for r in range(k):
        det.addcmul_(u[r], v[r], value=-1.0)
    keep = det > torch.outer(tt_blk, floor_h)
    vol = det.mul_(keep).sqrt_()  # det * 0 below the floor: 0, or NaN for NaN / inf det
    return u, v, keep, vol, vol * -scale


def gram_forward(block: GramBlock, max_block_elements: Optional[int] = None):
    """(row_lse (n,), col_lse (m,), diag (n,), row_sum (n,), col_sum (m,)) of the block's
    rows anchor (n, D) against the columns of others (K, m, D), in the accumulation dtype;
    diag_i = L_{i, row_offset + i} (0 where that column is outside the block). Row
    statistics over this block's columns, column statistics over its rows (module
    docstring)."""
    anchor, others, scale, row_offset = block.anchor, block.others, block.scale, block.row_offset
    m = others.shape[1]
    n = anchor.shape[0]
    acc = accumulation_dtype(anchor.dtype)
    kw = dict(dtype=acc, device=anchor.device)
    row_lse = torch.full((n,), float("-inf"), **kw)
    diag, row_sum = torch.zeros(n, **kw), torch.zeros(n, **kw)
    col_max = torch.full((m,), float("-inf"), **kw)
    col_exp = torch.zeros(m, **kw)
    col_sum = torch.zeros(m, **kw)
    if n == 0 or m == 0:
        return row_lse, col_max + col_exp.log(), diag, row_sum, col_sum
    t, o, det_h, adj_h, floor_h, tt, rows = _inputs(block, acc, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        *_, logits = _block(t[start:stop], tt[start:stop], o, det_h, adj_h, floor_h, scale)
        row_lse[start:stop] = torch.logsumexp(logits, dim=1)
        row_sum[start:stop] = logits.sum(dim=1)
        col_sum += logits.sum(dim=0)
        first, d = _diagonal(logits, start, row_offset)
        diag[start + first : start + first + d.shape[0]] = d
        new_max = torch.maximum(col_max, logits.amax(dim=0))
        col_exp.mul_(torch.exp(col_max - new_max)).add_(logits.sub_(new_max).exp_().sum(dim=0))
        col_max = new_max
    return row_lse, col_max + col_exp.log(), diag, row_sum, col_sum


def gram_backward(
    block: GramBlock,
    coefs: GramCoefs,
    out_dtype: Optional[torch.dtype] = None,
    max_block_elements: Optional[int] = None,
):
    """(d_anchor (n, D), d_others_u (K, m, D), dscale, col_tt (m,), col_uu (m, K, K)) of
    this block, by recomputing each row block, from the merged (complete) statistics
    ``coefs`` (``backends.gram.GramCoefs``)."""
    row_lse, col_lse, grad, label_smoothing, total = coefs
    anchor, others, scale, row_offset = block.anchor, block.others, block.scale, block.row_offset
    k, m, _ = others.shape
    n = anchor.shape[0]
    big_n = m if total is None else int(total)
    acc = accumulation_dtype(anchor.dtype)
    kw = dict(dtype=acc, device=anchor.device)
    d_anchor = torch.zeros(anchor.shape, dtype=out_dtype or anchor.dtype, device=anchor.device)
    d_others = torch.zeros(others.shape, **kw)
    dscale = torch.zeros((), **kw)
    col_tt = torch.zeros(m, **kw)
    col_uu = torch.zeros((m, k, k), **kw)
    if n == 0 or m == 0:
        return d_anchor, d_others.to(out_dtype or others.dtype), dscale, col_tt, col_uu
    t, o, det_h, adj_h, floor_h, tt, rows = _inputs(block, acc, max_block_elements)
    row_lse, col_lse = row_lse.to(acc), col_lse.to(acc)
    eps = float(label_smoothing)
    coef = grad.to(acc) / (2 * big_n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        t_blk, tt_blk = t[start:stop], tt[start:stop]
        u, v, keep, vol, logits = _block(t_blk, tt_blk, o, det_h, adj_h, floor_h, scale)
        dl = (logits - row_lse[start:stop, None]).exp_()
        dl.add_(logits.sub_(col_lse).exp_()).sub_(2.0 * eps / big_n)
        _diagonal(dl, start, row_offset)[1].sub_(2.0 * (1.0 - eps))
        dl.mul_(coef)  # dL/d logits
        dscale -= (dl * vol).sum()
        w = dl.mul_(-0.5 * scale).div_(torch.where(keep, vol, 1.0)).mul_(keep)
        col_tt += tt_blk @ w
        da = t_blk * (2.0 * (w @ det_h))[:, None]
        for r in range(k):
            wv = v[r].mul_(w)  # w * (adj u)_r, in place of v_r (no longer needed)
            da.addmm_(wv, o[r], alpha=-2.0)
            d_others[r].addmm_(wv.t(), t_blk, alpha=-2.0)
            for s in range(r, k):
                val = (w * u[r] * u[s]).sum(dim=0)
                col_uu[:, r, s] += val
                if s != r:
                    col_uu[:, s, r] += val
        d_anchor[start:stop] = da
    return d_anchor, d_others.to(out_dtype or others.dtype), dscale, col_tt, col_uu
