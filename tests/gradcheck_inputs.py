"""Float64 leaves for torch.autograd.gradcheck of the two-tower losses (CLIP, SigLIP, CLIP
with groups): drawn from the global generator (tests/conftest.py seeds it per test)."""

from __future__ import annotations

import torch


def pair_leaves(n: int, d: int, scale: float = 2.5, bias: float = -0.3) -> tuple:
    """(a (n, d), b (n, d), scale (), bias ()), float64, each requiring grad."""
    a = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    bias_t = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return a, b, s, bias_t
