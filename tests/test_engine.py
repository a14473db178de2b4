"""The pair engine's contract (flashcontrast/backends/pair.py), every backend against the
dense float64 oracle (tests/engine_oracle.py) by the verification rule: every epilogue,
positive structure, exclusion, group mask, positive-logit override, rectangular blocks at
offsets (how the process-group losses call it), empty rows, extreme scales; and the
merges across blocks that distributed and blockwise sweeps rely on.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_oracle import dense, stats_lse
from flashcontrast._ops import backend_module
from flashcontrast.backends.pair import Coefs, Pair, lse, merge_lse
from verification import CUDA_ENGINE, ENGINE_BACKENDS, TRITON_ENGINE, assert_by_rule


@dataclasses.dataclass
class Case:
    pair: Pair
    n: int
    m: int
    row_offset: int = 0
    col_offset: int = 0
    groups: bool = False
    override: bool = False
    bias: bool = False
    scale: float = 10.0
    coefs: tuple = ("rows", "pos_rows", "cols", "pos_cols")


SOFTMAX, ROWS = Pair("softmax"), Pair("rows")
CASES = {
    "clip": Case(SOFTMAX, 37, 37, bias=True),
    "clip-block": Case(SOFTMAX, 13, 40, row_offset=20),  # a rank's rows vs all columns
    "clip-shard-away": Case(SOFTMAX, 13, 9, row_offset=20, col_offset=5),  # no positives
    "clip-shard-overlap": Case(SOFTMAX, 13, 17, row_offset=20, col_offset=15),
    "clip-groups": Case(SOFTMAX, 41, 41, groups=True, bias=True),
    "infonce-rows": Case(ROWS, 30, 45, coefs=("rows", "pos_rows")),
    "mv-infonce": Case(
        Pair("rows", exclude_self=True, period=11), 33, 33, coefs=("rows", "pos_rows")
    ),
    "mv-infonce-block": Case(
        Pair("rows", exclude_self=True, period=11),
        12,
        33,
        row_offset=14,
        groups=True,
        coefs=("rows", "pos_rows"),
    ),
    "mv-dhel-view": Case(
        Pair("rows", positives=False, exclude_self=True), 29, 29, groups=True, coefs=("rows",)
    ),
    "softmax-self": Case(Pair("softmax", exclude_self=True, period=7), 21, 21),
    "siglip": Case(Pair("sigmoid"), 35, 35, bias=True, coefs=("total",)),
    "siglip-negatives": Case(Pair("sigmoid", positives=False), 19, 27, bias=True, coefs=("total",)),
    "siglip-groups": Case(Pair("sigmoid"), 23, 23, groups=True, bias=True, coefs=("total",)),
    "symile-override": Case(ROWS, 31, 31, override=True, coefs=("rows", "pos_rows")),
    "clip-scale-1e4": Case(SOFTMAX, 33, 33, scale=1e4),
}


def _inputs(case: Case, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(case.n, d, generator=g), dim=1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(case.m, d, generator=g), dim=1).to(dtype)
    rg = cg = pl = None
    if case.groups:
        ids = torch.randint(
            0, 6, (case.row_offset + case.n + case.col_offset + case.m,), generator=g
        )
        rg = ids[case.row_offset : case.row_offset + case.n]
        cg = ids[case.col_offset : case.col_offset + case.m]
    if case.override:
        pl = torch.randn(case.n, generator=g, dtype=torch.float64) * 3
    coefs = {
        k: torch.rand(
            case.n if k in ("rows", "pos_rows") else case.m, generator=g, dtype=torch.float64
        )
        + 0.5
        for k in case.coefs
        if k != "total"
    }
    if "total" in case.coefs:
        coefs["total"] = torch.tensor(0.7, dtype=torch.float64)
    return a, b, rg, cg, pl, coefs


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _oracle(case, a, b, rg, cg, pl, coefs, dtype):
    """(outputs, names) of the dense contract in ``dtype``."""
    leaves = [a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()]
    scale = torch.tensor(case.scale, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=dtype, requires_grad=True) if case.bias else None
    pos = None if pl is None else pl.to(dtype).requires_grad_()
    c = {k: v.to(dtype) for k, v in coefs.items()}
    stats, loss = dense(
        leaves[0],
        leaves[1],
        scale,
        bias,
        case.pair,
        c,
        case.row_offset,
        case.col_offset,
        rg,
        cg,
        pos,
    )
    wrt = [
        *leaves,
        scale,
        *([bias] if bias is not None else []),
        *([pos] if pos is not None else []),
    ]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    names = sorted(stats)
    return [stats[k].detach() for k in names] + list(grads), names


def _ours(module, case, a, b, rg, cg, pl, coefs, **extra):
    acc = _acc(a.dtype)
    scale = torch.tensor(case.scale, dtype=acc)
    bias = torch.tensor(-1.5, dtype=acc) if case.bias else None
    pos = None if pl is None else pl.to(acc)
    kw = dict(
        row_offset=case.row_offset,
        col_offset=case.col_offset,
        row_groups=rg,
        col_groups=cg,
        positive_logits=pos,
        **extra,
    )
    stats = module.pair_forward(a, b, scale, bias, case.pair, **kw)
    c = Coefs(**{k: v.to(acc) for k, v in coefs.items()})
    grads = module.pair_backward(a, b, scale, bias, case.pair, stats, c, **kw)
    out = stats_lse(stats)
    g = [grads.da, grads.db, grads.dscale]
    if case.bias:
        g.append(grads.dbias)
    if pl is not None:
        g.append(grads.dpos)
    return out, g


def _finite_or_equal_inf(got, want):
    """Empty sets: -inf in both, then compared as 0."""
    both = torch.isneginf(got.double()) & torch.isneginf(want.double())
    assert torch.equal(torch.isneginf(got.double()), torch.isneginf(want.double()))
    return got.double().masked_fill(both, 0.0), want.double().masked_fill(both, 0.0)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_contract_against_the_dense_oracle(backend, dtype, name):
    case = CASES[name]
    if case.scale > 100 and dtype != torch.float32:
        pytest.skip("logit scale 1e4 is a float32 accuracy case (16-bit logits overflow it)")
    _assert_contract(backend_module(backend, "pair"), case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", [k for k, c in CASES.items() if c.scale <= 100])
def test_torch_panels_at_their_boundaries(dtype, rows, name):
    """The panel path (the "torch" backend) with one-row panels and with 3-row panels that
    do not divide n, the 16-bit ones with dS rounded to the inputs' dtype per panel."""
    case = CASES[name]  # n = 37, 13, 41, ...: 3 divides four of them only
    module = backend_module("torch", "pair")
    _assert_contract(module, case, dtype, max_block_elements=rows * case.m)


