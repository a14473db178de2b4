"""The pair engine as one differentiable torch.library op: ``flashcontrast::pair_lse``.

``pair_lse`` runs one sweep of the engine (``backends/pair.py``) on a backend and returns
its statistics as logsumexps: per row over the allowed columns (``row``) and over the
positives (``pos``), per column the same (``col``, ``cpos``; "softmax" epilogue), or
SigLIP's ``total`` ("sigmoid"). The objectives are plain torch arithmetic on these O(N)
vectors; autograd hands the op d loss / d statistic, which ARE the engine's backward
coefficients (gr = dL/d row, gpr = -dL/d pos, gc, gpc alike, g = dL/d total), and the
backward sweep recomputes the tiles from the (max, sum) pairs the op saved. So every
objective's whole loss, its positive terms included, is differentiated inside one sweep
(the positives subtracted in the tile, before any rounding to 16 bits), and the op saves
only its inputs and O(n + m) pairs: no copy of the features lives until the backward.

``b = None`` is a self-similarity (b is a): the backward returns dA + dB summed in the
accumulation dtype and rounded once. ``positive_logits`` (n,) replaces the positives'
logits (Symile "n") and receives their gradient. ``augment_t > 0`` is the uniformity sweep
(``_augmented.py``): a and b are the features x and y (b None: y = x), the sweep runs on
a(x) against b(y), built in each direction and never saved, and the gradients are x's and
y's (with b None, both sides' in d a).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._amp import autocast_off
from .._ops import backend_module
from .._validation import accumulation_dtype
from ..backends.pair import Coefs, Pair, Stats, lse
from . import _augmented

_FIELDS = Stats._fields[:8]  # the eight (max, sum) vectors, in Stats order


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=accumulation_dtype(like.dtype))


@torch.library.custom_op("flashcontrast::pair_lse", mutates_args=())
@autocast_off
def pair_lse(
    a: Tensor,
    b: Optional[Tensor],
    scale: Tensor,
    bias: Optional[Tensor],
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    positive_logits: Optional[Tensor],
    epilogue: str,
    positives: bool,
    exclude_self: bool,
    period: int,
    row_offset: int,
    col_offset: int,
    backend: str,
    augment_t: float,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor,
]:  # fmt: skip
    """(row, pos, col, cpos, total, *the eight (max, sum) vectors); unused ones empty."""
    pair = Pair(epilogue, positives, exclude_self, period)
    cols = a if b is None else b
    a, cols = _augmented.operands(a, cols, augment_t)
    stats = backend_module(backend, "pair").pair_forward(
        a, cols, scale, bias, pair, row_offset, col_offset, row_groups, col_groups,
        positive_logits,
    )  # fmt: skip
    out = []
    for m, s in ((0, 1), (2, 3), (4, 5), (6, 7)):
        mx, sm = stats[m], stats[s]
        out.append(_empty(a) if mx is None else lse(mx, sm))
    out.append(stats.total if stats.total is not None else a.new_zeros((), dtype=out[0].dtype))
    out += [_empty(a) if x is None else x for x in stats[:8]]
    return tuple(out)


@pair_lse.register_fake
def _pair_lse_fake(a, b, scale, bias, row_groups, col_groups, positive_logits, epilogue,
                   positives, exclude_self, period, row_offset, col_offset, backend,
                   augment_t):  # fmt: skip
    acc = accumulation_dtype(a.dtype)
    n, m = a.shape[0], (a if b is None else b).shape[0]
    rows = a.new_empty(n, dtype=acc) if epilogue != "sigmoid" else _empty(a)
    prow = a.new_empty(n, dtype=acc) if epilogue != "sigmoid" and positives else _empty(a)
    col = a.new_empty(m, dtype=acc) if epilogue == "softmax" else _empty(a)
    pcol = a.new_empty(m, dtype=acc) if epilogue == "softmax" and positives else _empty(a)
    total = a.new_empty((), dtype=acc)
    pairs = [x.new_empty(x.shape) for x in (rows, rows, prow, prow, col, col, pcol, pcol)]
    return (rows, prow, col, pcol, total, *pairs)


@torch.library.custom_op("flashcontrast::pair_lse_bwd", mutates_args=())
@autocast_off
def pair_lse_bwd(
    a: Tensor,
    b: Optional[Tensor],
    scale: Tensor,
    bias: Optional[Tensor],
    row_groups: Optional[Tensor],
    col_groups: Optional[Tensor],
    positive_logits: Optional[Tensor],
    pairs: list[Tensor],
    coefs: list[Tensor],
    epilogue: str,
    positives: bool,
    exclude_self: bool,
    period: int,
    row_offset: int,
    col_offset: int,
    backend: str,
    augment_t: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(da, db, dscale, dbias, dpos); with b None, da is d(a) whole and db is empty."""
    pair = Pair(epilogue, positives, exclude_self, period)
    stats = Stats(*[None if x.numel() == 0 and x.dim() == 1 else x for x in pairs])
    c = Coefs(*[None if x.numel() == 0 and x.dim() == 1 else x for x in coefs[:4]],
              total=coefs[4])  # fmt: skip
    cols = a if b is None else b
    x, y = a, cols
    a, cols = _augmented.operands(x, y, augment_t)
    out_dtype = accumulation_dtype(a.dtype) if b is None or augment_t > 0 else None
    g = backend_module(backend, "pair").pair_backward(
        a, cols, scale, bias, pair, stats, c, row_offset, col_offset, row_groups, col_groups,
        positive_logits, out_dtype,
    )  # fmt: skip
    if augment_t > 0:
        da, db = _augmented.grads(x, y, augment_t, g.da, g.db)
        if b is None:
            da, db = (da + db).to(x.dtype), _empty(x)
        else:
            da, db = da.to(x.dtype), db.to(y.dtype)
    elif b is None:
        da, db = (g.da + g.db).to(a.dtype), _empty(a)
    else:
        da, db = g.da, g.db
    dpos = g.dpos if g.dpos is not None else _empty(a)
    return da, db, g.dscale, g.dbias, dpos


