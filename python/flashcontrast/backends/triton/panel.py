"""The Triton backend's side of the panel path (``backends/_panel.py``): the fused kernels
of ``pair.py`` as its epilogues, with X_IN_MEMORY (the forward reads the panel's X instead
of multiplying; the backward reads X, writes dS / u in the features' dtype and forms no dA
/ dB: no atomics but dpos). u is ``pair._unit``'s: 1 for bf16 and fp32, max |coefficient|
for fp16, g for "sigmoid".
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import _panel
from .._pair_entry import Sweep
from ..pair import Coefs, Grads, Stats
from . import pair as fused

__all__ = ["EPILOGUES", "pair_backward", "pair_forward", "panel_backward", "panel_forward"]


def _empty(sweep: Sweep) -> Stats:
    return fused._empty_stats(sweep.pair, sweep.a.shape[0], sweep.b.shape[0], sweep.a.device)


def _backward(sweep: Sweep, stats: Stats, coefs: Coefs, x: Tensor, ds: Tensor, token) -> Grads:
    return fused._pair_backward(sweep, stats, coefs, torch.float32, panel=(x, ds, token))


def _unit(sweep: Sweep, coefs: Coefs) -> tuple[Optional[Tensor], Any]:
    given = [fused._f32(c) for c in (coefs.rows, coefs.pos_rows, coefs.cols, coefs.pos_cols)]
    unit, normalize = fused._unit(sweep.pair, given, coefs.total, sweep.a.dtype)
    return unit, (unit, normalize)


EPILOGUES = _panel.Epilogues(
    prepare=fused._prepare,
    empty=_empty,
    forward=lambda sweep, x: fused._pair_forward(sweep, x=x),
    backward=_backward,
    unit=_unit,
)


#: The panel path's sweeps, and the same as the contract's entry points.
panel_forward, panel_backward, pair_forward, pair_backward = _panel.entry_points(EPILOGUES)