_PANEL_RUNS = [
    *((name, dtype, 5) for name, c in CASES.items() if c.scale <= 100 for dtype in _DTYPES),
    *((name, torch.float32, rows) for name in ("clip-groups", "siglip") for rows in (1, None)),
    ("clip-scale-1e4", torch.float32, 5),
]


@pytest.mark.parametrize(("name", "dtype", "rows"), _PANEL_RUNS)
def test_triton_panel_path_against_the_dense_oracle(name, dtype, rows):
    """The Triton backend's panel path (GEMMs by torch, the fused kernels' epilogues
    reading X and writing dS): 5-row panels (5 divides none of the n here but 35), one-row
    panels and one panel for two cases (the interpreter's time grows with the panels)."""
    from flashcontrast.backends.triton import panel

    case = CASES[name]
    _assert_contract(panel, case, dtype, max_block_elements=rows and rows * case.m)


# The CUDA panel path under the emulator: its kernels with PairParams.x / PairGrads.ds.
# The emulator runs every thread of every block, so fewer runs than Triton's: each
# epilogue family in 16-bit (fp16's unit included) and fp32, 5-row and one-row panels.
_CUDA_PANEL_RUNS = [
    *((name, dtype, 5) for name in ("clip-groups", "siglip", "mv-infonce", "symile-override")
      for dtype in _DTYPES),
    ("clip-groups", torch.float32, 1),
    ("clip-scale-1e4", torch.float32, 5),
]  # fmt: skip


