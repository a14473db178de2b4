"""The pair engine's contract (flashcontrast/backends/pair.py) written densely: the n x m
logits, the entry sets as boolean matrices, the statistics by torch.logsumexp and the
gradients by autograd of the loss the coefficients define. The oracle every backend's
pair_forward / pair_backward is checked against (tests/test_engine.py), in float64 and,
for the verification rule's same-dtype error, in the inputs' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flashcontrast.backends.pair import Pair, lse, sample_ids


def entry_sets(pair: Pair, n: int, m: int, row_offset: int, col_offset: int, rg, cg, device):
    """(allowed, positives) as (n, m) booleans."""
    gi = torch.arange(row_offset, row_offset + n, device=device)[:, None]
    gj = torch.arange(col_offset, col_offset + m, device=device)[None, :]
    si = sample_ids(row_offset, n, pair.period, device)[:, None]
    sj = sample_ids(col_offset, m, pair.period, device)[None, :]
    same = si == sj
    self_ = gi == gj
    allowed = ~self_ if pair.exclude_self else torch.ones(n, m, dtype=torch.bool, device=device)
    if rg is not None:
        allowed = allowed & ~((rg[:, None] == cg[None, :]) & ~same)
    pos = (same & ~self_ if pair.exclude_self else same) if pair.positives else None
    return allowed, pos


def _lse(s, keep, dim):
    return torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=dim)


def dense(
    a, b, scale, bias, pair: Pair, coefs: dict, row_offset=0, col_offset=0, rg=None, cg=None,
    positive_logits: Optional[torch.Tensor] = None,
):  # fmt: skip
    """(statistics dict of logsumexps, loss) in a's dtype, differentiable."""
    n, m = a.shape[0], b.shape[0]
    allowed, pos = entry_sets(pair, n, m, row_offset, col_offset, rg, cg, a.device)
    s = scale * (a @ b.T)
    if bias is not None:
        s = s + bias
    if positive_logits is not None:
        s = torch.where(pos, positive_logits[:, None].expand_as(s), s)
    if pair.epilogue == "sigmoid":
        z = torch.where(pos, s, -s) if pos is not None else -s
        total = -(F.logsigmoid(z) * allowed).sum()
        return {"total": total}, coefs["total"] * total
    stats = {"row": _lse(s, allowed, 1)}
    loss = (coefs.get("rows", 0) * _safe(stats["row"])).sum()
    if pos is not None:
        stats["pos"] = _lse(s, pos, 1)
        loss = loss - (coefs.get("pos_rows", 0) * _safe(stats["pos"])).sum()
    if pair.epilogue == "softmax":
        stats["col"] = _lse(s, allowed, 0)
        loss = loss + (coefs.get("cols", 0) * _safe(stats["col"])).sum()
        if pos is not None:
            stats["cpos"] = _lse(s, pos, 0)
            loss = loss - (coefs.get("pos_cols", 0) * _safe(stats["cpos"])).sum()
    return stats, loss


def _safe(x):
    """-inf (an empty set) contributes nothing to the loss and gets no gradient."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def stats_lse(stats) -> dict:
    """A backend's PairStats as the oracle's statistics: each (max, sum) pair present as its
    logsumexp (n,) or (m,), under the key ``dense`` gives it ("row", "pos", "col", "cpos"),
    and the sigmoid epilogue's scalar "total"."""
    out = {} if stats.total is None else {"total": stats.total}
    for key, (mx, sm) in {
        "row": (stats.row_max, stats.row_sum),
        "pos": (stats.pos_max, stats.pos_sum),
        "col": (stats.col_max, stats.col_sum),
        "cpos": (stats.cpos_max, stats.cpos_sum),
    }.items():
        if mx is not None:
            out[key] = lse(mx, sm)
    return out
