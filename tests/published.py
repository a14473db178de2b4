"""The published code the reference and the compat classes are compared with, and the
comparison itself: values and gradients of the same leaves, in float64.

OpenCLIP's open_clip/loss.py is loaded by file path (``import open_clip`` needs
torchvision; loss.py imports only torch); a missing package skips the test with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Callable, Sequence

import pytest
import torch


def close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-10, atol=1e-12) -> None:
    """assert_close at float64 tolerances (any shape)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def loss_and_grads(
    fn: Callable[..., torch.Tensor], leaves: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``fn(*clones)`` on fresh leaf clones; return (scalar loss, grads of every leaf,
    each of its leaf's shape)."""
    clones = [x.detach().clone().requires_grad_(True) for x in leaves]
    loss = fn(*clones)
    grads = torch.autograd.grad(loss, clones)
    return loss.detach(), grads


def load_open_clip_loss(module_name: str) -> ModuleType:
    """open_clip/loss.py executed on its own as ``module_name``; skips where it is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (pip install open-clip-torch --no-deps)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "loss.py")
    if not os.path.isfile(path):
        pytest.skip(f"open_clip is installed but has no loss.py at {path}")
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module
