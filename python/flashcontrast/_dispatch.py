"""Backend selection: which implementation runs for given tensors, and why.

``backend="auto"`` picks, for tensors on a CUDA device, the first of "cuda", "triton" that
can run the objective in the inputs' dtype AND has passed on a GPU of this class (the
verification record, ``_verified.py``: a kernel that has never run on a GPU never computes
a user's loss unasked), else "torch". For CPU tensors it picks "torch": the Triton
interpreter is for testing, not speed. Explicitly requested backends that cannot run raise
a RuntimeError that says why; explicit "triton" or "cuda" run whether verified or not.

The choice is visible: :func:`backend_for` answers without running anything,
:func:`explain_backend` also says why each candidate was or was not taken, the debug log of
the ``flashcontrast`` logger names each choice with that reason, and :func:`last_backend`
returns the backend of the most recent eager call.

Selection traces under ``torch.compile(fullgraph=True)``: it reads module constants and
asks the backends' availability checks, which Dynamo runs for real at trace time and
keeps as constants (``backends/triton/__init__.py``, ``_verified.py``), so the choice is
made once, when the graph is traced, and the graph carries the chosen name to the ops.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _verified
from .backends import cuda as cuda_backend
from .backends.triton import triton_unavailable_reason

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")

# Objectives each compiled or JIT backend implements today; "torch" and "reference"
# implement every objective that has a public function.
#: Objectives that are epilogues of the pair engine and need no kernel of their own.
ENGINE_OBJECTIVES = frozenset({"clip", "infonce", "multiview", "siglip", "supcon", "uniformity"})
TRITON_OBJECTIVES = ENGINE_OBJECTIVES | {"gram", "symile"}
TORCH_OBJECTIVES = ENGINE_OBJECTIVES | {"gram", "symile"}


def cuda_objectives(kernels: frozenset) -> frozenset:
    """The objectives a build of ``_C`` runs, from the kernel sets it has
    (``backends.cuda.objectives_of``): with the pair engine, its epilogues too."""
    return kernels | (ENGINE_OBJECTIVES if "pair" in kernels else frozenset())


CUDA_OBJECTIVES: frozenset = cuda_objectives(cuda_backend.OBJECTIVES)
# The feature dtypes each kernel backend takes (float64 runs on "torch" and "reference").
KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

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


#: Call variants only some backends implement: variant -> (the backends that do, what it is).
VARIANTS = {
    "symile_n_squared_many": (
        frozenset({"torch", "reference"}),
        "Symile negative_sampling='n_squared' with M > 3 modalities (the n_squared kernels "
        "cover M = 3; the blockwise torch backend any M, in bounded memory)",
    ),
    "gram_many_others": (
        frozenset({"torch", "reference"}),
        "GRAM with more than 6 modalities (the Triton and CUDA kernels hold K = M - 1 <= 5 "
        "others' tiles per program)",
    ),
    "symile_n_squared_rectangular": (
        frozenset({"torch", "triton", "cuda", "reference"}),
        "Symile negative_sampling='n_squared' with n rows against m != n columns (a "
        "process group's rank-local part)",
    ),
}


def _dtype_gap(candidate: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why ``candidate`` cannot take features of ``dtype`` (None: it can)."""
    if candidate in ("triton", "cuda") and dtype is not None and dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 and bfloat16, not {dtype}"
    return None


def _variant_gap(candidate: str, variant: Optional[str]) -> Optional[str]:
    """Why ``candidate`` cannot run the call variant (None: it can)."""
    if variant is None:
        return None
    if variant not in VARIANTS:
        raise ValueError(f"unknown call variant {variant!r}; known: {sorted(VARIANTS)}")
    able, what = VARIANTS[variant]
    if candidate not in able:
        return f"it has no kernels for {what}; use backend={' or '.join(map(repr, sorted(able)))}"
    return None


def _auto_skip(
    candidate: str,
    objective: str,
    device: torch.device,
    dtype: Optional[torch.dtype],
    variant: Optional[str] = None,
) -> Optional[str]:
    """Why "auto" does not take ``candidate`` (None: it does)."""
    reason = _unavailable(candidate, objective, device)
    if reason is None:
        reason = _variant_gap(candidate, variant) or _dtype_gap(candidate, dtype)
    if reason is not None or candidate in ("torch", "reference"):
        return reason
    checked = torch.float32 if dtype is None else dtype
    if not _verified.is_verified(device, objective, candidate, checked):
        cls = _verified.device_class(device)
        name = str(checked).replace("torch.", "")
        return (
            f"not yet verified on a {cls} GPU for {objective} in {name} (no GPU report has "
            "passed it: flashcontrast/verified_gpu.json); backend="
            + repr(candidate)
            + " runs it anyway"
        )
    return None


def explain_backend(
    objective: str,
    device: torch.device | str,
    backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
) -> tuple[str, str]:
    """(the backend ``backend`` resolves to, why): the reasons each better candidate was
    passed over, for ``objective`` on ``device`` with features of ``dtype`` (None: the
    dtype is not known; "auto" then asks the record about float32) and the call
    ``variant`` (a key of :data:`VARIANTS`, or None), so that "auto" never picks a
    backend that cannot run the call.

    Raises ValueError for an unknown backend name, and, for an explicit backend that
    cannot run the call, TypeError (the features' dtype) or RuntimeError (anything else)
    with the reason.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _unavailable(backend, objective, device) or _variant_gap(backend, variant)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {objective} on {device}: {reason}")
        gap = _dtype_gap(backend, dtype)
        if gap is not None:
            raise TypeError(f"backend={backend!r} cannot run {objective}: {gap}")
        return backend, "asked for by name"
    if device.type != "cuda":
        reason = _variant_gap("torch", variant) or _unavailable("torch", objective, device)
        if reason is None:
            return "torch", f"{device.type} tensors: the blockwise torch backend"
        return "reference", f"{device.type} tensors; not torch: {reason}"
    passed = []
    for candidate in ("cuda", "triton", "torch"):
        skip = _auto_skip(candidate, objective, device, dtype, variant)
        if skip is None:
            took = (
                "torch: blockwise PyTorch, correct on every device"
                if candidate == "torch"
                else f"{candidate}: passed a GPU report on {_verified.device_class(device)}"
            )
            return candidate, "; ".join([*passed, took])
        passed.append(f"not {candidate}: {skip}")
    return "reference", "; ".join(passed)


def backend_for(
    objective: str,
    device: torch.device | str,
    backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
) -> str:
    """The backend that ``backend`` resolves to for ``objective`` on ``device`` (features
    of ``dtype``, when known; :func:`explain_backend` says why).

    Raises ValueError for an unknown backend name and RuntimeError, with the reason, for
    an explicit backend that cannot run there.
    """
    return explain_backend(objective, device, backend, dtype, variant)[0]


def resolve(
    objective: str,
    device: torch.device,
    backend: str,
    dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
) -> str:
    """:func:`backend_for`, recorded for :func:`last_backend` and the debug log (with the
    reason)."""
    chosen, why = explain_backend(objective, device, backend, dtype, variant)
    if not torch.compiler.is_compiling():
        global _last
        _last = chosen
        _log.debug(
            "flashcontrast.%s: backend=%r resolved to %r on %s (%s)",
            objective, backend, chosen, device, why,
        )  # fmt: skip
    return chosen


def last_backend() -> Optional[str]:
    """The backend that ran the most recent eager (not compiled) flashcontrast call."""
    return _last
