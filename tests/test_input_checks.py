"""Input checks shared by every public loss (flashcontrast/_validation.py and the
objectives' own checks): what is accepted, and clear errors that name the argument.

- Scalars (logit scale, bias, temperatures): NumPy real scalars (np.float32, np.int64, ...)
  and one-element NumPy arrays are accepted like Python numbers, and give the loss the
  float64 reference gives for the same value; np.bool_, complex and many-element arrays
  are refused with an error naming the argument.
- Feature tensors in a layout other than torch.strided (sparse COO / CSR, mkldnn) are
  refused with a TypeError naming the argument, before torch's own errors (which name
  none, or succeed on one backend and fail on another).
- Symile ``permutations`` on another device than the representations (other than the
  CPU), or not dense, are refused naming ``permutations``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import flashcontrast
from flashcontrast import reference
from flashcontrast.compat import info_nce as compat_info_nce

N, D = 5, 4
SCALE, BIAS = 3, 2  # integers, so that every integer NumPy type holds them exactly


def _unit(*shape: int) -> torch.Tensor:
    torch.manual_seed(sum(shape))
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


A, B, C = _unit(N, D), _unit(N, D) + 0.1, _unit(N, D) - 0.1
PERMS = torch.stack([torch.stack([torch.roll(torch.arange(N), k + 1) for k in range(2)])] * 3)


# name -> (ours(scale, bias, backend), oracle(scale, bias)); oracle: the float64 reference
# with 0-d float64 tensors. Objectives without a bias ignore it.
def _d(x: torch.Tensor) -> torch.Tensor:
    return x.double()


SCALAR_CASES = {
    "clip_loss": (
        lambda s, t, be: flashcontrast.clip_loss(A, B, s, t, backend=be),
        lambda s, t: reference.clip_loss(_d(A), _d(B), s, t),
    ),
    "siglip_loss": (
        lambda s, t, be: flashcontrast.siglip_loss(A, B, s, t, backend=be),
        lambda s, t: reference.siglip_loss(_d(A), _d(B), s, t),
    ),
    "multiview_infonce_loss": (
        lambda s, t, be: flashcontrast.multiview_infonce_loss([A, B, C], s, backend=be),
        lambda s, t: reference.multiview_infonce_loss(_d(torch.stack([A, B, C])), s),
    ),
    "multiview_dhel_loss": (
        lambda s, t, be: flashcontrast.multiview_dhel_loss([A, B, C], s, backend=be),
        lambda s, t: reference.multiview_dhel_loss(_d(torch.stack([A, B, C])), s),
    ),
    "gram_loss": (
        lambda s, t, be: flashcontrast.gram_loss(A, [B, C], s, backend=be),
        lambda s, t: reference.gram_loss(_d(A), [_d(B), _d(C)], s),
    ),
    "symile_loss_n": (
        lambda s, t, be: flashcontrast.symile_loss([A, B, C], s, permutations=PERMS, backend=be),
        lambda s, t: reference.symile_loss([_d(A), _d(B), _d(C)], s, permutations=PERMS),
    ),
    "symile_loss_n_squared": (
        lambda s, t, be: flashcontrast.symile_loss(
            [A, B, C], s, negative_sampling="n_squared", backend=be
        ),
        lambda s, t: reference.symile_loss([_d(A), _d(B), _d(C)], s, "n_squared"),
    ),
    "ClipLoss": (
        lambda s, t, be: flashcontrast.ClipLoss(be)(A, B, s, t),
        lambda s, t: reference.clip_loss(_d(A), _d(B), s, t),
    ),
    "SigLipLoss": (
        lambda s, t, be: flashcontrast.SigLipLoss(be)(A, B, s, t),
        lambda s, t: reference.siglip_loss(_d(A), _d(B), s, t),
    ),
    "GramLoss": (
        lambda s, t, be: flashcontrast.GramLoss(0.0, be)(A, [B, C], s),
        lambda s, t: reference.gram_loss(_d(A), [_d(B), _d(C)], s),
    ),
    "SymileLoss": (
        lambda s, t, be: flashcontrast.SymileLoss("n_squared", be)([A, B, C], s),
        lambda s, t: reference.symile_loss([_d(A), _d(B), _d(C)], s, "n_squared"),
    ),
}

NUMPY_SCALARS = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "0-d array": lambda v: np.array(v, dtype=np.float32),
    "(1,) array": lambda v: np.array([v], dtype=np.float64),
    "0-d int array": lambda v: np.array(v, dtype=np.int64),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kind", list(NUMPY_SCALARS))
@pytest.mark.parametrize("name", list(SCALAR_CASES))
def test_numpy_scalars_are_accepted(name, kind, backend):
    ours, oracle = SCALAR_CASES[name]
    make = NUMPY_SCALARS[kind]
    got = ours(make(SCALE), make(BIAS), backend)
    want = oracle(torch.tensor(float(SCALE), dtype=torch.float64),
                  torch.tensor(float(BIAS), dtype=torch.float64))  # fmt: skip
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_numpy_temperature_in_compat_info_nce():
    """A temperature reaches as_scalar_tensor as 1 / T: a NumPy T stays NumPy there."""
    got = compat_info_nce.info_nce(A, B, temperature=np.float32(0.5), backend="torch")
    labels = torch.arange(N)
    qa, kb = (
        torch.nn.functional.normalize(_d(A), dim=-1),
        torch.nn.functional.normalize(_d(B), dim=-1),
    )
    want = torch.nn.functional.cross_entropy(qa @ kb.T / 0.5, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


BAD_SCALARS = [
    (np.bool_(True), TypeError, "real number"),
    (np.complex64(1 + 1j), TypeError, "real number"),
    (np.array([1.0, 2.0]), ValueError, "one element"),
    (np.array("3"), TypeError, "real number"),
    (torch.tensor([2.0]).to_sparse(), TypeError, "dense"),
]


@pytest.mark.parametrize(("value", "error", "match"), BAD_SCALARS)
@pytest.mark.parametrize("name", list(SCALAR_CASES))
def test_bad_scale_names_logit_scale(name, value, error, match):
    ours, _ = SCALAR_CASES[name]
    with pytest.raises(error, match=rf"logit_scale.*{match}"):
        ours(value, None, "torch")


@pytest.mark.parametrize(("value", "error", "match"), BAD_SCALARS)
@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_bad_bias_names_logit_bias(name, value, error, match):
    ours, _ = SCALAR_CASES[name]
    with pytest.raises(error, match=rf"logit_bias.*{match}"):
        ours(3.0, value, "torch")


# ----------------------------------------------------------------------------- layouts


def _sparse_coo(x):
    return x.to_sparse()


def _sparse_csr(x):
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return x.to_sparse_csr()


def _mkldnn(x):
    return x.to_mkldnn()


LAYOUTS = [
    pytest.param(_sparse_coo, id="sparse_coo"),
    pytest.param(_sparse_csr, id="sparse_csr"),
    pytest.param(
        _mkldnn,
        id="mkldnn",
        marks=pytest.mark.skipif(
            not torch.backends.mkldnn.is_available(), reason="this torch build has no mkldnn"
        ),
    ),
]


def _with(x_list, k, convert):
    out = list(x_list)
    out[k] = convert(out[k])
    return out


def _views(fn):
    return lambda xs, be: fn(xs, 3.0, backend=be)


# name -> (call(features, backend), the name each feature argument has in the error)
LAYOUT_CASES = {
    "clip_loss": (
        lambda xs, be: flashcontrast.clip_loss(*xs, 3.0, backend=be),
        ["image_features", "text_features"],
    ),
    "siglip_loss": (
        lambda xs, be: flashcontrast.siglip_loss(*xs, 3.0, -1.0, backend=be),
        ["image_features", "text_features"],
    ),
    "gram_loss": (
        lambda xs, be: flashcontrast.gram_loss(xs[0], xs[1:], 3.0, backend=be),
        ["anchor", r"others\[0\]", r"others\[1\]"],
    ),
    "gram_volume": (
        lambda xs, be: flashcontrast.gram_volume(xs[0], xs[1:]),
        ["anchor", r"others\[0\]", r"others\[1\]"],
    ),
    "symile_loss_n": (
        lambda xs, be: flashcontrast.symile_loss(xs, 3.0, permutations=PERMS, backend=be),
        [rf"representations\[{k}\]" for k in range(3)],
    ),
    "symile_loss_n_squared": (
        lambda xs, be: flashcontrast.symile_loss(
            xs, 3.0, negative_sampling="n_squared", backend=be
        ),
        [rf"representations\[{k}\]" for k in range(3)],
    ),
    "multiview_infonce_loss": (
        _views(flashcontrast.multiview_infonce_loss),
        [rf"views\[{k}\]" for k in range(3)],
    ),
    "multiview_dhel_loss": (
        _views(flashcontrast.multiview_dhel_loss),
        [rf"views\[{k}\]" for k in range(3)],
    ),
}


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("convert", LAYOUTS)
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_non_strided_features_name_the_argument(name, convert, backend):
    """Each feature argument in turn is made sparse / mkldnn; the others stay dense."""
    call, names = LAYOUT_CASES[name]
    for k, arg in enumerate(names):
        xs = _with([A, B, C][: len(names)], k, convert)
        with pytest.raises(TypeError, match=rf"^{arg} must be a dense \(strided\) tensor"):
            call(xs, backend)


def test_dense_features_still_pass_the_layout_check():
    """The check refuses layouts, not tensors: a dense strided view (non-contiguous)
    passes and gives the reference's loss."""
    a_t = A.T.contiguous().T  # column-major, strided
    assert not a_t.is_contiguous() and a_t.layout == torch.strided
    got = flashcontrast.clip_loss(a_t, B, 3.0, backend="torch")
    want = reference.clip_loss(_d(A), _d(B), torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- permutations


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_symile_permutations_on_another_device(backend):
    meta = PERMS.to("meta")
    with pytest.raises(ValueError, match=re.escape("permutations is on meta") + ".*cpu"):
        flashcontrast.symile_loss([A, B, C], 3.0, permutations=meta, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_symile_permutations_not_dense(backend):
    with pytest.raises(TypeError, match=r"^permutations must be a dense \(strided\) tensor"):
        flashcontrast.symile_loss([A, B, C], 3.0, permutations=PERMS.to_sparse(), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_symile_permutations_other_integer_dtypes(dtype):
    """Any integer dtype indexes like int64 (uint8 is not taken for a boolean mask)."""
    got = flashcontrast.symile_loss([A, B, C], 3.0, permutations=PERMS.to(dtype), backend="torch")
    want = reference.symile_loss(
        [_d(A), _d(B), _d(C)], torch.tensor(3.0, dtype=torch.float64), permutations=PERMS
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
