"""The Triton backend: JIT kernels, the pair engine (``pair.py``) and the kernels that
stay outside it (``gram.py``, ``symile.py``: Symile "n_squared").

This package imports without Triton installed: nothing here imports ``triton`` at module
level, so ``flashcontrast`` can always answer *why* the backend cannot run. The kernel
modules (``from flashcontrast.backends.triton import pair``) do import Triton and must
only be imported once :func:`triton_unavailable_reason` has returned None.

Triton compiles for CUDA (and ROCm) devices. On CPU tensors it runs only in its
interpreter, which Triton decides when a kernel is *defined*: ``TRITON_INTERPRET=1`` has
to be in the environment before the kernel modules are imported.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from .. import _paths

__all__ = [
    "PATH_VARIABLE",
    "forced_path",
    "interpreting",
    "triton_available",
    "triton_unavailable_reason",
]

#: The environment variable that picks the pair engine's path on this backend: "auto"
#: (default), "fused" or "panel" (``pair.py``, ``sweep_path``; ``backends/_paths.py``).
PATH_VARIABLE = _paths.TRITON_PATH


def forced_path(path: Optional[str]):
    """A context in which this backend's pair engine takes ``path`` (None: as configured)."""
    return _paths.forced(PATH_VARIABLE, path)


@functools.cache
def _import_error() -> Optional[str]:
    """Why ``triton`` does not import (None: it does); tried once per process."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    return _import_error() is None


def interpreting() -> bool:
    """True when Triton kernels defined from now on run in the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when the Triton kernels can run on tensors of ``device``, else why not."""
    return _unavailable_reason(torch.device(device).type)


# Backend selection asks this while torch.compile traces the losses, and Dynamo refuses to
# trace the import attempt (importlib) or the functools.cache around it. The answer is a
# fact of the process (is Triton importable, is the interpreter on, which device type), so
# Dynamo is told to call the function for real, at trace time, and to bake its result
# (a str or None) into the graph as a constant. Eager calls run it normally: the
# environment is read on every call, the import is tried once.
@torch.compiler.assume_constant_result
def _unavailable_reason(device_type: str) -> Optional[str]:
    error = _import_error()
    if error is not None:
        return f"Triton is not importable ({error}); install it with `pip install triton`"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting():
            return None
        return (
            "Triton runs on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
            "before importing flashcontrast"
        )
    return (
        f"the Triton backend runs on CUDA devices (or on CPU in the interpreter), not {device_type}"
    )
