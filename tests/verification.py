"""DESIGN.md's verification rule, shared by the backend tests.

error(kernel) <= 2 * error(same-dtype reference) + atol, errors measured against the
float64 reference, per output (loss and each gradient), atol scaled by the output's size.
"""

from __future__ import annotations

from typing import Sequence

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item()


def assert_by_rule(
    names: Sequence[str],
    kernel: Sequence[torch.Tensor],
    same_dtype_ref: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Check each output of a kernel against the float64 oracle by the rule."""
    for name, k, r, e in zip(names, kernel, same_dtype_ref, exact):
        assert torch.isfinite(k).all(), f"{name}: non-finite values in the kernel output"
        atol = ATOL[dtype] * (1.0 + e.abs().max().item())
        k_err, r_err = max_error(k, e), max_error(r, e)
        assert k_err <= 2 * r_err + atol, (
            f"{name}: kernel error {k_err:.3e} > 2 x reference error {r_err:.3e} + {atol:.1e}"
        )