@pair_lse_bwd.register_fake
def _pair_lse_bwd_fake(a, b, scale, bias, row_groups, col_groups, positive_logits, pairs, coefs,
                       epilogue, positives, exclude_self, period, row_offset, col_offset,
                       backend, augment_t):  # fmt: skip
    acc = accumulation_dtype(a.dtype)
    db = _empty(a) if b is None else torch.empty_like(b, memory_format=torch.contiguous_format)
    dpos = _empty(a) if positive_logits is None else a.new_empty(a.shape[0], dtype=acc)
    return (
        torch.empty_like(a, memory_format=torch.contiguous_format),
        db,
        a.new_empty((), dtype=acc),
        a.new_empty((), dtype=acc),
        dpos,
    )


_OPTIONS = ("epilogue", "positives", "exclude_self", "period", "row_offset", "col_offset",
            "backend", "augment_t")  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    a, b, scale, bias, row_groups, col_groups, positive_logits, *options = inputs
    for name, value in zip(_OPTIONS, options):
        setattr(ctx, name, value)
    ctx.has_bias = bias is not None
    ctx.has_pos = positive_logits is not None
    ctx.has_b = b is not None
    ctx.save_for_backward(a, b, scale, bias, row_groups, col_groups, positive_logits, *output[5:])
    ctx.mark_non_differentiable(*output[5:])


def _coef(grad: Optional[Tensor], like: Tensor, sign: float) -> Tensor:
    if grad is None or (like.numel() == 0 and like.dim() == 1):
        return like.new_empty(0)
    return grad.to(like.dtype) * sign


def _backward(ctx, g_row, g_pos, g_col, g_cpos, g_total, *_):
    a, b, scale, bias, row_groups, col_groups, positive_logits, *pairs = ctx.saved_tensors
    coefs = [
        _coef(g_row, pairs[0], 1.0),  # L = sum gr LSE - gpr LSE+ + sum gc LSE - gpc LSE+
        _coef(g_pos, pairs[2], -1.0),
        _coef(g_col, pairs[4], 1.0),
        _coef(g_cpos, pairs[6], -1.0),
        (g_total if g_total is not None else torch.zeros_like(scale)).to(scale.dtype).reshape(()),
    ]
    da, db, dscale, dbias, dpos = pair_lse_bwd(
        a, b, scale, bias, row_groups, col_groups, positive_logits, pairs, coefs,
        *(getattr(ctx, k) for k in _OPTIONS),
    )  # fmt: skip
    return (
        da,
        db if ctx.has_b else None,
        dscale.to(scale.dtype),
        dbias.to(bias.dtype) if ctx.has_bias else None,
        None,
        None,
        dpos if ctx.has_pos else None,
        *([None] * len(_OPTIONS)),
    )


torch.library.register_autograd("flashcontrast::pair_lse", _backward, setup_context=_setup_context)


def sweep(
    a: Tensor,
    b: Optional[Tensor],
    scale: Tensor,
    bias: Optional[Tensor],
    pair: Pair,
    backend: str,
    *,
    groups: Optional[tuple] = None,
    positive_logits: Optional[Tensor] = None,
    row_offset: int = 0,
    col_offset: int = 0,
    augment_t: float = 0.0,
) -> dict:
    """``pair_lse`` with the options as a :class:`Pair`; {"row", "pos", "col", "cpos",
    "total"}: the logsumexps the epilogue produces (the others absent). ``augment_t > 0``:
    the uniformity sweep of a(a) against b(b) (``_augmented.py``)."""
    rg, cg = (None, None) if groups is None else groups
    out = pair_lse(
        a, b, scale, bias, rg, cg, positive_logits, pair.epilogue, pair.positives,
        pair.exclude_self, pair.period, row_offset, col_offset, backend, float(augment_t),
    )  # fmt: skip
    names = ("row", "pos", "col", "cpos")
    res = {k: v for k, v in zip(names, out[:4]) if not (v.dim() == 1 and v.numel() == 0)}
    if pair.epilogue == "sigmoid":
        res = {"total": out[4]}
    return res
