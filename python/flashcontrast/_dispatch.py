"""Backend selection: which implementation runs for given tensors, and why.

``backend="auto"`` picks, for tensors on a CUDA device: "cuda" when the compiled extension
has the objective's kernels and they have been verified on a GPU, then "triton" when
Triton can run, then "torch". For CPU tensors it picks "torch": the Triton interpreter is
for testing, not speed. Explicitly requested backends that cannot run raise a RuntimeError
that says why.

The choice is visible: :func:`backend_for` answers without running anything, the debug
log of the ``flashcontrast`` logger names each choice, and :func:`last_backend` returns
the backend of the most recent eager call.

Selection traces under ``torch.compile(fullgraph=True)``: it reads module constants and
asks the backends' availability checks, which Dynamo runs for real at trace time and
keeps as constants (``backends/triton/__init__.py``), so the choice is made once, when the
graph is traced, and the graph carries the chosen name to the ops.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .backends import cuda as cuda_backend
from .backends.triton import triton_unavailable_reason

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")

# Objectives each compiled or JIT backend implements today; "torch" and "reference"
# implement every objective that has a public function.
CUDA_OBJECTIVES: frozenset = cuda_backend.OBJECTIVES
# CUDA kernels "auto" may pick. A kernel joins only after its tests have passed on a GPU:
# until then it runs when asked for by name (backend="cuda") and "auto" skips it, so an
# unverified kernel never computes a user's loss unasked. The CLIP kernels compile for
# every target but have not yet run on a GPU (see the CUDA backend issue).
CUDA_AUTO_OBJECTIVES: frozenset = frozenset()
TRITON_OBJECTIVES = frozenset({"clip", "gram", "multiview", "siglip", "symile"})
TORCH_OBJECTIVES = frozenset({"clip", "gram", "multiview", "siglip", "symile"})

_log = logging.getLogger("flashcontrast")
_last: Optional[str] = None


def _unavailable(backend: str, objective: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run ``objective`` on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "torch":
        return None if objective in TORCH_OBJECTIVES else f"no torch kernels for {objective}"
    if backend == "triton":
        if objective not in TRITON_OBJECTIVES:
            return f"the Triton backend has no {objective} kernels yet"
        return triton_unavailable_reason(device)
    if backend == "cuda":
        reason = cuda_backend.unavailable_reason(device)
        if reason is None and objective not in CUDA_OBJECTIVES:
            reason = f"the CUDA backend has no {objective} kernels yet (planned)"
        return reason
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def backend_for(objective: str, device: torch.device | str, backend: str = "auto") -> str:
    """The backend that ``backend`` resolves to for ``objective`` on ``device``.

    Raises ValueError for an unknown backend name and RuntimeError, with the reason, for
    an explicit backend that cannot run there.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _unavailable(backend, objective, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {objective} on {device}: {reason}")
        return backend
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)
    for candidate in order:
        if candidate == "cuda" and objective not in CUDA_AUTO_OBJECTIVES:
            continue
        if _unavailable(candidate, objective, device) is None:
            return candidate
    return "reference"


def resolve(objective: str, device: torch.device, backend: str) -> str:
    """:func:`backend_for`, recorded for :func:`last_backend` and the debug log."""
    chosen = backend_for(objective, device, backend)
    if not torch.compiler.is_compiling():
        global _last
        _last = chosen
        _log.debug(
            "flashcontrast.%s: backend=%r resolved to %r on %s", objective, backend, chosen, device
        )
    return chosen


def last_backend() -> Optional[str]:
    """The backend that ran the most recent eager (not compiled) flashcontrast call."""
    return _last
