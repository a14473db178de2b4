"""The pair engine (``backends/pair.py``) on the "torch" backend: blockwise PyTorch.

The (n, m) logits are visited one block of rows at a time (``block_rows``: a
(rows x m) block within ``MAX_BLOCK_ELEMENTS``):

forward   X = A_blk B^T (a GEMM in the accumulation dtype), S = s X + b; the entry sets
          (excluded, masked, positives) from the global indices and group ids of the
          block's rows and the columns: (rows x m) booleans made per block, never n x m;
          row pairs directly, column pairs folded in online (max, then rescaled sums).
backward  recompute the block, dS from the merged pairs (P and Q exp((S - max) -
          log sum), the positives subtracted in the block), then dA_blk = s dS B,
          dB += s dS^T A_blk, ds += sum dS X, db += sum dS.

Features are cast to the accumulation dtype (float32; float64 for float64 inputs) once
per call: a visible O((n + m) D) copy for 16-bit inputs, so logits are never rounded to
16 bits. Block memory: a few (rows x m) buffers in the accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._validation import accumulation_dtype
from ..pair import Coefs, Grads, Pair, Stats, log_sum, merge_lse, sample_ids
from . import block_rows

__all__ = ["pair_backward", "pair_forward"]

_NEG = float("-inf")


class _Sets:
    """The entry sets of one row block (rows start .. start + r of the sweep)."""

    def __init__(
        self, pair: Pair, start: int, r: int, m: int, row_offset: int, col_offset: int,
        row_groups: Optional[Tensor], col_groups: Optional[Tensor], device,
    ) -> None:  # fmt: skip
        gi = torch.arange(row_offset + start, row_offset + start + r, device=device)
        gj = torch.arange(col_offset, col_offset + m, device=device)
        si = sample_ids(row_offset + start, r, pair.period, device)
        sj = sample_ids(col_offset, m, pair.period, device)
        same = si[:, None] == sj[None, :]
        self_ = gi[:, None] == gj[None, :]
        allowed = ~self_ if pair.exclude_self else torch.ones_like(same)
        if row_groups is not None:
            rg = row_groups[start : start + r]
            allowed &= ~((rg[:, None] == col_groups[None, :]) & ~same)
        self.allowed = allowed
        self.pos = (same & ~self_ if pair.exclude_self else same) if pair.positives else None


def _logits(a_blk: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> tuple:
    x = torch.mm(a_blk, b.t())
    s = x * scale
    return x, (s if bias is None else s.add_(bias))


def _override(s: Tensor, sets: _Sets, pos_logits: Optional[Tensor], start: int) -> None:
    """S on the positives replaced by the given logits (one positive per row at most)."""
    if pos_logits is not None:
        rows = pos_logits[start : start + s.shape[0], None].expand_as(s)
        s.masked_scatter_(sets.pos, rows[sets.pos])


def _pairs(s: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(max, sum exp(S - max)) along ``dim`` over the kept entries."""
    masked = s.masked_fill(~keep, _NEG)
    mx = masked.amax(dim=dim)
    safe = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    return mx, torch.exp(masked - safe.unsqueeze(dim)).sum(dim=dim)


def pair_forward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    pair: Pair,
    row_offset: int = 0,
    col_offset: int = 0,
    row_groups: Optional[Tensor] = None,
    col_groups: Optional[Tensor] = None,
    positive_logits: Optional[Tensor] = None,
    max_block_elements: Optional[int] = None,
) -> Stats:
    """The sweep's statistics (``backends/pair.py``), block of rows by block."""
    n, m = a.shape[0], b.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    scale, bias = scale.to(acc), None if bias is None else bias.to(acc)
    pos_logits = None if positive_logits is None else positive_logits.to(acc)
    kw = dict(dtype=acc, device=a.device)
    if pair.epilogue == "sigmoid":
        total = torch.zeros((), **kw)
    else:
        row_max, row_sum = torch.empty(n, **kw), torch.empty(n, **kw)
        if pair.positives:
            pos_max, pos_sum = torch.empty(n, **kw), torch.empty(n, **kw)
    cols = pair.epilogue == "softmax"
    if cols:
        col_max, col_sum = torch.full((m,), _NEG, **kw), torch.zeros(m, **kw)
        if pair.positives:
            cpos_max, cpos_sum = torch.full((m,), _NEG, **kw), torch.zeros(m, **kw)
    rows = block_rows(max(m, 1), a.device, max_block_elements)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        sets = _Sets(pair, start, r, m, row_offset, col_offset, row_groups, col_groups, a.device)
        _, s = _logits(a_acc[start : start + r], b_acc, scale, bias)
        _override(s, sets, pos_logits, start)
        if pair.epilogue == "sigmoid":
            z = torch.where(sets.pos, s, -s) if sets.pos is not None else -s
            total -= F.logsigmoid(z).masked_fill(~sets.allowed, 0.0).sum()
            continue
        row_max[start : start + r], row_sum[start : start + r] = _pairs(s, sets.allowed, 1)
        if pair.positives:
            pos_max[start : start + r], pos_sum[start : start + r] = _pairs(s, sets.pos, 1)
        if cols:
            col_max, col_sum = merge_lse(col_max, col_sum, *_pairs(s, sets.allowed, 0))
            if pair.positives:
                cpos_max, cpos_sum = merge_lse(cpos_max, cpos_sum, *_pairs(s, sets.pos, 0))
    if pair.epilogue == "sigmoid":
        return Stats(total=total)
    out = dict(row_max=row_max, row_sum=row_sum)
    if pair.positives:
        out.update(pos_max=pos_max, pos_sum=pos_sum)
    if cols:
        out.update(col_max=col_max, col_sum=col_sum)
        if pair.positives:
            out.update(cpos_max=cpos_max, cpos_sum=cpos_sum)
    return Stats(**out)


