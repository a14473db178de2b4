"""MV-InfoNCE / MV-DHEL negatives (objectives.md section 3) on the "torch" backend.

Contract (the kernel behind both losses; the positive terms are O(V^2 N D) and computed
above the backend, in objectives/multiview.py)::

    selfsim_rowlse_forward(u, scale, per_view, groups) -> row_lse
        u:        (V, N, D) features, float32/float16/bfloat16 (float64 on "torch"), any
                  strides. Row (l, i) is sample i of view l.
        scale:    0-d tensor in the accumulation dtype (s = 1 / tau).
        per_view: False: "whole stacked matrix" mode, the columns of row (l, i) are every
                  (m, j) != (l, i) (MV-InfoNCE's denominator);
                  True: "per-view block-diagonal" mode, the columns are (l, j), j != i
                  (MV-DHEL's negatives).
        groups:   None or an integer (N,) tensor on u's device: a column (m, j) with
                  j != i and groups[j] == groups[i] is also excluded.
        logits:   scale * <u_li, u_mj>, accumulated in fp32 (float64 for float64 here).
        row_lse:  (V, N) accumulation dtype, LSE over the allowed columns of row (l, i);
                  -inf for a row with no allowed column.

    selfsim_rowlse_backward(u, scale, per_view, groups, row_lse, grad_rows) -> (du, dscale)
        Gradients of sum_r grad_rows_r row_lse_r (grad_rows: (V, N), accumulation dtype).
        The allowed set A is symmetric, so with P_rc = exp(logit_rc - row_lse_r) on A:
        du_r = scale sum_{c in A(r)} (grad_rows_r P_rc + grad_rows_c P_cr) u_c
        dscale = sum_{(r, c) in A} grad_rows_r P_rc <u_r, u_c>
        du (V, N, D) in the accumulation dtype (contiguous; see backends/__init__.py);
        dscale 0-d, accumulation dtype. Rows with row_lse = -inf contribute nothing.

Blockwise: the (rows x columns) logit block of one segment (the whole (V N, D) stack, or
one view) is visited a block of rows at a time; memory is O(block + V N D). Features are
cast to the accumulation dtype once per call and reshaped to (V N, D): a visible copy for
half inputs or for a (V, N, D) tensor whose view stride is not N times its row stride.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import accumulation_dtype
from . import block_rows


def _segments(u: torch.Tensor, per_view: bool) -> tuple[torch.Tensor, list]:
    """(x (V N, D) in the accumulation dtype, [(start, stop) of each segment])."""
    v, n, d = u.shape
    x = u.to(accumulation_dtype(u.dtype)).reshape(v * n, d)
    if per_view:
        return x, [(l * n, (l + 1) * n) for l in range(v)]
    return x, [(0, v * n)]


def _block(
    x_seg: torch.Tensor,
    lo: int,
    hi: int,
    n: int,
    scale: torch.Tensor,
    groups: Optional[torch.Tensor],
) -> torch.Tensor:
    """Logits of rows [lo, hi) of a segment against all its columns, excluded entries
    -inf. Sample of a local index k: k % n (segments start at
    multiples of n)."""
    s = torch.mm(x_seg[lo:hi], x_seg.t()).mul_(scale)
    s.diagonal(offset=lo).fill_(float("-inf"))
    if groups is not None:
        m = x_seg.shape[0]
        rs = torch.arange(lo, hi, device=x_seg.device) % n
        cs = torch.arange(m, device=x_seg.device) % n
        same = (groups[rs][:, None] == groups[cs][None, :]) & (rs[:, None] != cs[None, :])
        s.masked_fill_(same, float("-inf"))
    return s


def selfsim_rowlse_forward(
    u: torch.Tensor,
    scale: torch.Tensor,
    per_view: bool,
    groups: Optional[torch.Tensor],
    max_block_elements: Optional[int] = None,
) -> torch.Tensor:
    """(V, N) row LSEs of the self-similarity, excluded entries skipped exactly."""
    v, n, _ = u.shape
    x, segs = _segments(u, per_view)
    row_lse = torch.empty(v * n, dtype=x.dtype, device=x.device)
    for start, stop in segs:
        x_seg = x[start:stop]
        m = stop - start
        rows = block_rows(m, x.device, max_block_elements)
        for lo in range(0, m, rows):
            hi = min(lo + rows, m)
            s = _block(x_seg, lo, hi, n, scale, groups)
            row_lse[start + lo : start + hi] = torch.logsumexp(s, dim=1)
    return row_lse.view(v, n)


def selfsim_rowlse_backward(
    u: torch.Tensor,
    scale: torch.Tensor,
    per_view: bool,
    groups: Optional[torch.Tensor],
    row_lse: torch.Tensor,
    grad_rows: torch.Tensor,
    max_block_elements: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(du, dscale) of sum_r grad_rows_r row_lse_r, block of rows by block."""
    v, n, d = u.shape
    x, segs = _segments(u, per_view)
    lse = row_lse.reshape(-1).to(x.dtype)
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # empty rows: P = 0
    g = grad_rows.reshape(-1).to(x.dtype)
    dx = torch.zeros((v * n, d), dtype=x.dtype, device=x.device)
    dscale = torch.zeros((), dtype=x.dtype, device=x.device)
    for start, stop in segs:
        x_seg, dx_seg = x[start:stop], dx[start:stop]
        lse_seg, g_seg = lse[start:stop], g[start:stop]
        m = stop - start
        rows = block_rows(m, x.device, max_block_elements)
        for lo in range(0, m, rows):
            hi = min(lo + rows, m)
            s = _block(x_seg, lo, hi, n, scale, groups)
            w = s.sub_(lse_seg[lo:hi, None]).exp_().mul_(g_seg[lo:hi, None])  # g_r P_rc
            w_x = torch.mm(w, x_seg)
            dscale += (x_seg[lo:hi] * w_x).sum()  # sum_rc w_rc <x_r, x_c>
            dx_seg[lo:hi] += w_x
            dx_seg.addmm_(w.t(), x_seg[lo:hi])
    return dx.mul_(scale).view(v, n, d), dscale
