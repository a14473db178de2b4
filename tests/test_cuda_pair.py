"""The CUDA pair engine (csrc/kernels/pair.cu through backends/cuda.py pair_forward /
pair_backward) against the dense float64 oracle of the contract (tests/engine_oracle.py),
by the verification rule, at the shapes tests/test_engine.py does not reach: tiles crossed
in both directions, m != n, one row or column, D off the 32-wide chunk, large sweeps (1025
rows, 17 D chunks), strided inputs, int32 and int64 group ids, both workspaces' sizes,
determinism, streams (GPU only) and the public clip_loss on the target; and the typed
argument structs of
``_C`` (PairParams, PairStats, PairCoefs, PairGrads, GramParams, TripleParams), which
refuse a wrong field type, a missing or unknown field and a null pointer by name.

Kernel tests run on each ``kernel_target`` (tests/conftest.py): a GPU (skipped here, with
the reason) and csrc/ built for the CPU (tests/cuda_emulator); the fixture sets DEVICE and
swaps the module's ``_C``. The no-GPU tests at the end check the real ``_C``.
"""

from __future__ import annotations

import math

import pytest
import torch

from c_structs import gram_params, pair_params, triple_params
from engine_oracle import dense, stats_lse
from flashcontrast import _cuda_ext
from flashcontrast.backends import cuda as cuda_backend
from flashcontrast.backends.pair import Coefs, Pair
from verification import assert_by_rule

DEVICE = "cuda"  # set per test by the kernel_target fixture
HAS_C = _cuda_ext.HAS_C
HAS_CUDA = torch.cuda.is_available()

SOFTMAX = Pair("softmax")
MV = Pair("rows", exclude_self=True, period=23)  # MV-InfoNCE-like: views of 23 samples
SIGMOID = Pair("sigmoid")
ROW_COEFS = ("rows", "pos_rows")
ALL_COEFS = ("rows", "pos_rows", "cols", "pos_cols")


def _unit(n, d, dtype, g):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype).to(DEVICE)


def _coefs(pair: Pair, n: int, m: int, g) -> dict:
    if pair.epilogue == "sigmoid":
        return {"total": torch.tensor(0.7, dtype=torch.float64)}
    names = ALL_COEFS if pair.epilogue == "softmax" else ROW_COEFS
    if not pair.positives:
        names = tuple(k for k in names if not k.startswith("pos_"))
    size = {"rows": n, "pos_rows": n, "cols": m, "pos_cols": m}
    return {k: torch.rand(size[k], generator=g, dtype=torch.float64) + 0.5 for k in names}


def _dense(a, b, scale, bias, pair, coefs, dtype, ro, co, rg, cg, pl):
    """(statistics as logsumexps, gradients) of the dense oracle in ``dtype``."""
    leaves = [a.cpu().to(dtype).requires_grad_(), b.cpu().to(dtype).requires_grad_()]
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    bb = None if bias is None else torch.tensor(bias, dtype=dtype, requires_grad=True)
    pos = None if pl is None else pl.cpu().to(dtype).requires_grad_()
    c = {k: v.to(dtype) for k, v in coefs.items()}
    rg = None if rg is None else rg.cpu().long()
    cg = None if cg is None else cg.cpu().long()
    stats, loss = dense(*leaves, s, bb, pair, c, ro, co, rg, cg, pos)
    wrt = [*leaves, s, *([bb] if bb is not None else []), *([pos] if pos is not None else [])]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return {k: v.detach() for k, v in stats.items()}, grads


def _ours(a, b, scale, bias, pair, coefs, ro, co, rg, cg, pl, out_dtype=None):
    f32 = dict(dtype=torch.float32, device=DEVICE)
    s = torch.tensor(scale, **f32)
    bb = None if bias is None else torch.tensor(bias, **f32)
    pos = None if pl is None else pl.to(**f32)
    kw = dict(row_offset=ro, col_offset=co, row_groups=rg, col_groups=cg, positive_logits=pos)
    stats = cuda_backend.pair_forward(a, b, s, bb, pair, **kw)
    c = Coefs(**{k: v.to(**f32) for k, v in coefs.items()})
    grads = cuda_backend.pair_backward(a, b, s, bb, pair, stats, c, out_dtype=out_dtype, **kw)
    return stats, grads