@pytest.mark.parametrize("backend", CUDA_ENGINE)
@pytest.mark.parametrize(("name", "dtype", "rows"), _CUDA_PANEL_RUNS)
def test_cuda_panel_path_against_the_dense_oracle(backend, name, dtype, rows):
    """The CUDA backend's panel path (GEMMs by torch, csrc's pair kernels reading X and
    writing dS) at panel boundaries, on the emulator (the ``backend`` parameter installs it)."""
    from flashcontrast.backends import cuda_panel

    case = CASES[name]
    _assert_contract(cuda_panel, case, dtype, max_block_elements=rows * case.m)


@pytest.mark.parametrize("backend", [*TRITON_ENGINE, *CUDA_ENGINE])
@pytest.mark.parametrize("name", ["clip-groups", "siglip", "symile-override"])
def test_panel_epilogues_read_x_not_the_features(backend, name):
    """Given X = 0 beside real features, the panel path's kernels compute the sweep of
    zero logits (that of a = 0 on the fused path): they read X, never a b^T."""
    from flashcontrast.backends._pair_entry import Sweep

    module = backend_module(backend, "pair")
    if backend == "triton":
        from flashcontrast.backends.triton.panel import EPILOGUES
    else:
        from flashcontrast.backends.cuda_panel import EPILOGUES
    case = CASES[name]
    a, b, rg, cg, pl, coefs = _inputs(case, 20, torch.float32, 0)
    scale = torch.tensor(case.scale)
    bias = torch.tensor(-1.5) if case.bias else None
    sweep = Sweep(a, b, scale, bias, case.pair, case.row_offset, case.col_offset, rg, cg, pl,
                  None)  # fmt: skip
    zero = sweep._replace(a=torch.zeros_like(a))
    x = torch.zeros((a.shape[0], b.shape[0]))
    got, want = EPILOGUES.forward(sweep, x), module._pair_forward(zero)
    for field in want._fields:
        if getattr(want, field) is not None:
            torch.testing.assert_close(getattr(got, field), getattr(want, field))
    c = Coefs(**coefs)
    unit, token = EPILOGUES.unit(sweep, c)
    ds = torch.empty_like(x)
    g_x = EPILOGUES.backward(sweep, want, c, x, ds, token)
    g_0 = module._pair_backward(zero, want, c, torch.float32)
    torch.testing.assert_close(g_x.dbias, g_0.dbias)  # sum dS: every entry's weight
    u = 1.0 if unit is None else unit
    torch.testing.assert_close(ds @ b * (scale * u), g_0.da)  # dA = s dS B from the dS written
    if pl is not None:
        torch.testing.assert_close(g_x.dpos, g_0.dpos)


