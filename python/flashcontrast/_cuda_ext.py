"""The optional compiled extension ``flashcontrast._C``, imported without ever failing.

The wheel carries ``_C`` (AOT-compiled CUDA kernels, static cudart, no libtorch) when it
was built where nvcc was found; a build with ``FLASHCONTRAST_SKIP_CUDA_BUILD=1`` or without
nvcc installs the pure-Python package only. Everything else in the package asks this
module rather than importing ``_C`` itself:

- :data:`HAS_C`: whether ``_C`` imported.
- :data:`C_UNAVAILABLE_REASON`: why not (``None`` when it did).
- :func:`runtime_info`: versions, device count and compiled archs, for bug reports.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_C: ModuleType | None
C_UNAVAILABLE_REASON: str | None

try:
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as exc:
    _C = None
    if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C":
        C_UNAVAILABLE_REASON = (
            "flashcontrast was installed without the CUDA extension "
            "(FLASHCONTRAST_SKIP_CUDA_BUILD=1 or no nvcc at build time)"
        )
    else:  # present but not loadable: another Python's build, too old a glibc, ...
        C_UNAVAILABLE_REASON = f"flashcontrast._C is present but failed to load: {exc}"
else:
    C_UNAVAILABLE_REASON = None

HAS_C: bool = _C is not None


def _version_string(version: int) -> str:
    """13020 -> "13.2" (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def runtime_info() -> dict[str, Any]:
    """Describe the compiled extension and the CUDA runtime/driver it sees.

    Never raises. With ``_C``: ``{"has_c": True, "cuda_runtime_version": 13000,
    "cuda_runtime": "13.0", "cuda_driver_version": 0 (no driver) or e.g. 13000,
    "cuda_driver": "13.0" or None, "device_count": 0, "compiled_archs": [80, 90]}``.
    Without: ``{"has_c": False, "reason": C_UNAVAILABLE_REASON}``.
    """
    if _C is None:
        return {"has_c": False, "reason": C_UNAVAILABLE_REASON}
    info: dict[str, Any] = {"has_c": True}
    try:
        runtime = _C.cuda_runtime_version()
        driver = _C.cuda_driver_version()
        info.update(
            cuda_runtime_version=runtime,
            cuda_runtime=_version_string(runtime),
            cuda_driver_version=driver,
            cuda_driver=_version_string(driver) if driver else None,
            device_count=_C.cuda_device_count(),
            compiled_archs=list(_C.compiled_archs()),
        )
    except RuntimeError as exc:  # a broken driver install: report it rather than raise
        info["error"] = str(exc)
    return info


__all__ = ["C_UNAVAILABLE_REASON", "HAS_C", "runtime_info"]
