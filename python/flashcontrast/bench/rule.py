"""The verification rule (docs/verification.md), as a function: the tests assert it, the
GPU report's correctness smoke records it.

For each output (the loss and every gradient), with errors measured against the float64
oracle: error(kernel) <= 2 * error(same-dtype reference) + atol, atol = ATOL[dtype] x
(1 + max |exact|), widened by 2 x an output's rounding allowance where one is derived
(tests/verification.py). A non-finite kernel output fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@dataclass
class RuleResult:
    """One output's verdict: its name, the two errors and the bound they met or not."""

    name: str
    kernel_error: float
    reference_error: float
    atol: float
    finite: bool
    allowance: float = 0.0  # error a correct kernel may owe beyond the reference's

    @property
    def bound(self) -> float:
        return 2 * self.reference_error + self.atol + 2 * self.allowance

    @property
    def ok(self) -> bool:
        return self.finite and self.kernel_error <= self.bound

    @property
    def ratio(self) -> float:
        """kernel error over the bound: <= 1 passes."""
        return float("inf") if not self.finite else self.kernel_error / self.bound

    def describe(self) -> str:
        if not self.finite:
            return f"{self.name}: non-finite values in the kernel output"
        return (
            f"{self.name}: kernel error {self.kernel_error:.3e} "
            f"{'<=' if self.ok else '>'} 2 x reference error {self.reference_error:.3e} "
            f"+ {self.atol:.1e}"
            + (f" + 2 x allowance {self.allowance:.3e}" if self.allowance else "")
        )


def max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item()


def check_rule(
    names: Sequence[str],
    kernel: Sequence[torch.Tensor],
    same_dtype_ref: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    dtype: torch.dtype,
    allowance: Sequence[float] | None = None,
) -> list[RuleResult]:
    """The rule's verdict for each output (host syncs: for tests and reports only).

    ``allowance`` (one absolute error per output, or None): error a correct kernel may owe
    beyond 2 x the same-dtype reference's, derived from the inputs' conditioning (see
    tests/verification.py's clip_lse_rounding_allowance, gram_det_rounding_allowance); it
    widens the bound by 2 x allowance, as the rule's 2x does the reference error."""
    extra = allowance if allowance is not None else [0.0] * len(names)
    out = []
    for name, k, r, e, more in zip(names, kernel, same_dtype_ref, exact, extra):
        finite = bool(torch.isfinite(k).all())
        atol = ATOL[dtype] * (1.0 + e.abs().max().item())
        k_err = max_error(k, e) if finite else float("inf")
        out.append(RuleResult(name, k_err, max_error(r, e), atol, finite, more))
    return out
