"""Property-based tests of the CUDA backend through the public API, on the CPU emulator
(tests/cuda_emulator): hypothesis draws sizes, dtypes, scales, biases, groups and upstream
gradients, and each draw is checked against the float64 reference by the verification rule
(docs/verification.md), with the same checks the objectives' own test files use.

Derandomized (the same 25 examples per test on every run), so CI stays deterministic and
short. To explore further: FLASHCONTRAST_FUZZ_EXAMPLES=500 draws that many random examples
per test (a different set each run).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_emulator
from test_clip import _check as check_clip
from test_clip_groups import _check as check_clip_groups
from test_gram import _check as check_gram
from test_multiview import _check as check_multiview
from test_siglip import _check as check_siglip
from test_symile import _check as check_symile

pytestmark = [
    pytest.mark.emulator,
    pytest.mark.skipif(
        cuda_emulator.SKIP_REASON is not None, reason=str(cuda_emulator.SKIP_REASON)
    ),
]

_EXPLORE = int(os.environ.get("FLASHCONTRAST_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 25, deadline=None, derandomize=not _EXPLORE, database=None)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SCALES = st.floats(1.0, 100.0)
GRADS = st.floats(-2.0, 2.0).filter(lambda g: abs(g) > 0.05)


def _on_emulator(check, *args, **kwargs):
    """Run one check with backend="cuda" routed to the emulator, then restore."""
    with pytest.MonkeyPatch.context() as mp:
        cuda_emulator.install(mp, "fuzz")
        torch.manual_seed(0)
        check(*args, **kwargs)


@FUZZ
@given(
    n=st.integers(1, 150), d=st.integers(1, 70), dtype=DTYPES, scale=SCALES,
    bias=st.none() | st.floats(-5.0, 5.0), grad_out=GRADS,
)  # fmt: skip
def test_clip(n, d, dtype, scale, bias, grad_out):
    _on_emulator(check_clip, "cuda", n, d, dtype, scale, bias, grad_out)


@FUZZ
@given(
    n=st.integers(2, 150), d=st.integers(1, 70),
    kind=st.sampled_from(["distinct", "same", "dups", "pairs"]),
    scale=SCALES, grad_out=GRADS,
)  # fmt: skip
def test_clip_groups(n, d, kind, scale, grad_out):
    _on_emulator(check_clip_groups, "cuda", n, d, kind, scale=scale, grad_out=grad_out)


@FUZZ
@given(
    n=st.integers(1, 150), d=st.integers(1, 70), dtype=DTYPES, scale=SCALES,
    bias=st.floats(-12.0, 5.0), grad_out=GRADS,
)  # fmt: skip
def test_siglip(n, d, dtype, scale, bias, grad_out):
    _on_emulator(check_siglip, "cuda", n, d, dtype, scale, bias, grad_out)


@FUZZ
@given(
    kind=st.sampled_from(["infonce", "dhel"]), v=st.integers(2, 8), n=st.integers(2, 60),
    d=st.integers(1, 40), tau=st.floats(0.01, 1.0), with_groups=st.booleans(),
    grad_out=GRADS,
)  # fmt: skip
def test_multiview(kind, v, n, d, tau, with_groups, grad_out):
    groups = None
    if with_groups:
        groups = torch.randint(0, max(1, n // 2), (n,))
        # Two ids at least: one group holding every sample leaves MV-DHEL rows without a
        # negative, whose loss is -inf by definition (objectives/multiview.py).
        groups[-1] = groups.max() + 1
    _on_emulator(check_multiview, kind, "cuda", v, n, d, 1 / tau, groups=groups, grad_out=grad_out)


@FUZZ
@given(
    m=st.integers(2, 6), n=st.integers(1, 90), extra_d=st.integers(0, 50), dtype=DTYPES,
    scale=SCALES, eps=st.sampled_from([0.0, 0.1]), grad_out=GRADS,
)  # fmt: skip
def test_gram(m, n, extra_d, dtype, scale, eps, grad_out):
    # D >= 2 M. With D < M every volume is 0 (see tests/test_gram.py); near D = M random
    # samples have small volumes whose 1/V gradients amplify rounding, and every fp32
    # implementation (torch backend, Triton, CUDA, the fp32 reference itself) lands beyond
    # twice the fp32 reference's error on some draws (D = M = 3, N = 36: up to 3.9x for the
    # torch backend over 20 seeds): the rule does not separate them there.
    _on_emulator(check_gram, "cuda", n, 2 * m + extra_d, m, dtype, scale, eps, grad_out)


@FUZZ
@given(
    ns=st.sampled_from(["n", "n_squared"]), extra_m=st.integers(0, 2), n=st.integers(2, 40),
    d=st.integers(1, 40), dtype=DTYPES, scale=st.floats(1.0, 30.0), grad_out=GRADS,
)  # fmt: skip
def test_symile(ns, extra_m, n, d, dtype, scale, grad_out):
    m = 3 if ns == "n_squared" else 3 + extra_m  # the CUDA n_squared kernels are M = 3
    _on_emulator(check_symile, "cuda", m, n, d, ns, scale, dtype, grad_out)
