"""The pair engine (``backends/pair.py``) on the "torch" backend: blockwise PyTorch, the
panel path.

The (n, m) logits are visited one panel of rows at a time (``panel_rows``: a (rows x m)
panel within ``MAX_BLOCK_ELEMENTS`` on the CPU, within ``PANEL_FRACTION`` of the device's
memory on CUDA):

forward   X = A_blk B^T (a GEMM with float32 results, ``_gemm.py``), S = s X + b; the entry sets
          (excluded, masked, positives) from the global indices and group ids of the
          block's rows and the columns: (rows x m) booleans made per block, never n x m;
          row pairs directly, column pairs folded in online (max, then rescaled sums).
backward  recompute the block, dS from the merged pairs (P and Q exp((S - max) -
          log sum), the positives subtracted in the block), then dA_blk = s dS B,
          dB += s dS^T A_blk, ds += sum dS X, db += sum dS.

Precision and copies. Logits and dS are float32 (float64 for float64 inputs), never rounded
to 16 bits. For 16-bit features the backward's two products take dS rounded once to the
features' dtype, after the positives were subtracted in float32 (for float16 divided first
by u = max |coefficient|, u s applied to the float32 products, so that 1 / N-sized
coefficients never become subnormal: the Triton kernels' scheme), and ds is sum dS X from
the float32 dS and X. On CUDA the GEMMs take the 16-bit features as they are (tensor
cores, float32 accumulation and results; ``_gemm.py``): no float32 copy of a feature. On
the CPU the features are cast once per call to float32 (a visible O((n + m) D) copy) and
the same algorithm runs in float32. Panel memory: a few (rows x m) float32 buffers.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._validation import accumulation_dtype
from .._pair_entry import Sweep, backward_entry, forward_entry
from ..pair import Coefs, Grads, Stats, log_sum, merge_lse, sample_ids
from . import _gemm, panel_rows

__all__ = ["pair_backward", "pair_forward"]

_NEG = float("-inf")


class _Sets:
    """The entry sets of one row block (rows start .. start + r of the sweep), applied to
    its logits S (r, m) in place: excluded and masked entries become -inf (then they are
    in no statistic, contribute 0 to SigLIP's sum and get weight 0 in the backward,
    without an (r, m) mask); the positives are kept as indices where each row has one at
    most (period 0: global row == global column, CLIP's diagonal wherever the block sits),
    as an (r, m) boolean only with a period (the multi-view stacks)."""

    def __init__(self, sweep: Sweep, start: int, r: int, m: int) -> None:
        pair, row_offset, col_offset = sweep.pair, sweep.row_offset, sweep.col_offset
        row_groups, col_groups, device = sweep.row_groups, sweep.col_groups, sweep.a.device
        self.start, self.r = start, r
        # the entries with global row == global column: local (row, column) index pairs
        gi = torch.arange(row_offset + start, row_offset + start + r, device=device)
        cj = gi - col_offset
        hit = (cj >= 0) & (cj < m)
        self.diag = (torch.nonzero(hit).flatten(), cj[hit])
        self.exclude = pair.exclude_self
        self.groups = None
        if row_groups is not None:  # equal id and different sample: masked
            si = sample_ids(row_offset + start, r, pair.period, device)
            sj = sample_ids(col_offset, m, pair.period, device)
            rg = row_groups[start : start + r]
            self.groups = (rg[:, None] == col_groups[None, :]) & (si[:, None] != sj[None, :])
        self.pos_mask = self.pos_idx = None
        if pair.positives and pair.period > 0:
            si = sample_ids(row_offset + start, r, pair.period, device)
            sj = sample_ids(col_offset, m, pair.period, device)
            self.pos_mask = si[:, None] == sj[None, :]
            if pair.exclude_self:
                self.pos_mask[self.diag] = False
        elif pair.positives and not pair.exclude_self:
            self.pos_idx = self.diag

    @property
    def has_pos(self) -> bool:
        return self.pos_mask is not None or self.pos_idx is not None

    def apply(self, s: Tensor) -> None:
        """Excluded and masked entries of S to -inf, in place."""
        if self.exclude:
            s[self.diag] = _NEG
        if self.groups is not None:
            s.masked_fill_(self.groups, _NEG)

    def pos_pairs(self, s: Tensor, dim: int, size: int, work: Tensor) -> tuple[Tensor, Tensor]:
        """(max, sum) over the positives along ``dim`` (``size`` outputs); ``work``: an
        (r, m) scratch buffer."""
        if self.pos_mask is not None:
            return _pairs(work.copy_(s).masked_fill_(~self.pos_mask, _NEG), dim, work)
        mx = s.new_full((size,), _NEG)
        sm = s.new_zeros(size)
        rows, cols = self.pos_idx
        at = rows if dim == 1 else cols
        mx[at] = s[rows, cols]
        sm[at] = 1.0
        return mx, sm

    def pos_softmax(self, s: Tensor, mx: Tensor, ls: Tensor, dim: int, work: Tensor) -> Tensor:
        """Q: exp((S - max) - log sum) over the positives, (r, m) in ``work`` with the
        mask, else the values at the positive indices (rows, cols order)."""
        if self.pos_mask is not None:
            q = _softmax(s, mx, ls, dim, work)
            return q.masked_fill_(~self.pos_mask, 0.0)
        rows, cols = self.pos_idx
        at = rows if dim == 1 else cols
        return torch.exp((s[rows, cols] - mx[at]) - ls[at])


def _logits(a_blk: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """S = scale a_blk b^T + bias, (r, m), in one buffer."""
    s = _gemm.mm(a_blk, b.t()).mul_(scale)
    return s if bias is None else s.add_(bias)


def _logits_kept(a_blk: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]):
    """(S, X): X = a_blk b^T kept beside S = scale X + bias, both (r, m)."""
    x = _gemm.mm(a_blk, b.t())
    s = x * scale
    return x, (s if bias is None else s.add_(bias))


def _override(s: Tensor, sets: _Sets, pos_logits: Optional[Tensor]) -> None:
    """S on the positives replaced by the given logits (one positive per row at most)."""
    if pos_logits is not None and sets.pos_idx is not None:
        rows, cols = sets.pos_idx
        s[rows, cols] = pos_logits[sets.start + rows]


def _pairs(s: Tensor, dim: int, work: Tensor) -> tuple[Tensor, Tensor]:
    """(max, sum exp(S - max)) along ``dim`` (-inf entries are out of the set; an empty
    dimension gives the empty set's (-inf, 0)); exp(S - max) is formed in ``work`` (r, m,
    which may be ``s`` itself once ``s`` is no longer needed)."""
    if s.shape[dim] == 0:
        size = s.shape[1 - dim]
        return s.new_full((size,), _NEG), s.new_zeros(size)
    mx = s.amax(dim=dim)
    # an empty set's max -inf is shifted by the dtype's lowest instead: exp(-inf - lowest) = 0
    safe = mx.clamp_min(torch.finfo(mx.dtype).min).unsqueeze(dim)
    return mx, torch.sub(s, safe, out=work).exp_().sum(dim=dim)


class _Operands(NamedTuple):
    """A sweep's operands: the features as the GEMMs take them (16-bit as given on CUDA,
    else cast to the accumulation dtype), the scalars in the accumulation dtype."""

    acc: torch.dtype  # float32; float64 for float64 inputs
    a: Tensor  # (n, D)
    b: Tensor  # (m, D)
    scale: Tensor
    bias: Optional[Tensor]
    positive_logits: Optional[Tensor]  # (n,)
    low: Optional[torch.dtype]  # the 16-bit dtype dS is rounded to for the products; None


def _operands(sweep: Sweep) -> _Operands:
    """The sweep's features, scale, bias and positive logits, cast (where cast) once per
    call."""
    acc = accumulation_dtype(sweep.a.dtype)
    low = sweep.a.dtype if sweep.a.dtype in (torch.float16, torch.bfloat16) else None

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(acc)

    a, b = _gemm.operands(sweep.a, sweep.b)
    return _Operands(
        acc, a, b, sweep.scale.to(acc), cast(sweep.bias), cast(sweep.positive_logits), low
    )


def _pair_forward(sweep: Sweep) -> Stats:
    """The sweep's statistics (``backends/pair.py``), block of rows by block."""
    pair, device = sweep.pair, sweep.a.device
    n, m = sweep.a.shape[0], sweep.b.shape[0]
    acc, a_acc, b_acc, scale, bias, pos_logits, _ = _operands(sweep)
    kw = dict(dtype=acc, device=device)
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
    rows = panel_rows(max(m, 1), device, sweep.max_block_elements)
    # scratch for exp(S - max), reused by every panel: no fresh (r, m) buffer per statistic
    work = torch.empty((0 if pair.epilogue == "sigmoid" else min(rows, n), m), **kw)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        sets = _Sets(sweep, start, r, m)
        w = work[:r]
        s = _logits(a_acc[start : start + r], b_acc, scale, bias)
        _override(s, sets, pos_logits)
        sets.apply(s)
        if pair.epilogue == "sigmoid":  # sum softplus(-z S): -inf entries add 0
            if sets.pos_idx is not None:
                s[sets.pos_idx] = -s[sets.pos_idx]
                total -= F.logsigmoid(s.neg_()).sum()
            elif sets.pos_mask is not None:
                total -= F.logsigmoid(torch.where(sets.pos_mask, s, -s)).sum()
            else:
                total -= F.logsigmoid(s.neg_()).sum()
            continue
        row_max[start : start + r], row_sum[start : start + r] = _pairs(s, 1, w)
        if pair.positives:
            pos_max[start : start + r], pos_sum[start : start + r] = sets.pos_pairs(s, 1, r, w)
        if cols:  # the first panel's pairs taken as they are: merging into (-inf, 0) is a no-op
            pairs = _pairs(s, 0, w)
            col_max, col_sum = pairs if start == 0 else merge_lse(col_max, col_sum, *pairs)
            if pair.positives:
                pairs = sets.pos_pairs(s, 0, m, w)
                cpos_max, cpos_sum = pairs if start == 0 else merge_lse(cpos_max, cpos_sum, *pairs)
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


