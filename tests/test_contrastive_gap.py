"""The "contrastive gap" objectives (Fahim, Murphy & Fyshe 2024) L_CUA and L_CUAXU, and
cross-modal uniformity, on every backend against a dense float64 reference written from
the formula (the authors' clips/hf_clip.py, objectives/contrastive_gap.py's docstring) by
the verification rule: the loss and the gradients of both feature sets and the logit
scale."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from verification import BACKENDS, assert_by_rule, pair_inputs, pair_loss_and_grads

NAMES = ("loss", "d_image", "d_text", "d_scale")


def _sq_distances(x, y):
    """||x_i - y_j||^2 (N, N), densely, in the inputs' dtype."""
    return (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)


def _uniform(x, t):
    """log mean_{i < j} exp(-t ||x_i - x_j||^2): the upper triangle (torch.pdist's pairs)."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return _sq_distances(x, x)[i, j].mul(-t).exp().mean().log()


def _cross_uniform(x, y, t):
    """log mean_{i != j} exp(-t ||x_i - y_j||^2): every image-text pair but the matching."""
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    return _sq_distances(x, y)[off].mul(-t).exp().mean().log()


def _dense_gap(x, y, s, variant="cua", t=2.0, w_u=1.0, w_a=1.0, w_x=1.0):
    """L_CLIP + w_u (U(X) + U(Y)) / 2 + w_a mean ||x_i - y_i||^2 [+ w_x L_XUniform]."""
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0])
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * ce(logits, labels) + 0.5 * ce(logits.T, labels)
    loss = loss + w_u * 0.5 * (_uniform(x, t) + _uniform(y, t))
    loss = loss + w_a * (x - y).norm(dim=1).pow(2).mean()
    return loss + w_x * _cross_uniform(x, y, t) if variant == "cuaxu" else loss


def _check(backend, n, d, dtype, scale, grad_out=1.3, **kw):
    torch.manual_seed(n * d)
    a, b = pair_inputs(n, d, dtype)

    def ref(x, y, s, _bias):
        return _dense_gap(x, y, s, **kw)

    def ours(x, y, s, _bias):
        return flashcontrast.contrastive_gap_loss(x, y, s, backend=backend, **_options(kw))

    exact = pair_loss_and_grads(ref, a, b, scale, None, grad_out, torch.float64)
    same = pair_loss_and_grads(ref, a, b, scale, None, grad_out, torch.float32)
    got = pair_loss_and_grads(ours, a, b, scale, None, grad_out)
    assert flashcontrast.last_backend() == backend
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert_by_rule(NAMES, got, same, exact, dtype)


def _options(kw):
    """The reference's keywords as contrastive_gap_loss's."""
    names = {"w_u": "uniformity_weight", "w_a": "alignment_weight"}
    out = {names.get(k, k): v for k, v in kw.items() if k != "w_x"}
    if "w_x" in kw:
        out["cross_uniformity_weight"] = kw["w_x"]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cua", "cuaxu"])
@pytest.mark.parametrize(("n", "d"), [(2, 5), (37, 16), (70, 33)])
def test_matches_the_dense_formula(backend, variant, n, d):
    _check(backend, n, d, torch.float32, 14.3, variant=variant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_t_and_weights(backend):
    _check(backend, 41, 12, torch.float32, 100.0, -0.7, variant="cuaxu", t=0.5, w_u=0.3,
           w_a=2.0, w_x=0.6)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_features(backend, dtype):
    _check(backend, 53, 24, dtype, 30.0, variant="cuaxu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "d", "t", "norm"), [(2, 3, 2.0, 1.0), (45, 20, 2.0, 1.0),
                                                   (31, 7, 3.0, 1.6)])  # fmt: skip
def test_cross_uniform_matches_the_dense_formula(backend, n, d, t, norm):
    """Unit-norm features (the paper's use) and others (the norms enter through the two
    extra columns, as for uniform_loss)."""
    torch.manual_seed(n + d)
    a, b = pair_inputs(n, d, torch.float32)
    a, b = norm * a, b / norm

    def fn(f):
        return lambda x, y, s, _bias: f(x, y) + 0 * s

    def ours(x, y):
        return flashcontrast.cross_uniform_loss(x, y, t, backend=backend)

    def ref(x, y):
        return _cross_uniform(x, y, t)

    exact = pair_loss_and_grads(fn(ref), a, b, 1.0, None, 0.8, torch.float64)
    same = pair_loss_and_grads(fn(ref), a, b, 1.0, None, 0.8)
    got = pair_loss_and_grads(fn(ours), a, b, 1.0, None, 0.8)
    assert_by_rule(NAMES[:3], got[:3], same[:3], exact[:3], torch.float32)


def test_reference_backend_and_the_module():
    """backend="reference" (pdist / cdist, the authors' calls) and the module give the
    dense formula; "cua" is "cuaxu" with w_x = 0."""
    x, y = pair_inputs(23, 9, torch.float64)
    s = torch.tensor(20.0, dtype=torch.float64)
    for variant in ("cua", "cuaxu"):
        want = _dense_gap(x, y, s, variant)
        got = flashcontrast.contrastive_gap_loss(x, y, s, variant=variant, backend="reference")
        torch.testing.assert_close(got, want)
        module = flashcontrast.ContrastiveGapLoss(variant, backend="torch")
        torch.testing.assert_close(module(x, y, s), want)
        assert f"variant={variant!r}" in repr(module)
    zero = flashcontrast.contrastive_gap_loss(x, y, s, variant="cuaxu", cross_uniformity_weight=0)
    torch.testing.assert_close(zero, flashcontrast.contrastive_gap_loss(x, y, s))
    torch.testing.assert_close(
        flashcontrast.cross_uniform_loss(x, y, backend="reference"), _cross_uniform(x, y, 2.0)
    )


def test_weighting_keywords_reach_the_module_and_the_process_group_loss():
    """ContrastiveGapLoss and flashcontrast.distributed.contrastive_gap_loss take t and the
    weights as ``**options`` (GapOptions): the module passes them on, shows the function's
    defaults for the others, and both raise a def's TypeError for a misspelt one."""
    import flashcontrast.distributed as fd

    x, y = pair_inputs(11, 5, torch.float64)
    s = torch.tensor(15.0, dtype=torch.float64)
    kw = dict(t=1.25, uniformity_weight=0.5, alignment_weight=2.0, cross_uniformity_weight=3.0)
    module = flashcontrast.ContrastiveGapLoss("cuaxu", backend="torch", **kw)
    want = _dense_gap(x, y, s, "cuaxu", 1.25, 0.5, 2.0, 3.0)
    torch.testing.assert_close(module(x, y, s), want)
    defaults = repr(flashcontrast.ContrastiveGapLoss())
    assert "t=2.0, uniformity_weight=1.0, alignment_weight=1.0, cross_uniformity_weight=None" in (
        defaults
    )
    with pytest.raises(TypeError, match="unexpected keyword argument 'uniformity_wieght'"):
        flashcontrast.ContrastiveGapLoss(uniformity_wieght=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'uniformity_wieght'"):
        fd.contrastive_gap_loss(x, y, s, uniformity_wieght=0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"variant": "cuax"}, ValueError, "variant must be one of"),
        ({"cross_uniformity_weight": 0.5}, ValueError, 'variant="cuaxu"'),
        ({"t": 0.0}, ValueError, "t must be a positive number"),
        ({"alignment_weight": float("nan")}, ValueError, "alignment_weight must be a finite"),
        ({"uniformity_weight": True}, ValueError, "uniformity_weight must be a finite"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    x, y = pair_inputs(5, 3, torch.float32)
    with pytest.raises(error, match=match):
        flashcontrast.contrastive_gap_loss(x, y, 10.0, **kwargs)
    with pytest.raises(error, match=match):
        flashcontrast.ContrastiveGapLoss(**kwargs)


def test_bad_inputs_raise():
    x, y = pair_inputs(5, 3, torch.float32)
    with pytest.raises(ValueError, match="N >= 2"):
        flashcontrast.contrastive_gap_loss(x[:1], y[:1], 10.0)
    with pytest.raises(ValueError, match="same shape"):
        flashcontrast.contrastive_gap_loss(x, y[:4], 10.0)
    with pytest.raises(ValueError, match="N >= 2"):
        flashcontrast.cross_uniform_loss(x[:1], y[:1])
    with pytest.raises(ValueError, match="same shape"):
        flashcontrast.cross_uniform_loss(x, y[:4])
