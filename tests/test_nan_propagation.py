"""NaN and inf in the inputs reach the loss, on every objective and backend.

The README promises it (inputs are not checked for NaN, which would need a device sync):
a "skip the step when the loss is not finite" guard must see every non-finite input. A
kernel that maps a bad value to something finite (a max(det, 0) that drops NaN, a mask
that treats NaN as "not a candidate") would let the step through and the NaN gradients
corrupt the weights. Each input in turn gets one NaN, +inf or -inf entry.
"""

from __future__ import annotations

import pytest
import torch

import flashcontrast as fc
from verification import BACKENDS

ALL_BACKENDS = ["reference", *BACKENDS]
BAD = [float("nan"), float("inf"), float("-inf")]
N, D = 9, 6


def _feats(k: int) -> list:
    return [torch.nn.functional.normalize(torch.randn(N, D), dim=1) for _ in range(k)]


def _clip(xs, s, backend):
    return fc.clip_loss(xs[0], xs[1], s, backend=backend)


def _clip_groups(xs, s, backend):
    groups = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5])
    return fc.clip_loss(xs[0], xs[1], s, 0.5, groups=groups, backend=backend)


def _siglip(xs, s, backend):
    return fc.siglip_loss(xs[0], xs[1], s, -2.0, backend=backend)


def _mv_infonce(xs, s, backend):
    return fc.multiview_infonce_loss(torch.stack(xs), s, backend=backend)


def _mv_dhel(xs, s, backend):
    return fc.multiview_dhel_loss(torch.stack(xs), s, backend=backend)


def _gram(xs, s, backend):
    return fc.gram_loss(xs[0], xs[1:], s, label_smoothing=0.1, backend=backend)


def _symile_n(xs, s, backend):
    perms = torch.stack([torch.stack([torch.randperm(N) for _ in range(2)]) for _ in range(3)])
    return fc.symile_loss(xs, s, permutations=perms, backend=backend)


def _symile_n2(xs, s, backend):
    return fc.symile_loss(xs, s, negative_sampling="n_squared", backend=backend)


def _contrastive_gap(xs, s, backend):
    return fc.contrastive_gap_loss(xs[0], xs[1], s, variant="cuaxu", backend=backend)


OBJECTIVES = {
    "clip": (_clip, 2),
    "clip-groups": (_clip_groups, 2),
    "siglip": (_siglip, 2),
    "mv-infonce": (_mv_infonce, 3),
    "mv-dhel": (_mv_dhel, 3),
    "gram": (_gram, 3),
    "symile-n": (_symile_n, 3),
    "symile-n2": (_symile_n2, 3),
    "contrastive-gap": (_contrastive_gap, 2),
}


def _poisoned(clean: list, bad: float):
    """(which input, entry, inputs) with one entry of one input set to ``bad``."""
    for which in range(len(clean)):
        for row, col in ((0, 0), (N - 1, D - 2)):
            xs = [x.clone() for x in clean]
            xs[which][row, col] = bad
            yield (which, row, col), xs


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_nan_feature_makes_the_loss_nan(objective, backend):
    fn, k = OBJECTIVES[objective]
    clean = _feats(k)
    assert torch.isfinite(fn(clean, 5.0, backend))
    for where, xs in _poisoned(clean, float("nan")):
        loss = fn(xs, 5.0, backend)
        assert torch.isnan(loss), (where, loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_infinite_feature_is_non_finite_where_the_reference_is(objective, backend):
    """inf follows IEEE arithmetic, as in the reference: e.g. SigLIP with a_id = -inf and
    every other b_jd > 0 sends those negatives' logits to -inf, whose softplus is exactly
    0, so the loss may legitimately stay finite. Where the reference's loss is not
    finite, ours is not either, and the other way round."""
    fn, k = OBJECTIVES[objective]
    clean = _feats(k)
    for bad in (float("inf"), float("-inf")):
        for where, xs in _poisoned(clean, bad):
            want = fn([x.double() for x in xs], 5.0, "reference")
            got = fn(xs, 5.0, backend)
            assert bool(torch.isfinite(got)) == bool(torch.isfinite(want)), (bad, where, got, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_non_finite_logit_scale_reaches_the_loss(objective, backend):
    fn, k = OBJECTIVES[objective]
    xs = _feats(k)
    for bad in (float("nan"), float("inf")):
        assert not torch.isfinite(fn(xs, torch.tensor(bad), backend)), bad


def test_gram_volume_is_nan_where_an_input_is():
    """The NaN sample's volumes are NaN (GRAM's reference mapped them to 0: a perfect
    match); the others stay finite."""
    t, v, a = _feats(3)
    v[4, 1] = float("nan")
    for fn in (fc.gram_volume, fc.reference.gram_volume):
        vol = fn(t, [v, a])
        assert torch.isnan(vol[:, 4]).all()
        keep = torch.ones(N, dtype=torch.bool)
        keep[4] = False
        assert torch.isfinite(vol[:, keep]).all()
