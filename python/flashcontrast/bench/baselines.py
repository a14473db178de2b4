"""Implementations the benchmark runs besides flashcontrast's backends.

- ``reference-compiled``: ``torch.compile`` of the reference (the dispatcher with
  ``backend="reference"``), compiled afresh for each measurement so that every (N, D,
  dtype) gets its own static-shape graph; the compile happens in the untimed warm-up.
  Where torch.compile fails (no C++ compiler for the CPU, no Triton for the GPU) the
  runner prints a note and skips it.
- ``inf-cl``: Inf-CL's ``cal_inf_loss`` (CLIP only, GPU only, when ``inf_cl`` imports).
  ``cal_inf_loss(q, k, scale=...)`` is the row-only InfoNCE: cross-entropy of each row
  of ``scale * q k^T`` against its diagonal. The CLIP loss averages the row and the
  column direction, so the row runs it twice, ``(cal_inf_loss(a, b) + cal_inf_loss(b,
  a)) / 2``: the same loss, the same inputs and the same flop count as every other CLIP
  row, which makes its time, peak memory and TFLOP/s comparable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .measure import Call, backend_call

COMPILED = "reference-compiled"
INF_CL = "inf-cl"


def compiled_reference(objective: str) -> Call:
    """A fresh torch.compile of the reference for ``objective``."""
    torch._dynamo.reset()  # a new graph per measurement: no recompile limit, no stale guards
    # Compile in this process: a pool of compile workers would keep the CPU busy while
    # later rows are timed.
    torch._inductor.config.compile_threads = 1
    return torch.compile(backend_call(objective, "reference"), dynamic=False)


def inf_cl_unavailable(objective: str, device: torch.device) -> Optional[str]:
    """None if the Inf-CL row can run, else why not."""
    if objective != "clip":
        return "Inf-CL implements CLIP InfoNCE only"
    if device.type != "cuda":
        return "Inf-CL needs a GPU"
    try:
        import inf_cl  # noqa: F401
    except Exception as e:  # not installed, or its build is broken
        return f"inf_cl does not import ({type(e).__name__}: {e})"
    return None


def inf_cl_clip() -> Call:
    """CLIP's two-direction loss from Inf-CL's row-only ``cal_inf_loss``."""
    from inf_cl import cal_inf_loss

    def fn(xs, scale):
        a, b = xs
        return (cal_inf_loss(a, b, scale=scale) + cal_inf_loss(b, a, scale=scale)) / 2

    return fn


def baseline_call(name: str, objective: str) -> Call:
    """The callable for baseline ``name`` (COMPILED or INF_CL)."""
    return compiled_reference(objective) if name == COMPILED else inf_cl_clip()
