"""DESIGN.md's verification rule and the helpers the backend tests share.

error(kernel) <= 2 * error(same-dtype reference) + atol, errors measured against the
float64 reference, per output (loss and each gradient), atol scaled by the output's size
(the rule itself: ``flashcontrast.bench.rule``).
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from cuda_emulator import SKIP_REASON as EMULATOR_SKIP
from flashcontrast.backends.triton import triton_unavailable_reason
from flashcontrast.bench.rule import check_rule

# Why the Triton backend cannot run on CPU tensors here (None: it can, in the interpreter).
TRITON_SKIP = triton_unavailable_reason(torch.device("cpu"))
TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
)
# The CUDA backend on CPU tensors: csrc/ built for the CPU (tests/cuda_emulator); the
# conftest fixture `_emulated_cuda_backend` swaps it in for every test given backend="cuda".
CUDA_EMULATED = pytest.param(
    "cuda",
    marks=[
        pytest.mark.emulator,
        pytest.mark.skipif(EMULATOR_SKIP is not None, reason=str(EMULATOR_SKIP)),
    ],
)
# The kernel backends every objective's tests run on the CPU.
BACKENDS = ["torch", TRITON, CUDA_EMULATED]


def assert_by_rule(
    names: Sequence[str],
    kernel: Sequence[torch.Tensor],
    same_dtype_ref: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Check each output of a kernel against the float64 oracle by the rule
    (``flashcontrast.bench.rule``, which the GPU report's smoke records too)."""
    for result in check_rule(names, kernel, same_dtype_ref, exact, dtype):
        assert result.ok, result.describe()


def pair_inputs(n: int, d: int, dtype: torch.dtype, normalize: bool = True):
    """Two (N, D) feature matrices, row-normalized unless asked otherwise."""
    a, b = torch.randn(n, d), torch.randn(n, d)
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(dtype), b.to(dtype)


def pair_loss_and_grads(fn, a, b, scale, bias, grad_out, acc=None):
    """Loss and gradients of fn(a, b, scale, bias) w.r.t. features, scale and bias (bias
    skipped when None), in ``acc`` (default: a's dtype), for upstream gradient grad_out."""
    a = a.detach().to(acc or a.dtype).requires_grad_()
    b = b.detach().to(acc or b.dtype).requires_grad_()
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    bb = None if bias is None else torch.tensor(bias, dtype=dt, requires_grad=True)
    loss = fn(a, b, s, bb)
    inputs = [a, b, s] + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(loss * grad_out, inputs)
    return [loss.detach(), *grads]
