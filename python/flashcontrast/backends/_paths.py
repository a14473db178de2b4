"""Which path a kernel backend's pair engine takes: the environment variables and their
reading, shared by the Triton (``triton/pair.py``) and CUDA (``cuda.py``) backends.

"fused": the backend's tile kernels form the products and the epilogue in one kernel;
"panel": cuBLAS GEMMs per panel of rows, the tile kernels as epilogues reading the GEMM's
output (``_panel.py``); "auto" (the default): the backend decides per shape.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

__all__ = [
    "CUDA_PATH",
    "FORCED_PATHS",
    "PATHS",
    "TRITON_PATH",
    "chosen",
    "forced",
    "forced_as",
    "path_for",
]

TRITON_PATH = "FLASHCONTRAST_TRITON_PATH"
CUDA_PATH = "FLASHCONTRAST_CUDA_PATH"
PATHS = ("auto", "fused", "panel")
#: A kernel backend with its pair path forced, as the GPU report names it ("triton-fused",
#: "cuda-panel", ...): name -> (the backend, the variable picking its path, the path).
FORCED_PATHS = {
    f"{backend}-{path}": (backend, variable, path)
    for backend, variable in (("triton", TRITON_PATH), ("cuda", CUDA_PATH))
    for path in ("fused", "panel")
}


def chosen(variable: str) -> str:
    """The path ``variable`` asks for ("auto" when unset); ValueError for anything else."""
    choice = os.environ.get(variable, "auto")
    if choice not in PATHS:
        raise ValueError(f"{variable}={choice!r}: expected one of {', '.join(PATHS)}")
    return choice


def path_for(variable: str, device: torch.device, auto: Callable[[], str]) -> str:
    """ "fused" or "panel" for a sweep on ``device``: what ``variable`` asks for; for "auto",
    ``auto()`` on CUDA devices and "fused" elsewhere (the interpreter, the emulator)."""
    choice = chosen(variable)
    if choice != "auto":
        return choice
    return auto() if device.type == "cuda" else "fused"


@contextlib.contextmanager
def forced(variable: str, path: Optional[str]) -> Iterator[None]:
    """``variable`` set to ``path`` inside the block (None: left as it is), then restored.
    Cover forward and backward alike: the backward routes when it runs."""
    if path is None:
        yield
        return
    old = os.environ.get(variable)
    os.environ[variable] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = old


@contextlib.contextmanager
def forced_as(name: str) -> Iterator[str]:
    """The backend of implementation ``name`` (a :data:`FORCED_PATHS` name, or any other
    name as it is), with its forced path in effect inside the block."""
    backend, variable, path = FORCED_PATHS.get(name, (name, "", None))
    with forced(variable, path):
        yield backend
