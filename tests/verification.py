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
# The backends the pair engine's contract tests run (backends/pair.py): each kernel
# backend joins when its pair_forward / pair_backward exist.
TRITON_ENGINE: list = []
CUDA_ENGINE: list = [CUDA_EMULATED]
ENGINE_BACKENDS = ["torch", *TRITON_ENGINE, *CUDA_ENGINE]


def assert_by_rule(
    names: Sequence[str],
    kernel: Sequence[torch.Tensor],
    same_dtype_ref: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    dtype: torch.dtype,
    allowance: Sequence[float] | None = None,
) -> None:
    """Check each output of a kernel against the float64 oracle by the rule
    (``flashcontrast.bench.rule``, which the GPU report's smoke records too).

    ``allowance`` (one absolute error per output, or None): error the kernel's contract owes
    on top of the same-dtype reference's, derived from the inputs (see
    clip_lse_rounding_allowance); it widens the bound by 2 x allowance, as the rule's 2x
    does the reference error."""
    extra = allowance if allowance is not None else [0.0] * len(names)
    for result, more in zip(check_rule(names, kernel, same_dtype_ref, exact, dtype), extra):
        if more == 0.0:
            assert result.ok, result.describe()
            continue
        bound = result.bound + 2 * more
        assert result.finite and result.kernel_error <= bound, (
            f"{result.describe()} + 2 x LSE-rounding allowance {more:.3e} (bound {bound:.3e})"
        )


def clip_lse_rounding_allowance(a, b, scale, bias, grad_out) -> dict[str, float]:
    """Gradient error the CLIP contract's float32 LSEs imply, per gradient (da, db, dscale,
    dbias), for the loss grad_out * L on features a, b (computed in float64).

    The backward forms P = exp(S - lse) from the saved row and column LSEs rounded to
    float32: each P_ij is off relatively by up to |lse| 2^-24, which the dense reference
    (softmax of its own S, the row maximum subtracted exactly) does not have. With
    dS = grad_out / (2N) (P_row + P_col - 2I) that is |d dS_ij| <= c (P_row_ij |row_i| +
    P_col_ij |col_j|) 2^-24, c = |grad_out| / (2N), carried through da = s dS b,
    db = s dS^T a, dscale = sum dS * (a b^T), dbias = sum dS. It matters at extreme scales
    only: at s = 1e4, |lse| ~ 1e4 makes it ~6e-4 relative in P, where the reference's P
    (and so its error) can be far more accurate; at s <= 100 it is below the rule's atol.
    """
    a, b = a.detach().double(), b.detach().double()
    s = float(scale)
    x = a @ b.T
    z = s * x + (0.0 if bias is None else float(bias))
    row, col = z.logsumexp(1), z.logsumexp(0)
    c = abs(float(grad_out)) / (2 * a.shape[0])
    p_row, p_col = torch.exp(z - row[:, None]), torch.exp(z - col[None, :])
    err = c * (p_row * row.abs()[:, None] + p_col * col.abs()[None, :]) * 2.0**-24
    return {
        "da": abs(s) * (err @ b.abs()).max().item(),
        "db": abs(s) * (err.T @ a.abs()).max().item(),
        "dscale": (err * x.abs()).sum().item(),
        "dbias": err.sum().item(),
    }


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