def _assert_contract(module, case: Case, dtype: torch.dtype, **extra) -> None:
    """Statistics and gradients of ``module``'s sweep against the dense float64 oracle by
    the rule, at two D, the gradients in the inputs' dtype."""
    for seed, d in ((0, 20), (1, 7)):
        a, b, rg, cg, pl, coefs = _inputs(case, d, dtype, seed)
        stats, grads = _ours(module, case, a, b, rg, cg, pl, coefs, **extra)
        exact, names = _oracle(case, a, b, rg, cg, pl, coefs, torch.float64)
        same, _ = _oracle(
            case, a, b, rg, cg, pl, coefs, _acc(dtype) if dtype == torch.float32 else dtype
        )
        assert sorted(stats) == names
        got = [stats[k] for k in names] + grads
        pairs = [_finite_or_equal_inf(g, e) for g, e in zip(got, exact)]
        same = [_finite_or_equal_inf(s, e)[0] for s, e in zip(same, exact)]
        labels = (
            names
            + ["da", "db", "dscale"]
            + (["dbias"] if case.bias else [])
            + (["dpos"] if pl is not None else [])
        )
        assert_by_rule(labels, [p[0] for p in pairs], same, [p[1] for p in pairs], dtype)
        assert grads[0].dtype == dtype and grads[1].dtype == dtype


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_empty_rows_have_no_statistic_and_no_gradient(backend):
    """Every other sample in a row's group and no positives: the row's set is empty, its
    logsumexp -inf, its softmax weights 0 (never NaN)."""
    module = backend_module(backend, "pair")
    pair = Pair("rows", positives=False, exclude_self=True)
    a = torch.randn(6, 4)
    groups = torch.zeros(6, dtype=torch.int64)  # one group: no row has a negative
    stats = module.pair_forward(
        a, a, torch.tensor(2.0), None, pair, row_groups=groups, col_groups=groups
    )
    assert torch.isneginf(stats.row_max).all() and (stats.row_sum == 0).all()
    grads = module.pair_backward(
        a,
        a,
        torch.tensor(2.0),
        None,
        pair,
        stats,
        Coefs(rows=torch.ones(6)),
        row_groups=groups,
        col_groups=groups,
    )
    assert torch.count_nonzero(grads.da) == 0 and torch.count_nonzero(grads.db) == 0


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_column_and_row_splits_merge_to_the_whole(backend):
    """The statistics of a sweep split into column shards (the ring) or row blocks (the
    ranks' partial column statistics) merge, by merge_lse, into the whole sweep's."""
    module = backend_module(backend, "pair")
    a, b = torch.randn(19, 8), torch.randn(23, 8)
    s = torch.tensor(3.0)
    whole = module.pair_forward(a, b, s, None, SOFTMAX)
    left = module.pair_forward(a, b[:10], s, None, SOFTMAX)
    right = module.pair_forward(a, b[10:], s, None, SOFTMAX, col_offset=10)
    m, t = merge_lse(left.row_max, left.row_sum, right.row_max, right.row_sum)
    torch.testing.assert_close(lse(m, t), lse(whole.row_max, whole.row_sum))
    m, t = merge_lse(left.pos_max, left.pos_sum, right.pos_max, right.pos_sum)
    torch.testing.assert_close(lse(m, t), lse(whole.pos_max, whole.pos_sum))
    top = module.pair_forward(a[:7], b, s, None, SOFTMAX)
    bottom = module.pair_forward(a[7:], b, s, None, SOFTMAX, row_offset=7)
    m, t = merge_lse(top.col_max, top.col_sum, bottom.col_max, bottom.col_sum)
    torch.testing.assert_close(lse(m, t), lse(whole.col_max, whole.col_sum))
    # the sum over the blocks' gradients is the whole sweep's
    c = Coefs(
        rows=torch.full((19,), 0.1),
        pos_rows=torch.full((19,), 0.1),
        cols=torch.full((23,), 0.2),
        pos_cols=torch.full((23,), 0.2),
    )
    g_all = module.pair_backward(a, b, s, None, SOFTMAX, whole, c)
    g_left = module.pair_backward(
        a,
        b[:10],
        s,
        None,
        SOFTMAX,
        whole._replace(
            col_max=whole.col_max[:10],
            col_sum=whole.col_sum[:10],
            cpos_max=whole.cpos_max[:10],
            cpos_sum=whole.cpos_sum[:10],
        ),
        c._replace(cols=c.cols[:10], pos_cols=c.pos_cols[:10]),
    )
    g_right = module.pair_backward(
        a,
        b[10:],
        s,
        None,
        SOFTMAX,
        whole._replace(
            col_max=whole.col_max[10:],
            col_sum=whole.col_sum[10:],
            cpos_max=whole.cpos_max[10:],
            cpos_sum=whole.cpos_sum[10:],
        ),
        c._replace(cols=c.cols[10:], pos_cols=c.pos_cols[10:]),
        col_offset=10,
    )
    torch.testing.assert_close(g_left.da + g_right.da, g_all.da)
    torch.testing.assert_close(torch.cat([g_left.db, g_right.db]), g_all.db)
    torch.testing.assert_close(g_left.dscale + g_right.dscale, g_all.dscale)


