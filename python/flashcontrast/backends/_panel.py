"""The panel path of the pair engine, for any backend with epilogue kernels: cuBLAS GEMMs
per panel of rows, the backend's kernels reading the GEMM's output.

Per panel of R rows (:func:`rows_per_panel`: within ``blockwise.PANEL_FRACTION`` of the
device's memory at 4 + e bytes per entry, X and dS), with the features as the GEMMs take
them (``blockwise/_gemm.py``: 16-bit on the tensor cores with float32 results on CUDA,
float32 elsewhere):

forward   X_p = A_p B^T                       a GEMM, (R, m) float32 written once
          statistics of S = s X_p + b         the backend's forward epilogue reading X
          row pairs of the panel's rows; column pairs merged across panels (merge_lse)
backward  X_p = A_p B^T                       the GEMM again (bitwise the forward's)
          dS_p / u                            the backend's backward epilogue: dS rounded
                                              once to the features' dtype, the dscale /
                                              dbias partials on the way
          dA_p = (u s) dS_p B,  dB += (u s) dS_p^T A_p       two GEMMs, float32 results

No atomics (dpos only, with positive_logits), deterministic for a fixed panel size. Per
logit it moves 4 + 4 bytes forward (X written, read) and 4 + 4 + 2 + 2 x 2 backward (X
written, read; dS written, read by two GEMMs), plus the dB read-modify-write of 8 D / R:
the cost model's "panel" path (``flashcontrast.costmodel``). Memory: the (R, m) X and dS
buffers. u (the backend's :attr:`Epilogues.unit`, fp16's normalization) is chosen once
for the whole sweep, so every panel's products add in one scale.

The backends' epilogues: ``triton/panel.py`` (the fused kernels with X_IN_MEMORY) and
``cuda_panel.py`` (csrc's kernels with PairParams.x and PairGrads.ds).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._pair_entry import Sweep, backward_entry, forward_entry
from .blockwise import _gemm, panel_rows
from .pair import Coefs, Grads, Stats, merge_lse

__all__ = [
    "Epilogues",
    "entry_points",
    "panel_backward",
    "panel_forward",
    "routes",
    "rows_per_panel",
]

_F32 = torch.float32


class Epilogues(NamedTuple):
    """A backend's side of the panel path."""

    prepare: Callable[[Sweep], None]  # raise for what the backend cannot take
    empty: Callable[[Sweep], Stats]  # the statistics of a sweep with no rows or columns
    forward: Callable[[Sweep, Tensor], Stats]  # a panel's statistics from its X (r, m)
    # (a panel, its stats, its coefs, X, dS out (r, m), token) -> Grads: dscale, dbias,
    # dpos of the panel, dS / u written into dS out (da, db unused)
    backward: Callable[[Sweep, Stats, Coefs, Tensor, Tensor, Any], Grads]
    # (sweep, coefs) -> (u: a 0-d float32 tensor or None for 1, the token backward takes)
    unit: Callable[[Sweep, Coefs], tuple[Optional[Tensor], Any]]


