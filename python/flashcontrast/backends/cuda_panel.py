"""The CUDA backend's side of the panel path (``backends/_panel.py``): csrc's pair kernels
as its epilogues. The forward kernel reads the panel's X (PairParams.x) instead of
multiplying; the backward kernel reads X, writes dS / u in the features' dtype
(PairGrads.ds, ds_unit) and forms no dA / dB (no atomics but dpos). u: max |coefficient|
for fp16 (so that 1 / N-sized coefficients never become subnormal), 1 for bf16 and fp32.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _panel, cuda
from ._pair_entry import Sweep
from .blockwise.pair import _unit as _max_abs_coefficient
from .pair import Coefs, Grads, Stats

__all__ = ["EPILOGUES", "pair_backward", "pair_forward", "panel_backward", "panel_forward"]


def _prepare(sweep: Sweep) -> None:
    cuda._checked(sweep)


def _backward(sweep: Sweep, stats: Stats, coefs: Coefs, x: Tensor, ds: Tensor, unit) -> Grads:
    return cuda._pair_backward(sweep, stats, coefs, torch.float32, panel=(x, ds, unit))


def _unit(sweep: Sweep, coefs: Coefs) -> tuple[Optional[Tensor], Any]:
    if sweep.a.dtype != torch.float16:
        return None, None
    unit = _max_abs_coefficient(coefs, torch.float16, torch.float32)
    return unit, None if unit is None else unit.reshape(1).contiguous()


EPILOGUES = _panel.Epilogues(
    prepare=_prepare,
    empty=lambda sweep: cuda._pair_forward(sweep),
    forward=lambda sweep, x: cuda._pair_forward(sweep, x=x),
    backward=_backward,
    unit=_unit,
)


#: The panel path's sweeps, and the same as the contract's entry points.
panel_forward, panel_backward, pair_forward, pair_backward = _panel.entry_points(EPILOGUES)