def _check_against_oracle(module, case, a, b, rg, cg, pl, coefs):
    """Our sweep on these inputs against the dense oracle by the rule (float32 inputs)."""
    stats, grads = _ours(module, case, a, b, rg, cg, pl, coefs)
    exact, names = _oracle(case, a, b, rg, cg, pl, coefs, torch.float64)
    same, _ = _oracle(case, a, b, rg, cg, pl, coefs, torch.float32)
    got = [stats[k] for k in names] + grads
    for name, t in zip([*names, "da", "db", "dscale", "dbias"], got):
        assert not torch.isnan(t).any() and not torch.isposinf(t).any(), f"{name}: {t}"
    pairs = [_finite_or_equal_inf(g, e) for g, e in zip(got, exact)]
    same = [_finite_or_equal_inf(s, e)[0] for s, e in zip(same, exact)]
    labels = names + ["da", "db", "dscale"] + (["dbias"] if case.bias else [])
    assert_by_rule(labels, [p[0] for p in pairs], same, [p[1] for p in pairs], torch.float32)
    return stats, grads


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 33])
def test_extreme_scale_on_unnormalised_features(backend, n):
    """s = 1e4 on unnormalised features (|S| up to ~1e5) with a near one-hot row next to
    ordinary ones: no inf - inf anywhere (every statistic and gradient finite), and the
    rule against the dense oracle. (Ported from the deleted Triton CLIP kernel tests.)"""
    module = backend_module(backend, "pair")
    case = Case(SOFTMAX, n, n, bias=True, scale=1e4)
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    b[0] = a[0]
    coefs = {k: torch.rand(n, generator=g, dtype=torch.float64) + 0.5 for k in case.coefs}
    stats, grads = _check_against_oracle(module, case, a, b, None, None, None, coefs)
    for t in list(stats.values()) + grads:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", ["clip-groups", "mv-infonce-block", "siglip", "symile-override"])
def test_outputs_do_not_alias(backend, name):
    """Every statistic and gradient is a tensor of its own storage: outputs of a
    torch.library custom op may not alias one another (or the inputs)."""
    case = CASES[name]
    module = backend_module(backend, "pair")
    a, b, rg, cg, pl, coefs = _inputs(case, 20, torch.float32, 0)
    acc = torch.float32
    kw = dict(row_offset=case.row_offset, col_offset=case.col_offset, row_groups=rg,
              col_groups=cg, positive_logits=None if pl is None else pl.to(acc))  # fmt: skip
    scale = torch.tensor(case.scale)
    bias = torch.tensor(-1.5) if case.bias else None
    stats = module.pair_forward(a, b, scale, bias, case.pair, **kw)
    c = Coefs(**{k: v.to(acc) for k, v in coefs.items()})
    grads = module.pair_backward(a, b, scale, bias, case.pair, stats, c, **kw)
    outs = [t for t in (*stats, *grads) if t is not None]
    storages = [t.untyped_storage().data_ptr() for t in outs]
    inputs = {t.untyped_storage().data_ptr() for t in (a, b, scale)}
    assert len(set(storages)) == len(storages), "two outputs share storage"
    assert not inputs & set(storages), "an output aliases an input"


def _assert_same_fields(got: tuple, want: tuple) -> None:
    """Two PairStats (or PairGrads): the same fields present, each equal."""
    for x, y in zip(got, want):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y)


def _blocks_match_one_block(a, b, s, pair: Pair, coefs: Coefs, block_elements: int, **kw):
    """The torch engine with blocks of ``block_elements`` logits against one big block, a
    (n, d) against b (m, d): the same statistics, then the same gradients; returns the small
    blocks' PairGrads."""
    from flashcontrast.backends.blockwise import pair as torch_pair

    small = torch_pair.pair_forward(a, b, s, None, pair, **kw, max_block_elements=block_elements)
    big = torch_pair.pair_forward(a, b, s, None, pair, **kw)
    _assert_same_fields(small, big)
    g_small = torch_pair.pair_backward(
        a, b, s, None, pair, small, coefs, **kw, max_block_elements=block_elements
    )
    _assert_same_fields(g_small, torch_pair.pair_backward(a, b, s, None, pair, big, coefs, **kw))
    return g_small