def _panel(sweep: Sweep, start: int, r: int) -> Sweep:
    """The sweep of rows start .. start + r (its offsets, groups and positive logits)."""

    def rows(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t[start : start + r]

    return sweep._replace(
        a=sweep.a[start : start + r],
        row_offset=sweep.row_offset + start,
        row_groups=rows(sweep.row_groups),
        positive_logits=rows(sweep.positive_logits),
    )


def rows_per_panel(
    m: int, device: torch.device, element_size: int, max_elements: Optional[int] = None
) -> int:
    """Rows per panel against ``m`` columns: X (float32) and dS (``element_size`` bytes)
    per entry, within ``blockwise.panel_rows``'s budget."""
    return panel_rows(max(m, 1), device, max_elements, 4 + element_size)


def _rows(sweep: Sweep) -> int:
    return rows_per_panel(
        sweep.b.shape[0], sweep.a.device, sweep.a.element_size(), sweep.max_block_elements
    )


def panel_forward(sweep: Sweep, ep: Epilogues) -> Stats:
    """``pair_forward``'s statistics by the panel path with ``ep``'s epilogue kernels."""
    ep.prepare(sweep)
    a, b = _gemm.operands(sweep.a, sweep.b)
    n, m = sweep.a.shape[0], sweep.b.shape[0]
    if n == 0 or m == 0:
        return ep.empty(sweep)
    rows = _rows(sweep)
    parts = []
    for start in range(0, n, rows):
        r = min(rows, n - start)
        x = _gemm.mm(a[start : start + r], b.t())
        parts.append(ep.forward(_panel(sweep, start, r), x))
        del x
    if sweep.pair.epilogue == "sigmoid":
        return Stats(total=torch.stack([p.total for p in parts]).sum())
    out = {}
    for name in ("row", "pos"):
        if getattr(parts[0], f"{name}_max") is not None:
            out[f"{name}_max"] = torch.cat([getattr(p, f"{name}_max") for p in parts])
            out[f"{name}_sum"] = torch.cat([getattr(p, f"{name}_sum") for p in parts])
    for name in ("col", "cpos"):
        if getattr(parts[0], f"{name}_max") is not None:
            mx, sm = getattr(parts[0], f"{name}_max"), getattr(parts[0], f"{name}_sum")
            for p in parts[1:]:
                mx, sm = merge_lse(mx, sm, getattr(p, f"{name}_max"), getattr(p, f"{name}_sum"))
            out[f"{name}_max"], out[f"{name}_sum"] = mx, sm
    return Stats(**out)


def panel_backward(
    sweep: Sweep, stats: Stats, coefs: Coefs, out_dtype: Optional[torch.dtype], ep: Epilogues
) -> Grads:
    """``pair_backward``'s gradients by the panel path with ``ep``'s epilogue kernels."""
    ep.prepare(sweep)
    dev = sweep.a.device
    n, m, d = sweep.a.shape[0], sweep.b.shape[0], sweep.a.shape[1]
    a, b = _gemm.operands(sweep.a, sweep.b)
    f32 = dict(dtype=_F32, device=dev)
    da, db = torch.empty((n, d), **f32), torch.zeros((m, d), **f32)
    dscale, dbias = torch.zeros((), **f32), torch.zeros((), **f32)
    dpos = torch.zeros(n, **f32) if sweep.positive_logits is not None else None
    unit, token = ep.unit(sweep, coefs)
    rows = _rows(sweep)
    for start in range(0, n if m > 0 else 0, rows):
        r = min(rows, n - start)
        sl = slice(start, start + r)
        x = _gemm.mm(a[sl], b.t())
        ds = torch.empty((r, m), dtype=sweep.a.dtype, device=dev)  # rounded once to it
        g = ep.backward(
            _panel(sweep, start, r), _panel_stats(stats, sl), _panel_coefs(coefs, sl), x, ds,
            token,
        )  # fmt: skip
        del x
        dscale += g.dscale
        dbias += g.dbias
        if dpos is not None:
            dpos[sl] = g.dpos
        ds = ds.to(a.dtype)  # the CPU: the same 16-bit values in float32; CUDA: no copy
        da[sl] = _gemm.mm(ds, b)
        _gemm.addmm_(db, ds.t(), a[sl])
    if n == 0 or m == 0:
        da.zero_()
    out_scale = sweep.scale.to(_F32) if unit is None else sweep.scale.to(_F32) * unit
    da.mul_(out_scale)
    db.mul_(out_scale)
    if out_dtype != _F32:
        da, db = da.to(out_dtype or sweep.a.dtype), db.to(out_dtype or sweep.b.dtype)
    return Grads(da, db, dscale, dbias, dpos)


def _panel_stats(stats: Stats, sl: slice) -> Stats:
    """The merged statistics a panel's backward reads: its rows' pairs, every column's."""
    return stats._replace(
        **{
            k: getattr(stats, k)[sl]
            for k in ("row_max", "row_sum", "pos_max", "pos_sum")
            if getattr(stats, k) is not None
        }
    )


def _panel_coefs(coefs: Coefs, sl: slice) -> Coefs:
    """A panel's coefficients: its rows' (rows, pos_rows), every column's, the total."""
    return coefs._replace(
        rows=None if coefs.rows is None else coefs.rows[sl],
        pos_rows=None if coefs.pos_rows is None else coefs.pos_rows[sl],
    )


def entry_points(ep: Epilogues) -> tuple[Callable[..., Stats], ...]:
    """(panel_forward(sweep), panel_backward(sweep, stats, coefs, out_dtype), pair_forward,
    pair_backward): a backend's panel path with its epilogues ``ep``, then the same as the
    contract's entry points (``max_block_elements``: rows x m per panel)."""

    def forward(sweep: Sweep) -> Stats:
        return panel_forward(sweep, ep)

    def backward(
        sweep: Sweep, stats: Stats, coefs: Coefs, out_dtype: Optional[torch.dtype]
    ) -> Grads:
        return panel_backward(sweep, stats, coefs, out_dtype, ep)

    forward.__doc__ = "``pair_forward``'s statistics by the panel path (as there)."
    backward.__doc__ = "``pair_backward``'s gradients by the panel path (as there)."
    return forward, backward, forward_entry(forward), backward_entry(backward)


def routes(
    path_of: Callable[[Sweep], str],
    fused_forward: Callable[..., Stats],
    fused_backward: Callable[..., Grads],
    panel_module: Callable[[], ModuleType],
    docs: tuple[str, str],
) -> tuple[Callable[..., Stats], Callable[..., Grads]]:
    """A backend's forward and backward sweeps taking ``path_of(sweep)``: its fused
    kernels, or the panel path of ``panel_module()`` (imported at the first panel call; it
    has ``panel_forward`` / ``panel_backward``). ``docs``: the two docstrings."""

    def forward(sweep: Sweep) -> Stats:
        if path_of(sweep) == "panel":
            return panel_module().panel_forward(sweep)
        return fused_forward(sweep)

    def backward(
        sweep: Sweep, stats: Stats, coefs: Coefs, out_dtype: Optional[torch.dtype]
    ) -> Grads:
        if path_of(sweep) == "panel":
            return panel_module().panel_backward(sweep, stats, coefs, out_dtype)
        return fused_backward(sweep, stats, coefs, out_dtype)

    forward.__doc__, backward.__doc__ = docs
    return forward, backward
