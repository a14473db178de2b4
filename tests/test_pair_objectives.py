"""The cases CLIP and SigLIP share, through the public API on every backend that can run
here, against the float64 reference by the verification rule (docs/verification.md):
sizes and feature dims, unnormalized features, 16-bit features. Each objective at its
usual logit scale and bias (CLIP: OpenCLIP's scale range, no bias; SigLIP: its init
s = 10, b = -10). The objective-specific cases are in test_clip.py and test_siglip.py."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from flashcontrast import reference
from verification import BACKENDS, check_pair_objective

# objective -> (public function, reference, (scale, bias) at its usual values)
OBJECTIVES = {
    "clip": (flashcontrast.clip_loss, reference.clip_loss, (14.3, None)),
    "siglip": (flashcontrast.siglip_loss, reference.siglip_loss, (10.0, -10.0)),
}


def _check(objective, backend, n, d, dtype, scale=None, bias=None, normalize=True):
    fn, ref, usual = OBJECTIVES[objective]
    if scale is None:
        scale, bias = usual
    ours = lambda *x: fn(*x, backend=backend)  # noqa: E731
    check_pair_objective(ours, ref, n, d, dtype, scale, bias, normalize=normalize)
    assert flashcontrast.last_backend() == backend


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 97, 300])
@pytest.mark.parametrize("d", [3, 64, 100])
def test_matches_reference_fp32(objective, backend, n, d):
    _check(objective, backend, n, d, torch.float32)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalized_features(objective, backend):
    _check(objective, backend, 61, 40, torch.float32, scale=3.0, bias=0.25, normalize=False)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(objective, backend, dtype):
    """16-bit features at the usual scale (CLIP at 30 here, as its test did before)."""
    scale, bias = (30.0, None) if objective == "clip" else (None, None)
    _check(objective, backend, 97, 64, dtype, scale, bias)
