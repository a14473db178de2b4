"""Implementations the benchmark runs besides flashcontrast's backends.

- ``reference-compiled``: ``torch.compile`` of the reference (the dispatcher with
  ``backend="reference"``), compiled afresh for each measurement so that every (N, D,
  dtype) gets its own static-shape graph; the compile happens in the untimed warm-up.
  Where torch.compile fails (no C++ compiler for the CPU, no Triton for the GPU) the
  runner prints a note and skips it.
- ``openclip``: OpenCLIP's own ``ClipLoss`` / ``SigLipLoss`` (the dense N x N loss users
  replace), loaded from ``open_clip/loss.py`` by file path (``import open_clip`` needs
  torchvision), where open-clip-torch is installed (``pip install --no-deps``).
- ``inf-cl``: Inf-CL's ``cal_inf_loss`` (CLIP only, GPU only, when ``inf_cl`` imports).
  ``cal_inf_loss(q, k, scale=...)`` is the row-only InfoNCE: cross-entropy of each row
  of ``scale * q k^T`` against its diagonal. The CLIP loss averages the row and the
  column direction, so the row runs it twice, ``(cal_inf_loss(a, b) + cal_inf_loss(b,
  a)) / 2``: the same loss, the same inputs and the same flop count as every other CLIP
  row, which makes its time, peak memory and TFLOP/s comparable.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Optional

import torch

from .measure import Call, backend_call

COMPILED = "reference-compiled"
INF_CL = "inf-cl"
OPENCLIP = "openclip"


def _openclip_loss_module():
    """open_clip/loss.py loaded on its own (None where open-clip-torch is not installed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    if not path.is_file():
        return None
    file_spec = importlib.util.spec_from_file_location("_bench_open_clip_loss", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def openclip_unavailable(objective: str) -> Optional[str]:
    """None if OpenCLIP's loss can run for ``objective``, else why not."""
    if objective not in ("clip", "siglip"):
        return "OpenCLIP has CLIP and SigLIP losses only"
    try:
        module = _openclip_loss_module()
    except Exception as e:  # a broken install: say so
        return f"open_clip/loss.py does not load ({type(e).__name__}: {e})"
    if module is None:
        return "open-clip-torch is not installed (pip install --no-deps open-clip-torch)"
    return None


def openclip_call(objective: str) -> Call:
    """OpenCLIP's ClipLoss or SigLipLoss (bias -10, as the benchmark's SigLIP case)."""
    module = _openclip_loss_module()
    if objective == "clip":
        loss = module.ClipLoss()
        return lambda xs, scale: loss(xs[0], xs[1], scale)
    loss = module.SigLipLoss()
    bias = None

    def siglip(xs, scale):
        nonlocal bias
        if bias is None:
            bias = torch.tensor(-10.0, device=xs[0].device, dtype=scale.dtype)
        return loss(xs[0], xs[1], scale, bias)

    return siglip


def compiled_reference(objective: str) -> Call:
    """A fresh torch.compile of the reference for ``objective``."""
    torch._dynamo.reset()  # a new graph per measurement: no recompile limit, no stale guards
    # Compile in this process: a pool of compile workers would keep the CPU busy while
    # later rows are timed.
    torch._inductor.config.compile_threads = 1
    # Inductor's own deprecation notices (torch._prims_common.check, seen with torch 2.13)
    # would print between the table's rows at each compile: not this library's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
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
    """The callable for baseline ``name`` (COMPILED, OPENCLIP or INF_CL)."""
    if name == COMPILED:
        return compiled_reference(objective)
    if name == OPENCLIP:
        return openclip_call(objective)
    return inf_cl_clip()