def test_torch_small_blocks_with_groups():
    """The blockwise engine with blocks of two rows against a group that spans the first 12
    rows (every early block's rows have one allowed column in that group): the statistics
    equal the dense masked LSEs and the gradients those of one big block. (Ported from the
    deleted blockwise CLIP test of tests/test_clip_groups.py.)"""
    from flashcontrast.backends.blockwise import pair as torch_pair

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(23, 7, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(23, 7, generator=g, dtype=torch.float64), dim=1)
    ids = torch.tensor([0] * 12 + list(range(1, 12)))
    s = torch.tensor(40.0, dtype=torch.float64)
    kw = dict(row_groups=ids, col_groups=ids)
    small = torch_pair.pair_forward(a, b, s, None, SOFTMAX, **kw, max_block_elements=23 * 2)
    dense_s = (s * (a @ b.T)).masked_fill(
        (ids[:, None] == ids[None, :]) & ~torch.eye(23, dtype=torch.bool), float("-inf")
    )
    torch.testing.assert_close(lse(small.row_max, small.row_sum), dense_s.logsumexp(1))
    torch.testing.assert_close(lse(small.col_max, small.col_sum), dense_s.logsumexp(0))
    torch.testing.assert_close(lse(small.pos_max, small.pos_sum), dense_s.diagonal())
    c = Coefs(**{k: torch.full((23,), 0.3, dtype=torch.float64) for k in Coefs._fields[:4]})
    _blocks_match_one_block(a, b, s, SOFTMAX, c, 23 * 2, **kw)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("epilogue", ["softmax", "rows", "sigmoid"])
def test_an_empty_side_gives_empty_statistics_and_zero_gradients(backend, epilogue):
    """A rank's empty shard: rows against 0 columns (and 0 rows against columns) give the
    empty set's (-inf, 0) per row, nothing per column, a 0 total and zero gradients."""
    module = backend_module(backend, "pair")
    pair = Pair(epilogue)
    scale = torch.tensor(3.0)
    for n, m in ((5, 0), (0, 4)):
        a, b = torch.randn(n, 8), torch.randn(m, 8)
        st = module.pair_forward(a, b, scale, None, pair)
        if epilogue == "sigmoid":
            assert st.total.item() == 0.0
            coefs = Coefs(total=torch.tensor(1.0))
        else:
            assert st.row_max.shape == (n,) and torch.isneginf(st.row_max).all()
            assert (st.row_sum == 0).all()
            coefs = Coefs(rows=torch.ones(n), pos_rows=torch.ones(n))
            if epilogue == "softmax":
                assert st.col_max.shape == (m,) and torch.isneginf(st.col_max).all()
                coefs = coefs._replace(cols=torch.ones(m), pos_cols=torch.ones(m))
        g = module.pair_backward(a, b, scale, None, pair, st, coefs)
        assert g.da.shape == (n, 8) and g.db.shape == (m, 8)
        assert g.da.abs().sum().item() == 0.0 and g.db.abs().sum().item() == 0.0
        assert g.dscale.item() == 0.0


@pytest.mark.parametrize("epilogue", ["softmax", "rows"])
def test_torch_small_blocks_with_positive_logits_and_offsets(epilogue):
    """Many row blocks, the positive-logit override (Symile "n") and a row offset: blocks
    of three rows give the statistics and gradients (dpos included) of one big block. (A
    loop variable once shadowed the block size when dpos was written: the second block
    then failed; the single-block tests could not see it.)"""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(17, 5, generator=g, dtype=torch.float64)
    b = torch.randn(25, 5, generator=g, dtype=torch.float64)
    pos = torch.randn(17, generator=g, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    pair = Pair("rows") if epilogue == "rows" else SOFTMAX
    kw = dict(row_offset=4, positive_logits=pos) if epilogue == "rows" else dict(row_offset=4)
    n_coefs = 2 if epilogue == "rows" else 4
    sizes = (17, 17, 25, 25)
    c = Coefs(**{
        k: torch.linspace(0.1, 0.9, sizes[i], dtype=torch.float64)
        for i, k in enumerate(Coefs._fields[:n_coefs])
    })  # fmt: skip
    g_small = _blocks_match_one_block(a, b, s, pair, c, 25 * 3, **kw)
    if epilogue == "rows":
        assert g_small.dpos is not None and g_small.dpos.abs().sum() > 0
