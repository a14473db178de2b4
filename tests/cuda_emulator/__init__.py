"""csrc/'s CUDA kernels built for the CPU, so that the CUDA backend's tests run without a GPU.

See README.md here for what the emulation checks and what only a GPU can. Tests reach it
through the ``kernel_target`` fixture (tests/conftest.py); :func:`install` is that
fixture's half that swaps the extension module in.
"""

from __future__ import annotations

import functools
import os
import zlib
from types import ModuleType

import pytest

from . import build

#: None when the emulator tests run here, else why not (their skip reason).
SKIP_REASON: str | None = (
    "FLASHCONTRAST_SKIP_EMULATOR=1"
    if os.environ.get("FLASHCONTRAST_SKIP_EMULATOR") == "1"
    else build.unavailable_reason()
)


@functools.cache
def module() -> ModuleType:
    """The emulated ``flashcontrast._C``, built once per session (cached on disk)."""
    return build.load()


def install(monkeypatch: pytest.MonkeyPatch, test_id: str) -> None:
    """Route ``backend="cuda"`` to the emulated ``_C`` for the rest of the test: CPU tensors
    are accepted as its device memory. Unless FC_EMU_SCHEDULE is set, threads and blocks
    run in a random order seeded by ``test_id``: each test sees another interleaving, and
    the same one on every run."""
    from flashcontrast import _dispatch
    from flashcontrast.backends import cuda as cuda_backend

    if not os.environ.get("FC_EMU_SCHEDULE"):
        monkeypatch.setenv("FC_EMU_SCHEDULE", f"shuffle:{zlib.crc32(test_id.encode())}")

    emulated = module()
    objectives = cuda_backend.objectives_of(emulated)
    monkeypatch.setattr(cuda_backend, "_C", emulated)
    monkeypatch.setattr(cuda_backend, "OBJECTIVES", objectives)
    monkeypatch.setattr(_dispatch, "CUDA_OBJECTIVES", _dispatch.cuda_objectives(objectives))