def _zero_neginf(got, want):
    """Empty sets are -inf in both (asserted), then compared as 0."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    both = torch.isneginf(got) & torch.isneginf(want)
    return got.masked_fill(both, 0.0), want.masked_fill(both, 0.0)


def _check(
    pair, n, m, d, dtype, *, scale=10.0, bias=None, ro=0, co=0, groups=None, override=False,
    strided=False, seed=0,
):  # fmt: skip
    """Our sweep against the dense oracle by the rule; returns (stats, grads, inputs)."""
    g = torch.Generator().manual_seed(seed)
    a, b = _unit(n, d, dtype, g), _unit(m, d, dtype, g)
    if strided:  # column-major a, b a column-strided view: read in place, not copied
        a = a.t().contiguous().t()
        wide = torch.zeros(m, 3 * d + 1, dtype=dtype, device=DEVICE)
        wide[:, 1 : 3 * d + 1 : 3] = b
        b = wide[:, 1 : 3 * d + 1 : 3]
        assert a.stride() == (1, n) and b.stride() == (3 * d + 1, 3)
    rg = cg = pl = None
    if groups is not None:
        ids = torch.randint(0, 5, (ro + n + co + m,), generator=g)
        rg, cg = ids[ro : ro + n].to(groups).to(DEVICE), ids[co : co + m].to(groups).to(DEVICE)
    if override:
        pl = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    coefs = _coefs(pair, n, m, g)
    stats, grads = _ours(a, b, scale, bias, pair, coefs, ro, co, rg, cg, pl)
    exact_s, exact_g = _dense(a, b, scale, bias, pair, coefs, torch.float64, ro, co, rg, cg, pl)
    same_dtype = torch.float32 if dtype == torch.float32 else dtype
    same_s, same_g = _dense(a, b, scale, bias, pair, coefs, same_dtype, ro, co, rg, cg, pl)
    ours_s = stats_lse(stats)
    names = sorted(exact_s)
    assert sorted(ours_s) == names
    got = [grads.da, grads.db, grads.dscale]
    labels = [*names, "da", "db", "dscale"]
    if bias is not None:
        got.append(grads.dbias)
        labels.append("dbias")
    if pl is not None:
        got.append(grads.dpos)
        labels.append("dpos")
    exact = [exact_s[k] for k in names] + exact_g
    pairs = [_zero_neginf(x, e) for x, e in zip([ours_s[k] for k in names] + got, exact)]
    same = [_zero_neginf(x, e)[0] for x, e in zip([same_s[k] for k in names] + same_g, exact)]
    assert_by_rule(labels, [p[0] for p in pairs], same, [p[1] for p in pairs], dtype)
    assert grads.da.shape == (n, d) and grads.db.shape == (m, d)
    assert grads.da.dtype == dtype and grads.db.dtype == dtype
    assert grads.da.is_contiguous() and grads.db.is_contiguous()
    return stats, grads, (a, b, rg, cg, pl, coefs)


# ----------------------------------------------------------------------------- shapes

SHAPES = [
    (1, 1, 5),  # one row, one column
    (1, 70, 33),  # one row against two column tiles
    (66, 1, 31),  # two row tiles against one column
    (64, 64, 32),  # exactly one tile, one chunk
    (65, 129, 33),  # one past a tile in both directions, one past a chunk
    (130, 67, 97),  # m != n, D = 3 chunks + 1
]


@pytest.mark.parametrize("n,m,d", SHAPES, ids=[f"{n}x{m}x{d}" for n, m, d in SHAPES])
@pytest.mark.parametrize(
    "pair", [SOFTMAX, MV, SIGMOID], ids=["softmax", "rows-excl-period", "sigmoid"]
)
@pytest.mark.usefixtures("kernel_target")
def test_shapes_across_tiles_fp32(pair, n, m, d):
    _check(pair, n, m, d, torch.float32, bias=-0.5 if pair is not MV else None)


@pytest.mark.parametrize("n,m,d", [(1, 70, 33), (130, 67, 97)], ids=["1x70x33", "130x67x97"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pair", [SOFTMAX, MV, SIGMOID], ids=["softmax", "rows", "sigmoid"])
@pytest.mark.usefixtures("kernel_target")
def test_shapes_across_tiles_16bit(pair, dtype, n, m, d):
    _check(pair, n, m, d, dtype, scale=20.0)


@pytest.mark.usefixtures("kernel_target")
def test_offsets_far_from_the_block_and_across_tiles():
    """Offsets that put the global diagonal in a later column tile (positives found there)
    and past every column (no positives: -inf positive pairs)."""
    stats, _, _ = _check(SOFTMAX, 70, 140, 20, torch.float32, ro=50, co=0)
    assert torch.isfinite(stats.pos_max).all()  # rows 50..119 meet columns 50..119
    stats, _, _ = _check(SOFTMAX, 30, 40, 20, torch.float32, ro=1000, co=5)
    assert torch.isneginf(stats.pos_max).all() and (stats.pos_sum == 0).all()


@pytest.mark.usefixtures("kernel_target")
def test_full_option_set_runs_on_the_full_form():
    """Every option at once but the override (the 'full' instantiation), and the override
    with groups and a period (a superset of its lean form)."""
    pair = Pair("softmax", exclude_self=True, period=17)
    _check(pair, 70, 70, 40, torch.float32, bias=0.3, groups=torch.int64, ro=3, co=3)
    _check(Pair("rows", period=17), 40, 70, 24, torch.float32, groups=torch.int64, override=True)


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "pair,override",
    [(SOFTMAX, False), (SIGMOID, False), (Pair("rows"), True)],
    ids=["softmax", "sigmoid", "rows-override"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.usefixtures("kernel_target")
def test_strided_inputs_are_read_in_place(dtype, pair, override):
    """Column-major a and a column-strided view b give the contiguous copies' statistics
    bit for bit (the forward's order depends on the tiles only) and pass the rule: CLIP's
    sweep, SigLIP's and Symile "n"'s (rows with the positive logits given)."""
    stats, _, (a, b, _, _, pl, _) = _check(
        pair, 70, 50, 40, dtype, bias=0.2, strided=True, override=override
    )
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(0.2, device=DEVICE)
    pos = None if pl is None else pl.float()
    want = cuda_backend.pair_forward(
        a.contiguous(), b.contiguous(), s, bias, pair, positive_logits=pos
    )
    for got, ref in zip(stats, want):
        assert (got is None) == (ref is None)
        if got is not None:
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.usefixtures("kernel_target")
def test_forward_is_deterministic_and_backward_stable():
    """Two forwards are equal bit for bit (exclusive partials, fixed-order merges); in the
    backward dB (per-split slices summed in order), dscale and dbias (program partials
    summed in a fixed order) are too, dA (fp32 atomics) up to rounding."""
    g = torch.Generator().manual_seed(1)
    a, b = _unit(200, 40, torch.bfloat16, g), _unit(150, 40, torch.bfloat16, g)
    s, bias = torch.tensor(50.0, device=DEVICE), torch.tensor(-0.5, device=DEVICE)
    first = cuda_backend.pair_forward(a, b, s, bias, SOFTMAX)
    again = cuda_backend.pair_forward(a, b, s, bias, SOFTMAX)
    for x, y in zip(first, again):
        assert (x is None and y is None) or torch.equal(x, y)
    c = Coefs(**{k: v.float().to(DEVICE) for k, v in _coefs(SOFTMAX, 200, 150, g).items()})
    g1 = cuda_backend.pair_backward(a, b, s, bias, SOFTMAX, first, c)
    g2 = cuda_backend.pair_backward(a, b, s, bias, SOFTMAX, first, c)
    assert torch.equal(g1.db, g2.db)
    assert torch.equal(g1.dscale, g2.dscale) and torch.equal(g1.dbias, g2.dbias)
    torch.testing.assert_close(g1.da, g2.da)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_C and HAS_CUDA),
    reason=f"_C is not built: {_cuda_ext.C_UNAVAILABLE_REASON}"
    if not HAS_C
    else "needs a CUDA device; torch.cuda sees none",
)
def test_side_stream_and_workspace_reuse():
    """Runs on the current (non-default) stream of the inputs' device; the results equal
    the default stream's bit for bit (the workspace is allocated and used on that
    stream)."""
    g = torch.Generator().manual_seed(2)
    a, b = _unit(300, 64, torch.float16, g).cuda(), _unit(300, 64, torch.float16, g).cuda()
    s = torch.tensor(10.0, device="cuda")
    want = cuda_backend.pair_forward(a, b, s, None, SOFTMAX)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_backend.pair_forward(a, b, s, None, SOFTMAX)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in zip(got, want):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.usefixtures("kernel_target")
def test_float64_raises_type_error():
    a, s = torch.randn(4, 3, device=DEVICE, dtype=torch.float64), torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.pair_forward(a, a, s, None, SOFTMAX)
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.pair_backward(a, a, s, None, SOFTMAX, None, Coefs())


LARGE = [(1025, 1025, 513, torch.float32), (1025, 300, 513, torch.bfloat16)]


@pytest.mark.parametrize("n,m,d,dtype", LARGE, ids=["1025x1025x513-fp32", "1025x300x513-bf16"])
@pytest.mark.parametrize("pair", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid"])
@pytest.mark.usefixtures("kernel_target")
def test_large_sweeps(pair, n, m, d, dtype):
    """Many tiles and D chunks: 17 row blocks, 17 D chunks of 32 (the forward's G x H grid
    and the backward's row split at their GPU sizes on a GPU). Biases as the deleted CLIP
    and SigLIP kernel tests had them at these sizes: none for "softmax", -10 for
    "sigmoid"."""
    _check(pair, n, m, d, dtype, scale=14.3, bias=None if pair is SOFTMAX else -10.0)


def _dispatcher_has_cuda_clip() -> bool:
    import flashcontrast

    try:
        return flashcontrast.backend_for("clip", DEVICE, "cuda") == "cuda"
    except RuntimeError:
        return False


PUBLIC = [(7, 3, torch.float32, None), (300, 100, torch.float32, -1.0),
          (1025, 513, torch.bfloat16, 0.5)]  # fmt: skip


@pytest.mark.parametrize(("n", "d", "dtype", "bias"), PUBLIC)
@pytest.mark.usefixtures("kernel_target")
def test_public_clip_loss(n, d, dtype, bias):
    """flashcontrast.clip_loss(backend="cuda") on the target (on a GPU: the real kernels
    through the public API) against the dense loss by the rule."""
    import flashcontrast

    if not _dispatcher_has_cuda_clip():
        pytest.skip("the dispatcher does not route clip to the CUDA backend")
    g = torch.Generator().manual_seed(4)
    a, b = _unit(n, d, dtype, g), _unit(n, d, dtype, g)

    def run(fn, dt):
        x = a.detach().to(dt).requires_grad_()
        y = b.detach().to(dt).requires_grad_()
        st = torch.float64 if dt == torch.float64 else torch.float32
        args = [x, y, torch.tensor(14.3, device=DEVICE, dtype=st, requires_grad=True)]
        if bias is not None:
            args.append(torch.tensor(bias, device=DEVICE, dtype=st, requires_grad=True))
        loss = fn(*args)
        return [loss.detach(), *torch.autograd.grad(loss * 1.3, args)]

    def dense_clip(x, y, s, bb=None):
        logits = s * (x @ y.t()) + (0.0 if bb is None else bb)
        labels = torch.arange(x.shape[0], device=x.device)
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(logits, labels) + ce(logits.t(), labels))

    ours = run(lambda *x: flashcontrast.clip_loss(*x, backend="cuda"), dtype)
    assert flashcontrast.last_backend() == "cuda"
    same, exact = run(dense_clip, torch.float32), run(dense_clip, torch.float64)
    names = ("loss", "d_image", "d_text", "d_scale", "d_bias")[: len(ours)]
    assert_by_rule(names, ours, same, exact, dtype)


@pytest.mark.usefixtures("kernel_target")
def test_int32_and_int64_group_ids_agree():
    """Group ids travel as int64; int32 ids are converted and give the same sweep."""
    stats32, grads32, _ = _check(SOFTMAX, 70, 66, 24, torch.float32, groups=torch.int32)
    stats64, grads64, _ = _check(SOFTMAX, 70, 66, 24, torch.float32, groups=torch.int64)
    for x, y in zip(stats32, stats64):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(grads32.da, grads64.da)  # fp32 atomics: order may differ
    torch.testing.assert_close(grads32.db, grads64.db)


@pytest.mark.usefixtures("kernel_target")
def test_groups_with_period_mask_other_samples_only():
    """Groups and a period together (MV-InfoNCE with false negatives): a view's other views
    stay positives even in its group."""
    _check(MV, 69, 69, 20, torch.float32, groups=torch.int64)
    _check(Pair("rows", positives=False, exclude_self=True), 50, 50, 20, torch.float32,
           groups=torch.int32)  # fmt: skip


@pytest.mark.usefixtures("kernel_target")
def test_float32_out_dtype_is_the_rounding_of_the_16bit_output():
    g = torch.Generator().manual_seed(3)
    a, b = _unit(70, 40, torch.bfloat16, g), _unit(70, 40, torch.bfloat16, g)
    coefs = _coefs(SOFTMAX, 70, 70, g)
    _, g16 = _ours(a, b, 20.0, None, SOFTMAX, coefs, 0, 0, None, None, None)
    _, g32 = _ours(a, b, 20.0, None, SOFTMAX, coefs, 0, 0, None, None, None, torch.float32)
    assert g32.da.dtype == torch.float32 and g32.db.dtype == torch.float32
    for lo, hi in ((g16.da, g32.da), (g16.db, g32.db)):  # one bf16 rounding apart (atomics)
        torch.testing.assert_close(lo.float(), hi.to(torch.bfloat16).float(), rtol=2**-7,
                                   atol=1e-6 * hi.abs().max().item())  # fmt: skip
    with pytest.raises(TypeError, match="out_dtype"):
        _ours(a, b, 20.0, None, SOFTMAX, coefs, 0, 0, None, None, None, torch.float16)


@pytest.mark.usefixtures("kernel_target")
def test_empty_sides_need_no_kernel():
    """n = 0 or m = 0: empty statistics (-inf, 0) on the other side, zero gradients."""
    f32 = dict(dtype=torch.float32, device=DEVICE)
    a, b, s = torch.randn(0, 8, **f32), torch.randn(5, 8, **f32), torch.tensor(2.0, **f32)
    stats = cuda_backend.pair_forward(a, b, s, None, SOFTMAX)
    assert stats.row_max.shape == (0,) and torch.isneginf(stats.col_max).all()
    assert (stats.col_sum == 0).all()
    stats = cuda_backend.pair_forward(b, a, s, None, SOFTMAX)
    assert torch.isneginf(stats.row_max).all() and stats.col_max.shape == (0,)
    grads = cuda_backend.pair_backward(b, a, s, None, SOFTMAX, stats, Coefs(rows=torch.ones(5)))
    assert grads.da.shape == (5, 8) and torch.count_nonzero(grads.da) == 0


@pytest.mark.usefixtures("kernel_target")
def test_positives_are_subtracted_before_rounding():
    """Near convergence (P ~ Q on the positives), bf16 gradients of LSE - LSE+ are within a
    few bf16 roundings of max |da|: dS is formed in fp32 and rounded once. Rounding P and Q
    to bf16 apart (simulated here in float64) misses the same bound."""
    g = torch.Generator().manual_seed(5)
    n, d, scale = 48, 32, 20.0  # P_ii >= 0.99: the rounded-apart error is ~20x the bound
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.nn.functional.normalize(a + 0.1 * noise, dim=1)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    coefs = {
        "rows": torch.ones(n, dtype=torch.float64),
        "pos_rows": torch.ones(n, dtype=torch.float64),
    }
    pair = Pair("rows")
    _, grads = _ours(a16.to(DEVICE), b16.to(DEVICE), scale, None, pair, coefs, 0, 0, None, None,
                     None)  # fmt: skip
    _, exact = _dense(a16, b16, scale, None, pair, coefs, torch.float64, 0, 0, None, None, None)
    bound = 4 * 2**-8 * exact[0].abs().max().item()
    err = (grads.da.cpu().double() - exact[0]).abs().max().item()
    assert err <= bound, f"in-tile positives: da error {err:.3e} > {bound:.3e}"
    # The same gradient with P and Q rounded to bf16 apart before the subtraction.
    s = scale * a16.double() @ b16.double().t()
    p = torch.softmax(s, dim=1).to(torch.bfloat16).double()
    q = torch.eye(n, dtype=torch.float64).to(torch.bfloat16).double()  # one positive: Q = I
    apart = scale * (p - q) @ b16.double()
    err_apart = (apart - exact[0]).abs().max().item()
    assert err_apart > bound, f"the bound does not tell the two apart ({err_apart:.3e})"


# ----------------------------------------------------------------------------- workspaces


def _sms() -> int:
    if DEVICE == "cpu":
        return int(__import__("os").environ.get("FC_EMU_SMS", "4"))
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _params(c, pair: Pair, n: int, m: int, d: int, x: int = 0):
    return c.PairParams(
        a=8, b=8, n=n, m=m, d=d, a_stride0=d, a_stride1=1, b_stride0=d, b_stride1=1,
        dtype="float32", scale=8, epilogue=pair.epilogue, positives=pair.positives, x=x,
    )  # fmt: skip


def _want_forward(pair: Pair, n: int, m: int, sms: int) -> int:
    """pair.h's formula: the (G, H) grid of tiles.cuh's sweep_grid."""
    target, rb, cb = 2 * sms, math.ceil(n / 64), math.ceil(m / 64)
    g = max(1, min(rb, target))
    h = max(1, min(cb, max(1, target // g)))
    if pair.epilogue == "sigmoid":
        return g * h
    r = 2 if pair.positives else 1
    c = (2 if pair.positives else 1) if pair.epilogue == "softmax" else 0
    return 2 * r * h * n + 2 * c * g * m


def _want_backward(n: int, m: int, d: int, sms: int, panel: bool = False) -> int:
    """pair.h's formula; the panel path (PairParams.x) keeps the program partials only."""
    rb, cb = math.ceil(n / 64), math.ceil(m / 64)
    split = max(1, min(rb, math.ceil(2 * sms / cb), max(4, math.ceil(4 * n / m))))
    return (0 if panel else n * d + split * m * d) + 2 * cb * split


@pytest.mark.parametrize(
    "pair",
    [SOFTMAX, Pair("softmax", positives=False), MV, Pair("rows", positives=False), SIGMOID],
    ids=["softmax", "softmax-nopos", "rows", "rows-nopos", "sigmoid"],
)
@pytest.mark.usefixtures("kernel_target")
def test_workspace_sizes_follow_the_documented_formulas(pair):
    c, sms = cuda_backend._C, _sms()
    device = 0 if DEVICE == "cpu" else torch.cuda.current_device()
    for n, m, d in [(1, 1, 1), (130, 67, 97), (64, 3000, 8), (5000, 70, 16), (700, 700, 0)]:
        p = _params(c, pair, n, m, d)
        assert c.pair_forward_workspace_elems(p, device=device) == _want_forward(pair, n, m, sms)
        assert c.pair_backward_workspace_elems(p, device=device) == _want_backward(n, m, d, sms)
        panel = _params(c, pair, n, m, d, x=8)
        want = _want_backward(n, m, d, sms, panel=True)
        assert c.pair_backward_workspace_elems(panel, device=device) == want


@pytest.mark.usefixtures("kernel_target")
def test_short_workspace_is_refused_by_name():
    c = cuda_backend._C
    f32 = dict(dtype=torch.float32, device=DEVICE)
    a, s = torch.randn(70, 8, **f32), torch.tensor(1.0, **f32)
    stats = cuda_backend.pair_forward(a, a, s, None, SOFTMAX)
    p = c.PairParams(
        a=a.data_ptr(), b=a.data_ptr(), n=70, m=70, d=8, a_stride0=8, a_stride1=1,
        b_stride0=8, b_stride1=1, dtype="float32", scale=s.data_ptr(), epilogue="softmax",
        positives=True,
    )  # fmt: skip
    out = c.PairStats(**{k: getattr(stats, k).data_ptr() for k in stats._fields[:8]})
    need = c.pair_forward_workspace_elems(p, device=0 if DEVICE == "cpu" else a.device.index)
    ws = torch.empty(need, **f32)
    with pytest.raises(ValueError, match=r"_C\.pair_forward: workspace_elems is \d+ floats"):
        c.pair_forward(p, out, workspace=ws.data_ptr(), workspace_elems=need - 1, stream=0)


# ----------------------------------------------------------------------------- arguments


def _check_struct_errors(c) -> None:
    """The typed structs: wrong Python types, missing / unknown fields, bad names."""
    with pytest.raises(TypeError, match=r"PairParams\.n must be an int, got float"):
        pair_params(c, n=5.0)
    with pytest.raises(TypeError, match=r"PairParams\.a must be an int \(a device address"):
        pair_params(c, a="0x8")
    with pytest.raises(TypeError, match=r"PairParams\.positives must be a bool, got int"):
        pair_params(c, positives=1)
    with pytest.raises(TypeError, match=r"PairParams\.n must be an int, got bool"):
        pair_params(c, n=True)
    with pytest.raises(ValueError, match=r"PairParams\.a must be a device address in"):
        pair_params(c, a=-8)
    with pytest.raises(ValueError, match=r"PairParams\.dtype must be float32, float16 or"):
        pair_params(c, dtype="float64")
    with pytest.raises(ValueError, match=r"PairParams\.epilogue must be 'softmax', 'rows'"):
        pair_params(c, epilogue="lse")
    with pytest.raises(TypeError, match=r"PairParams\(\) has no field 'rows_offset'"):
        pair_params(c, rows_offset=3)
    with pytest.raises(TypeError, match=r"PairParams\(\) missing required field 'dtype'"):
        c.PairParams(a=8, b=8, n=5, m=6, d=3, a_stride0=3, a_stride1=1, b_stride0=3,
                     b_stride1=1, scale=8, epilogue="rows", positives=True)  # fmt: skip
    with pytest.raises(TypeError):  # positional arguments do not exist
        c.PairParams(8, 8)
    p = pair_params(c)
    with pytest.raises(TypeError, match=r"PairParams\.period must be an int, got str"):
        p.period = "3"
    with pytest.raises(AttributeError):  # no field can be invented by assignment
        p.row_ofset = 3
    p.period = 4
    assert p.period == 4 and p.dtype == "float32" and p.epilogue == "rows"
    assert "period=4" in repr(p)
    with pytest.raises(TypeError, match=r"PairStats\.row_max must be an int"):
        c.PairStats(row_max=1.5)
    with pytest.raises(TypeError, match=r"PairCoefs\.total must be an int"):
        c.PairCoefs(total=None)
    with pytest.raises(ValueError, match=r"PairGrads\.out_dtype must be float32"):
        c.PairGrads(da=8, db=8, dscale=8, dbias=8, out_dtype="int8")
    with pytest.raises(TypeError, match=r"GramParams\.k must be an int, got float"):
        c.GramParams(k=2.0)
    with pytest.raises(TypeError, match=r"TripleParams\(\) missing required field 'x'"):
        c.TripleParams(y=8, z=8, n=5, d=3, x_stride0=3, x_stride1=1, y_stride0=3, y_stride1=1,
                       z_stride0=3, z_stride1=1, dtype="float32", scale=8)  # fmt: skip


def _check_launch_errors(c) -> None:
    """Null pointers and out-of-range fields, refused by the C++ launchers before any CUDA
    call, naming the field (ValueError prefixed with the function)."""
    stats = c.PairStats(row_max=8, row_sum=8, pos_max=8, pos_sum=8)
    kw = dict(workspace=8, workspace_elems=1 << 20, stream=0)

    def refuses(pattern, params=None, st=stats):
        with pytest.raises(ValueError, match=r"_C\.pair_forward: " + pattern):
            c.pair_forward(params if params is not None else pair_params(c), st, **kw)

    refuses(r"PairParams\.scale is null", pair_params(c, scale=0))
    refuses(r"PairParams\.a is null", pair_params(c, a=0))
    refuses(r"PairParams\.n must be >= 1, got 0", pair_params(c, n=0))
    refuses(r"PairParams\.m must be >= 1", pair_params(c, m=-2))
    refuses(r"PairParams\.b_stride1 must be >= 0", pair_params(c, b_stride1=-1))
    refuses(r"PairParams\.period must be >= 0", pair_params(c, period=-1))
    refuses(r"PairParams\.row_offset must be >= 0", pair_params(c, row_offset=-5))
    refuses(r"PairParams\.col_groups is null while row_groups is set", pair_params(c, row_groups=8))
    refuses(r"PairParams\.positive_logits needs epilogue 'rows' with positives",
            pair_params(c, epilogue="softmax", positive_logits=8))  # fmt: skip
    refuses(r"PairStats\.pos_max is null", st=c.PairStats(row_max=8, row_sum=8))
    refuses(r"PairStats\.col_max must be null \(0\) without epilogue 'softmax'",
            st=c.PairStats(row_max=8, row_sum=8, pos_max=8, pos_sum=8, col_max=8))  # fmt: skip
    with pytest.raises(TypeError, match=r"_C\.pair_forward: workspace must be an int"):
        c.pair_forward(pair_params(c), stats, workspace=8.0, workspace_elems=64, stream=0)
    with pytest.raises(TypeError, match=r"_C\.pair_forward: stream must be an int"):
        c.pair_forward(pair_params(c), stats, workspace=8, workspace_elems=64, stream=None)
    with pytest.raises(TypeError):  # the addresses are keyword-only
        c.pair_forward(pair_params(c), stats, 8, 64, 0)
    grads = c.PairGrads(da=8, db=8, dscale=8, dbias=8, out_dtype="float32")
    with pytest.raises(ValueError, match=r"_C\.pair_backward: PairCoefs\.cols must be null"):
        c.pair_backward(pair_params(c), stats, c.PairCoefs(cols=8), grads, **kw)
    with pytest.raises(ValueError, match=r"_C\.pair_backward: PairStats\.row_max is null"):
        c.pair_backward(pair_params(c), c.PairStats(), c.PairCoefs(rows=8), grads, **kw)
    with pytest.raises(ValueError, match=r"_C\.pair_backward: PairGrads\.dpos is null"):
        c.pair_backward(pair_params(c, positive_logits=8), stats, c.PairCoefs(), grads, **kw)
    with pytest.raises(ValueError, match=r"_C\.pair_backward: PairGrads\.out_dtype must be"):
        bad = c.PairGrads(da=8, db=8, dscale=8, dbias=8, out_dtype="float16")
        c.pair_backward(pair_params(c, dtype="bfloat16"), stats, c.PairCoefs(), bad, **kw)
    with pytest.raises(ValueError, match=r"_C\.pair_backward: PairCoefs\.total is null"):
        c.pair_backward(
            pair_params(c, epilogue="sigmoid"), c.PairStats(), c.PairCoefs(), grads, **kw
        )
    gram = gram_params(c)
    outs = dict(row_lse=8, col_lse=8, diag=8, row_sum=8, col_sum=8, **kw)
    with pytest.raises(ValueError, match=r"_C\.gram_forward: GramParams\.k \(others per sample"):
        c.gram_forward(gram, **outs)
    gram.k, gram.det_h = 2, 0
    with pytest.raises(ValueError, match=r"_C\.gram_forward: GramParams\.det_h is null"):
        c.gram_forward(gram, **outs)
    gram.det_h = 8
    with pytest.raises(ValueError, match=r"_C\.gram_forward: diag is null"):
        c.gram_forward(gram, **{**outs, "diag": 0})
    with pytest.raises(TypeError, match=r"_C\.gram_backward: label_smoothing must be a float"):
        c.gram_backward(gram, row_lse=8, col_lse=8, grad=8, label_smoothing="0.1", d_anchor=8,
                        d_others_u=8, dscale=8, col_tt=8, col_uu=8, **kw)  # fmt: skip
    triple = triple_params(c, z=0)
    with pytest.raises(ValueError, match=r"_C\.symile_n2_forward: TripleParams\.z is null"):
        c.symile_n2_forward(triple, row_lse=8, **kw)
    triple.z, triple.n = 8, 0
    with pytest.raises(ValueError, match=r"_C\.symile_n2_backward: TripleParams\.n must be >= 1"):
        c.symile_n2_backward(triple, row_lse=8, grad_rows=8, dx=8, dy=8, dz=8, dscale=8, **kw)
    triple.n, triple.m = 5, 0  # m: the rows of y and z (default -1: m = n)
    with pytest.raises(ValueError, match=r"_C\.symile_n2_forward: TripleParams\.m must be >= 1"):
        c.symile_n2_forward(triple, row_lse=8, **kw)


@pytest.mark.usefixtures("kernel_target")
def test_typed_structs_refuse_bad_fields_by_name():
    _check_struct_errors(cuda_backend._C)


@pytest.mark.usefixtures("kernel_target")
def test_launchers_refuse_bad_fields_by_name():
    _check_launch_errors(cuda_backend._C)


@pytest.mark.usefixtures("kernel_target")
def test_backend_is_a_pair_capability():
    assert "pair" in cuda_backend.objectives_of(cuda_backend._C)
    assert "pair" in cuda_backend.OBJECTIVES
    assert "pair" not in cuda_backend.objectives_of(None)


# ----------------------------------------------------------------------------- no GPU


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_cpu_tensors_raise_clearly():
    """With or without _C: CPU tensors get a RuntimeError with the reason, never a crash."""
    x, s = torch.randn(5, 3), torch.tensor(1.0)
    ids = torch.arange(5)
    calls = [
        lambda: cuda_backend.pair_forward(x, x, s, None, SOFTMAX),
        lambda: cuda_backend.pair_forward(x, x, s, s, SIGMOID, row_groups=ids, col_groups=ids),
        lambda: cuda_backend.pair_backward(x, x, s, None, MV, None, Coefs(rows=torch.ones(5))),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"cannot run .*(needs CUDA tensors|not built|no )"):
            call()


@pytest.mark.skipif(not HAS_C, reason=f"_C is not built: {_cuda_ext.C_UNAVAILABLE_REASON}")
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_real_module_without_gpu():
    """The real _C: the same refusals by name before any CUDA call, CUDA failures (no
    device) as RuntimeErrors naming the call, and the backend refusing CPU tensors."""
    c = _cuda_ext._C
    _check_struct_errors(c)
    _check_launch_errors(c)
    with pytest.raises(RuntimeError, match=r"_C\.pair_forward_workspace_elems: .*failed"):
        c.pair_forward_workspace_elems(pair_params(c), device=0)
    with pytest.raises(RuntimeError, match=r"_C\.pair_forward: .*failed"):
        c.pair_forward(pair_params(c), c.PairStats(row_max=8, row_sum=8, pos_max=8, pos_sum=8),
                       workspace=8, workspace_elems=64, stream=0)  # fmt: skip
    x, s = torch.randn(5, 3), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_backend.pair_forward(x, x, s, None, SOFTMAX)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_backend.pair_backward(x, x, s, None, SOFTMAX, None, Coefs())
