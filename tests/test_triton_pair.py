"""The Triton pair engine (flashcontrast/backends/triton/pair.py) beyond the contract tests
of tests/test_engine.py: tile shapes and D chunkings, the forward's (G, H) grid with
exclusive partials, the backward's SPLIT > 1 path, 64-bit indexing, strided inputs read in
place, int32 / int64 group ids (and groups=None as the default), degenerate sizes, fp16's
coefficient normalisation and the backend's unavailability reasons.
Every result is checked against the dense float64 oracle (tests/engine_oracle.py) by the
verification rule, as in test_engine.py.

Interpreter note: the Triton interpreter upcasts bf16 tiles to fp32 before tl.dot (its bf16
tl.dot is wrong), so bf16 runs here check the kernels' logic, not bf16 tensor-core products.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from flashcontrast.backends.pair import Coefs, Pair
from flashcontrast.backends.triton import triton_unavailable_reason
from test_engine import Case, _finite_or_equal_inf, _inputs, _oracle, _ours
from verification import TRITON_SKIP, assert_by_rule

pytestmark = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))

if TRITON_SKIP is None:
    from flashcontrast.backends.triton import pair as triton_pair
    from flashcontrast.backends.triton._plan import _backward_plan, _forward_plan, override_tiles
else:  # keeps collection working; every test is skipped
    triton_pair = _backward_plan = _forward_plan = override_tiles = None

SOFTMAX, ROWS, SIGMOID = Pair("softmax"), Pair("rows"), Pair("sigmoid")
MV = Pair("rows", exclude_self=True, period=45)
# One case per epilogue family, rectangular (m != n), sizes not multiples of any tile.
SWEEP = {
    "clip-block": Case(SOFTMAX, 37, 50, row_offset=6, groups=True, bias=True),
    "clip-one-row": Case(SOFTMAX, 1, 45, row_offset=3, bias=True),
    "infonce-override": Case(ROWS, 41, 41, override=True, coefs=("rows", "pos_rows")),
    "mv-infonce": Case(MV, 70, 90, row_offset=10, groups=True, coefs=("rows", "pos_rows")),
    "mv-dhel": Case(
        Pair("rows", positives=False, exclude_self=True), 45, 45, groups=True, coefs=("rows",)
    ),
    "siglip": Case(SIGMOID, 33, 47, col_offset=2, bias=True, coefs=("total",)),
}


def _check(case: Case, d: int, dtype=torch.float32, seed=0, inputs=None, gdtype=None):
    """The Triton pair engine on ``case`` against the dense oracle by the rule; returns
    (statistics, gradients)."""
    a, b, rg, cg, pl, coefs = _inputs(case, d, dtype, seed)
    if inputs is not None:
        a, b = inputs(a), inputs(b)
    if gdtype is not None and rg is not None:
        rg, cg = rg.to(gdtype), cg.to(gdtype)
    stats, grads = _ours(triton_pair, case, a, b, rg, cg, pl, coefs)
    exact, names = _oracle(case, a, b, rg, cg, pl, coefs, torch.float64)
    same, _ = _oracle(
        case, a, b, rg, cg, pl, coefs, torch.float32 if dtype == torch.float32 else dtype
    )
    assert sorted(stats) == names
    got = [stats[k] for k in names] + grads
    pairs = [_finite_or_equal_inf(g, e) for g, e in zip(got, exact)]
    same = [_finite_or_equal_inf(s, e)[0] for s, e in zip(same, exact)]
    labels = names + ["da", "db", "dscale"] + (["dbias"] if case.bias else [])
    labels += ["dpos"] if pl is not None else []
    assert_by_rule(labels, [p[0] for p in pairs], same, [p[1] for p in pairs], dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    return stats, grads


@pytest.mark.parametrize("name", list(SWEEP))
@pytest.mark.parametrize(
    "tiles,d",
    [
        (dict(block_m=32, block_n=32, block_d=32), 20),  # one chunk, D < chunk
        (dict(block_m=32, block_n=32, block_d=16), 20),  # D not a multiple of the chunk
        (dict(block_m=64, block_n=64, block_d=16), 50),  # GPU-wide tiles, four chunks
        (dict(block_m=32, block_n=64, block_d=16, max_programs=3), 37),  # rectangular
        (dict(block_m=64, block_n=32, block_d=64), 50),  # one chunk of 64
    ],
    ids=["32-d20-1chunk", "32-d20-2chunks", "64-d50-4chunks", "32x64-d37", "64x32-d50"],
)
def test_tile_shapes_and_d_chunks(name, tiles, d):
    with override_tiles(**tiles):
        _check(SWEEP[name], d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["clip-block", "mv-infonce", "siglip"])
def test_tile_shapes_16_bit(name, dtype):
    with override_tiles(block_m=64, block_n=32, block_d=16):
        _check(SWEEP[name], 37, dtype)


GRID_CASES = {
    "clip": Case(SOFTMAX, 100, 100, bias=True, groups=True),
    # period > tile: many tiles without a positive, also on the first row block of a
    # program (the column positives' partials are written there all the same)
    "softmax-views": Case(Pair("softmax", exclude_self=True, period=45), 110, 120, 25),
    "mv-infonce": Case(MV, 100, 120, row_offset=35, coefs=("rows", "pos_rows")),
    "siglip": Case(SIGMOID, 100, 100, bias=True, coefs=("total",)),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_forward_grid_with_column_and_row_splits(name):
    """G > 1 and H > 1: row pairs from H exclusive partials, column pairs from G, merged
    exactly; the forward has no atomics, so it is bitwise repeatable."""
    case = GRID_CASES[name]
    with override_tiles(block_m=32, block_n=32, block_d=16, max_programs=4):
        _, g, h = _forward_plan(case.n, 20, torch.float32, torch.device("cpu"), case.m)
        assert g > 1 and h > 1, (g, h)
        _check(case, 20)
        a, b, rg, cg, _, _ = _inputs(case, 20, torch.float32, 0)
        kw = dict(row_offset=case.row_offset, row_groups=rg, col_groups=cg)
        first = triton_pair.pair_forward(a, b, torch.tensor(case.scale), None, case.pair, **kw)
        again = triton_pair.pair_forward(a, b, torch.tensor(case.scale), None, case.pair, **kw)
    for x, y in zip(first, again):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("d", [20, 50])  # one chunk (dB on chip) and chunks (dB atomics)
@pytest.mark.parametrize("name", ["clip", "mv-infonce", "siglip"])
def test_backward_split(name, d):
    """More row blocks than column blocks: SPLIT > 1 programs share each column block."""
    case = dataclasses.replace(GRID_CASES[name], n=130, m=40)
    with override_tiles(block_m=32, block_n=32, block_d=32):
        _, num_cb, split = _backward_plan(case.n, d, torch.float32, torch.device("cpu"), case.m)
        assert num_cb == 2 and split > 1, (num_cb, split)
        _check(case, d)


@pytest.mark.parametrize("name", ["clip-block", "infonce-override", "mv-infonce", "siglip"])
def test_64_bit_indexing(name, monkeypatch):
    """INDEX_64 (what offsets beyond int32 take) gives the same numbers on small tensors."""
    monkeypatch.setattr(triton_pair, "_index_64", lambda *tensors: True)
    _, small = _check(SWEEP[name], 20)
    monkeypatch.undo()
    _, wide = _check(SWEEP[name], 20)
    for x, y in zip(small, wide):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    out = t.t().contiguous().t()  # same values, strides (1, n)
    assert not out.is_contiguous()
    return out


def _sliced(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(t.shape[0] + 3, 2 * t.shape[1], dtype=t.dtype)
    wide[3:, ::2] = t
    out = wide[3:, ::2]  # storage offset, column stride 2
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("layout", [_transposed, _sliced], ids=["transposed", "sliced"])
@pytest.mark.parametrize("name", ["clip-block", "mv-infonce", "siglip"])
def test_strided_inputs_are_read_in_place(name, layout, monkeypatch):
    """Strided features are read in place (no copy) and nothing n x m is allocated."""
    case = dataclasses.replace(SWEEP[name], n=70, m=90)
    a, b, rg, cg, pl, coefs = _inputs(case, 20, torch.float32, 0)
    a, b = layout(a), layout(b)
    shapes, copied = [], []
    for fn in ("empty", "zeros", "full", "empty_like", "zeros_like", "empty_strided"):
        original = getattr(torch, fn)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, fn, recording)
    contiguous = torch.Tensor.contiguous

    def recording_contiguous(self, *args, **kwargs):
        if not self.is_contiguous():
            copied.append(tuple(self.shape))
        return contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", recording_contiguous)
    ours = _ours(triton_pair, case, a, b, rg, cg, pl, coefs)
    monkeypatch.undo()
    assert not copied, f"strided inputs were copied: {copied}"
    biggest = max(math.prod(s) for s in shapes)  # O((n + m) (D + programs)), never n x m
    assert biggest <= 2 * 2 * 8 * max(case.n, case.m) < case.n * case.m, shapes
    plain = _ours(triton_pair, case, a.contiguous(), b.contiguous(), rg, cg, pl, coefs)
    for x, y in zip(list(ours[0].values()) + ours[1], list(plain[0].values()) + plain[1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    _check(case, 20, inputs=layout)


@pytest.mark.parametrize("name", ["clip-block", "mv-infonce", "mv-dhel"])
def test_int32_and_int64_group_ids(name):
    stats32, grads32 = _check(SWEEP[name], 20, gdtype=torch.int32)
    stats64, grads64 = _check(SWEEP[name], 20, gdtype=torch.int64)
    for x, y in zip(list(stats32.values()) + grads32, list(stats64.values()) + grads64):
        assert torch.equal(x, y)


def _empty_sweep(pair: Pair, n: int, m: int, d: int):
    """What a sweep without entries returns: empty sets, zero gradients."""
    neg, zero = torch.full((n,), -math.inf), torch.zeros(n)
    cneg, czero = torch.full((m,), -math.inf), torch.zeros(m)
    if pair.epilogue == "sigmoid":
        stats = [None] * 8 + [torch.zeros(())]
    else:
        stats = [neg, zero] + ([neg, zero] if pair.positives else [None, None])
        cols = pair.epilogue == "softmax"
        stats += [cneg, czero] if cols else [None, None]
        stats += [cneg, czero] if cols and pair.positives else [None, None]
        stats += [None]
    grads = [torch.zeros(n, d), torch.zeros(m, d), torch.zeros(()), torch.zeros(()), None]
    return stats, grads


@pytest.mark.parametrize("pair", [SOFTMAX, SIGMOID, MV], ids=["softmax", "sigmoid", "mv"])
@pytest.mark.parametrize("n,m,d", [(0, 5, 4), (5, 0, 4), (6, 7, 0)])
def test_degenerate_sizes(pair, n, m, d):
    """No rows or no columns (empty sets, zero gradients), or D = 0 (S = bias: the torch
    backend's numbers), with every output's shape and dtype."""
    from flashcontrast.backends.blockwise import pair as torch_pair

    a, b = torch.randn(n, d), torch.randn(m, d)
    scale, bias = torch.tensor(3.0), torch.tensor(0.5)
    coefs = Coefs(
        rows=torch.rand(n) + 0.5,
        pos_rows=torch.rand(n) + 0.5,
        cols=torch.rand(m) + 0.5,
        pos_cols=torch.rand(m) + 0.5,
        total=torch.tensor(0.7),
    )
    stats = triton_pair.pair_forward(a, b, scale, bias, pair)
    got = list(stats) + list(triton_pair.pair_backward(a, b, scale, bias, pair, stats, coefs))
    if d == 0:
        want = torch_pair.pair_forward(a, b, scale, bias, pair)
        want = list(want) + list(torch_pair.pair_backward(a, b, scale, bias, pair, want, coefs))
    else:
        stats_want, grads_want = _empty_sweep(pair, n, m, d)
        want = stats_want + grads_want
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fp16_tiny_coefficients_are_not_flushed():
    """fp16: dS is divided by max |coefficient| before its cast, so coefficients of
    1 / N at large N (subnormal in fp16) give the gradients scaled, not rounded away."""
    case = SWEEP["clip-block"]
    a, b, rg, cg, _, coefs = _inputs(case, 20, torch.float16, 0)
    scale = torch.tensor(10.0)
    kw = dict(row_offset=case.row_offset, row_groups=rg, col_groups=cg)
    stats = triton_pair.pair_forward(a, b, scale, None, case.pair, **kw)
    unit = Coefs(**{k: v.float() for k, v in coefs.items()})
    tiny = Coefs(**{k: v.float() * 2e-7 for k, v in coefs.items()})
    ref = triton_pair.pair_backward(
        a, b, scale, None, case.pair, stats, unit, **kw, out_dtype=torch.float32
    )
    got = triton_pair.pair_backward(
        a, b, scale, None, case.pair, stats, tiny, **kw, out_dtype=torch.float32
    )
    for x, y in zip(got[:3], ref[:3]):  # unnormalised, dS ~ 1e-9 would round to 0 in fp16
        want = y * 2e-7
        assert (x - want).abs().max() <= 1e-3 * want.abs().max()


def test_out_dtype_float32_returns_the_accumulators():
    case = SWEEP["infonce-override"]
    a, b, _, _, pl, coefs = _inputs(case, 20, torch.bfloat16, 0)
    scale = torch.tensor(10.0)
    stats = triton_pair.pair_forward(a, b, scale, None, case.pair, positive_logits=pl.float())
    c = Coefs(**{k: v.float() for k, v in coefs.items()})
    kw = dict(positive_logits=pl.float())
    full = triton_pair.pair_backward(
        a, b, scale, None, case.pair, stats, c, **kw, out_dtype=torch.float32
    )
    rounded = triton_pair.pair_backward(a, b, scale, None, case.pair, stats, c, **kw)
    assert full.da.dtype == full.db.dtype == torch.float32
    assert rounded.da.dtype == rounded.db.dtype == torch.bfloat16
    assert torch.equal(full.da.to(torch.bfloat16), rounded.da)
    assert torch.equal(full.db.to(torch.bfloat16), rounded.db)
    assert full.dpos.shape == (case.n,) and full.dpos.dtype == torch.float32


def test_rejects_bad_inputs():
    a, b, s = torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        triton_pair.pair_forward(a.double(), b.double(), s, None, SOFTMAX)
    with pytest.raises(ValueError, match=r"\(n, D\) and \(m, D\)"):
        triton_pair.pair_forward(a, torch.randn(5, 4), s, None, SOFTMAX)
    with pytest.raises(ValueError, match="together"):
        triton_pair.pair_forward(a, b, s, None, SOFTMAX, row_groups=torch.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="int32 or int64"):
        g = torch.zeros(4), torch.zeros(5)
        triton_pair.pair_forward(a, b, s, None, SOFTMAX, row_groups=g[0], col_groups=g[1])
    with pytest.raises(ValueError, match="positives"):
        p = Pair("rows", positives=False)
        triton_pair.pair_forward(a, b, s, None, p, positive_logits=torch.zeros(4))
    with pytest.raises(ValueError, match="row_offset"):
        triton_pair.pair_forward(a, b, s, None, SOFTMAX, row_offset=-1)


def test_groups_none_is_the_default():
    """row_groups=None / col_groups=None give the calls without the arguments, bit for
    bit (the ungrouped kernels). (Ported from tests/test_clip_groups.py.)"""
    case = SWEEP["clip-block"]
    a, b, _, _, _, coefs = _inputs(case, 9, torch.float32, 0)
    s, c = torch.tensor(8.0), Coefs(**{k: v.float() for k, v in coefs.items()})
    kw = dict(row_offset=case.row_offset)
    none = dict(row_groups=None, col_groups=None)
    f0 = triton_pair.pair_forward(a, b, s, None, SOFTMAX, **kw)
    f1 = triton_pair.pair_forward(a, b, s, None, SOFTMAX, **kw, **none)
    b0 = triton_pair.pair_backward(a, b, s, None, SOFTMAX, f0, c, **kw)
    b1 = triton_pair.pair_backward(a, b, s, None, SOFTMAX, f1, c, **kw, **none)
    for x, y in zip((*f0, *b0), (*f1, *b1)):
        assert (x is None and y is None) or torch.equal(x, y)


def test_unavailable_reason(monkeypatch):
    """The backend says why it cannot run: on CPU only in the interpreter, never on meta."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert (triton_unavailable_reason(torch.device("cpu")) is None) == interpreting
    assert "not meta" in (triton_unavailable_reason(torch.device("meta")) or "")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in triton_unavailable_reason(torch.device("cpu"))