def _softmax(s: Tensor, mx: Tensor, ls: Tensor, dim: int, out: Tensor) -> Tensor:
    """exp((S - max) - log sum) written to ``out`` (r, m): 0 on -inf entries and empty
    sets."""
    shape = (-1, 1) if dim == 1 else (1, -1)
    return torch.sub(s, mx.view(shape), out=out).sub_(ls.view(shape)).exp_()


def _sub_positive(ds: Tensor, sets: _Sets, q: Tensor, coef: Tensor, dim: int) -> None:
    """dS -= coef Q over the positives (coef per row with dim 1, per column with dim 0)."""
    if sets.pos_mask is not None:
        ds.sub_(q.mul_(coef[:, None] if dim == 1 else coef[None, :]))
        return
    rows, cols = sets.pos_idx
    ds[rows, cols] -= q * coef[rows if dim == 1 else cols]


def _pair_backward(
    sweep: Sweep, stats: Stats, coefs: Coefs, out_dtype: Optional[torch.dtype]
) -> Grads:
    """(dA, dB, dscale, dbias[, dpos]) of the loss the coefficients define, from the
    merged (global) statistics, block of rows by block."""
    pair, device = sweep.pair, sweep.a.device
    n, m = sweep.a.shape[0], sweep.b.shape[0]
    acc, a_acc, b_acc, scale, bias, pos_logits, low = _operands(sweep)
    kw = dict(dtype=acc, device=device)

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
    unit = _unit(coefs, low, acc) if low is not None else None
    da = torch.empty((n, sweep.a.shape[1]), **kw)
    db = torch.zeros((m, sweep.b.shape[1]), **kw)
    dscale, dbias = torch.zeros((), **kw), torch.zeros((), **kw)
    dpos = torch.zeros(n, **kw) if pos_logits is not None else None
    rows = panel_rows(max(m, 1), device, sweep.max_block_elements)
    # dS and one softmax's scratch, reused by every panel (no fresh (r, m) buffer per term)
    ds_buf = torch.empty((min(rows, n), m), **kw)
    work = torch.empty((0 if pair.epilogue == "sigmoid" else min(rows, n), m), **kw)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        sl = slice(start, start + r)
        sets = _Sets(sweep, start, r, m)
        a_blk = a_acc[sl]
        ds, w = ds_buf[:r], work[:r]
        if low is None:
            s = _logits(a_blk, b_acc, scale, bias)
        else:  # X kept: ds from the float32 dS and X, not from the rounded dS
            x, s = _logits_kept(a_blk, b_acc, scale, bias)
        _override(s, sets, pos_logits)
        sets.apply(s)
        if pair.epilogue == "sigmoid":
            g = coefs.total.to(acc)
            if sets.pos_mask is not None:  # sigmoid(S) - 1 as -sigmoid(-S): exact near 1
                ds = torch.where(sets.pos_mask, -torch.sigmoid(-s), torch.sigmoid(s))
            else:
                torch.sigmoid(s, out=ds)
                if sets.pos_idx is not None:
                    ds[sets.pos_idx] = -torch.sigmoid(-s[sets.pos_idx])
            ds.mul_(g)
        else:
            if gr is not None:  # the first term written to dS directly, no zeroing pass
                _softmax(s, rmax[sl], rlog[sl], 1, ds).mul_(gr[sl, None])
            else:
                ds.zero_()
            if pair.epilogue == "softmax" and gc is not None:
                ds.add_(_softmax(s, cmax, clog, 0, w).mul_(gc[None, :]))
            # the positives, subtracted in the block before anything is rounded
            if gpr is not None and pair.positives:
                q = sets.pos_softmax(s, pmax[sl], plog[sl], 1, w)
                _sub_positive(ds, sets, q, gpr[sl], 1)
            if pair.epilogue == "softmax" and gpc is not None and pair.positives:
                q = sets.pos_softmax(s, cpmax, cplog, 0, w)
                _sub_positive(ds, sets, q, gpc, 0)
        del s
        if dpos is not None and sets.pos_idx is not None:
            # the positive's logit is not a_i . b_j: its gradient goes apart
            pi, pj = sets.pos_idx  # (not `rows`: that is the block size of this loop)
            dpos[start + pi] = ds[pi, pj]
            ds[pi, pj] = 0.0
        if bias is not None:
            dbias += ds.sum()
        if low is None:
            ds_b = torch.mm(ds, b_acc)  # (r, D)
            dscale += (ds_b * a_blk).sum()  # sum_ij dS_ij <a_i, b_j> = sum_i <a_i, (dS B)_i>
            da[sl] = ds_b.mul_(scale)
            db.addmm_(ds.t(), a_blk)
            continue
        dscale += torch.dot(ds.view(-1), x.view(-1))
        del x
        ds_lo = (ds if unit is None else ds.div_(unit)).to(low)  # rounded once
        del ds
        if ds_lo.dtype != a_acc.dtype:  # the CPU: the same 16-bit values, in float32
            ds_lo = ds_lo.to(a_acc.dtype)
        da[sl] = _gemm.mm(ds_lo, b_acc).mul_(scale if unit is None else scale * unit)
        _gemm.addmm_(db, ds_lo.t(), a_blk)
    out = out_dtype or sweep.a.dtype
    db_scale = scale if unit is None else scale * unit
    return Grads(da.to(out), db.mul_(db_scale).to(out_dtype or sweep.b.dtype), dscale, dbias, dpos)


def _unit(coefs: Coefs, low: torch.dtype, acc: torch.dtype) -> Optional[Tensor]:
    """u = max |coefficient| (0-d, 1 where all are 0) for float16's dS: every |dS| <= 4 u
    (softmax weights are at most 1), so dS / u is a normal float16 however small the
    coefficients; None for bfloat16 (float32's exponent range)."""
    if low != torch.float16:
        return None
    given = (coefs.rows, coefs.pos_rows, coefs.cols, coefs.pos_cols, coefs.total)
    amax = [c.detach().abs().max().to(acc) for c in given if c is not None and c.numel()]
    if not amax:
        return None
    u = torch.stack(amax).max()
    return torch.where(u > 0, u, torch.ones_like(u))


pair_forward = forward_entry(_pair_forward)
pair_backward = backward_entry(_pair_backward)
