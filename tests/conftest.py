"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is decided here,
before the tests import flashcontrast: without a CUDA device the Triton kernels run in the
interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`) every worker is a process of its own: the
# cores are shared out among them, so that torch's intra-op threads do not oversubscribe
# the machine (most tests are single-threaded Python: the Triton interpreter, the emulator).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402

from cuda_emulator import SKIP_REASON as EMULATOR_SKIP  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is visible")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- CUDA kernels
# The CUDA backend's kernel tests (tests/test_cuda_*.py) run twice: on a GPU ("gpu", marked
# `gpu`, skipped without one) and on csrc/ built for the CPU ("emulator",
# tests/cuda_emulator; marked `emulator`, skipped where it cannot be built). The fixture
# sets the test module's DEVICE to where that target's tensors live.


def _gpu_skip_reason() -> str | None:
    from flashcontrast import _cuda_ext

    if not _cuda_ext.HAS_C:
        return f"flashcontrast._C is not built: {_cuda_ext.C_UNAVAILABLE_REASON}"
    if not HAS_CUDA:
        return "needs a CUDA device; torch.cuda sees none"
    return None


_GPU_SKIP = _gpu_skip_reason()
KERNEL_TARGETS = [
    pytest.param(
        "gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(bool(_GPU_SKIP), reason=str(_GPU_SKIP))]
    ),
    pytest.param(
        "emulator",
        marks=[
            pytest.mark.emulator,
            pytest.mark.skipif(bool(EMULATOR_SKIP), reason=str(EMULATOR_SKIP)),
        ],
    ),
]


@pytest.fixture(params=KERNEL_TARGETS)
def kernel_target(request, monkeypatch) -> str:
    """'gpu' or 'emulator'; the requesting module's DEVICE becomes 'cuda' or 'cpu'."""
    if request.param == "emulator":
        import cuda_emulator

        cuda_emulator.install(monkeypatch, request.node.nodeid)
    monkeypatch.setattr(request.module, "DEVICE", "cuda" if request.param == "gpu" else "cpu")
    return request.param


@pytest.fixture(autouse=True)
def _emulated_cuda_backend(request, monkeypatch):
    """Objective tests parametrized with backend="cuda" (verification.BACKENDS) build their
    inputs on the CPU: they run the CUDA backend on the emulator."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda":
        import cuda_emulator

        cuda_emulator.install(monkeypatch, request.node.nodeid)