def _softmax(s: Tensor, keep: Tensor, mx: Tensor, ls: Tensor, dim: int) -> Tensor:
    """exp((S - max) - log sum) on the kept entries, 0 elsewhere (and on empty sets)."""
    shape = (-1, 1) if dim == 1 else (1, -1)
    p = torch.exp((s - mx.view(shape)) - ls.view(shape))
    return p.masked_fill_(~keep, 0.0)


def pair_backward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    pair: Pair,
    stats: Stats,
    coefs: Coefs,
    row_offset: int = 0,
    col_offset: int = 0,
    row_groups: Optional[Tensor] = None,
    col_groups: Optional[Tensor] = None,
    positive_logits: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    max_block_elements: Optional[int] = None,
) -> Grads:
    """(dA, dB, dscale, dbias[, dpos]) of the loss the coefficients define, from the
    merged (global) statistics, block of rows by block."""
    n, m = a.shape[0], b.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_acc, b_acc = a.to(acc), b.to(acc)
    scale, bias = scale.to(acc), None if bias is None else bias.to(acc)
    pos_logits = None if positive_logits is None else positive_logits.to(acc)
    kw = dict(dtype=acc, device=a.device)

    def vec(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.to(acc)

    gr, gpr, gc, gpc = vec(coefs.rows), vec(coefs.pos_rows), vec(coefs.cols), vec(coefs.pos_cols)
    if pair.epilogue != "sigmoid":
        rmax, rlog = log_sum(stats.row_max.to(acc), stats.row_sum.to(acc))
        if pair.positives and gpr is not None:
            pmax, plog = log_sum(stats.pos_max.to(acc), stats.pos_sum.to(acc))
    if pair.epilogue == "softmax" and gc is not None:
        cmax, clog = log_sum(stats.col_max.to(acc), stats.col_sum.to(acc))
    if pair.epilogue == "softmax" and pair.positives and gpc is not None:
        cpmax, cplog = log_sum(stats.cpos_max.to(acc), stats.cpos_sum.to(acc))
    da = torch.empty((n, a.shape[1]), **kw)
    db = torch.zeros((m, b.shape[1]), **kw)
    dscale, dbias = torch.zeros((), **kw), torch.zeros((), **kw)
    dpos = torch.zeros(n, **kw) if pos_logits is not None else None
    rows = block_rows(max(m, 1), a.device, max_block_elements)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        sl = slice(start, start + r)
        sets = _Sets(pair, start, r, m, row_offset, col_offset, row_groups, col_groups, a.device)
        a_blk = a_acc[sl]
        x, s = _logits(a_blk, b_acc, scale, bias)
        _override(s, sets, pos_logits, start)
        if pair.epilogue == "sigmoid":
            ds = torch.sigmoid(s)
            if sets.pos is not None:  # sigmoid(S) - 1 as -sigmoid(-S): exact near 1
                ds = torch.where(sets.pos, -torch.sigmoid(-s), ds)
            ds.masked_fill_(~sets.allowed, 0.0).mul_(coefs.total.to(acc))
        else:
            ds = torch.zeros_like(s)
            if gr is not None:
                ds += gr[sl, None] * _softmax(s, sets.allowed, rmax[sl], rlog[sl], 1)
            if gpr is not None and pair.positives:
                ds -= gpr[sl, None] * _softmax(s, sets.pos, pmax[sl], plog[sl], 1)
            if pair.epilogue == "softmax" and gc is not None:
                ds += gc[None, :] * _softmax(s, sets.allowed, cmax, clog, 0)
            if pair.epilogue == "softmax" and gpc is not None and pair.positives:
                ds -= gpc[None, :] * _softmax(s, sets.pos, cpmax, cplog, 0)
        if dpos is not None:  # the positive's logit is not a_i . b_j: its gradient apart
            dpos[sl] = (ds * sets.pos).sum(dim=1)
            ds.masked_fill_(sets.pos, 0.0)
        ds_b = torch.mm(ds, b_acc)
        dscale += (ds * x).sum()
        dbias += ds.sum()
        da[sl] = ds_b.mul_(scale)
        db.addmm_(ds.t(), a_blk)
    out = out_dtype or a.dtype
    return Grads(da.to(out), db.mul_(scale).to(out_dtype or b.dtype), dscale, dbias, dpos)
