"""flashcontrast.distributed.gram_loss on the backends' rectangular GRAM kernels.

The distributed GRAM computes no tile itself: every block is a call of the backend's
gram_forward / gram_backward for this rank's rows against one column block, row i's own
column at ``row_offset + i`` (backends/blockwise/gram.py). First the rectangular contract
in one process: rows and columns split into blocks at every offset, the partial statistics
merged (logaddexp, +), equal the square call's (the single-process loss's) statistics and
gradients. Then the loss over W = 1, 2, 3 gloo ranks (and 4 on "cuda";
tests/dist_harness.py) with uneven shards, an empty one for W > 1, both strategies, label
smoothing, ``grad_scaling="sum"`` and an upstream gradient != 1, against the
single-process loss by the verification rule (float64 reference; the float32 one as the
same-dtype reference):

* well-conditioned unit features;
* degenerate ones: a duplicated modality (o^2_j = o^1_j, or -0.7 o^1_j) for some
  samples, whose volumes are within rounding of 0: one process takes them as exactly 0
  with derivative 0 (the degeneracy floor, objectives/gram.py), so must every rank (the
  tiles the ranks used to compute themselves had no floor: sqrt of rounding noise,
  gradients ~1/sqrt of it; their loss misses the rule here);
* a NaN in one sample's anchor, or in one of its others: the loss is NaN on every rank,
  as in one process (tests/test_nan_propagation.py); the old tiles mapped a NaN det to 0.

On "torch", "triton" (the interpreter: TRITON_INTERPRET=1, set by conftest.py and
inherited by the spawned ranks) and "cuda" (csrc/'s kernels on the CPU, tests/cuda_emulator:
each spawned rank installs the emulated extension itself, as in
tests/test_distributed_engine.py). Sizes are small (N <= 13, D = 8, M = 3): one spawn per
world size and backend.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist_harness import spawn
from flashcontrast import gram_loss
from flashcontrast._ops import backend_module
from flashcontrast.backends.gram import GramBlock, GramCoefs
from flashcontrast.objectives.gram import (
    column_constants_from_gram,
    floor_from_gram,
    gram_matrices,
)
from verification import CUDA_EMULATED, TRITON, assert_by_rule, gram_det_rounding_allowance

D, M = 8, 3
SCALE = 7.0
GRAD_OUT = 0.7
SIZES = {1: [7], 2: [0, 9], 3: [5, 0, 8], 4: [3, 6, 0, 4]}  # uneven, an empty shard for W > 1
# (strategy, label_smoothing, data)
CASES = (
    ("gather", 0.1, "unit"),
    ("ring", 0.0, "unit"),
    ("gather", 0.1, "duplicate"),
    ("ring", 0.1, "duplicate"),
)
#: The backends whose GRAM kernels take the rectangular form (the distributed loss's).
RECTANGULAR = ["torch", TRITON, CUDA_EMULATED]


def _case(backend, *values, first: bool = False):
    """pytest.param of ``values`` and the backend (a name or a pytest.param of one,
    whose marks it keeps), the backend first or last."""
    name, marks = (backend, ()) if isinstance(backend, str) else (*backend.values, backend.marks)
    return pytest.param(*((name, *values) if first else (*values, name)), marks=marks)


#: (world, backend): W = 1..3 on each, W = 4 on "cuda" too (the emulator is the cheapest).
WORLDS = [_case(b, w) for b in RECTANGULAR for w in (1, 2, 3)] + [_case(CUDA_EMULATED, 4)]
NAN_CASES = (("gather", "anchor"), ("ring", "anchor"), ("gather", "other"), ("ring", "other"))


def _data(n: int, kind: str, seed: int) -> torch.Tensor:
    """(M, N, D) unit features, float32; "duplicate": o^2_j = o^1_j for j = 0 mod 4 and
    the collinear copy o^2_j = -0.7 o^1_j for j = 1 mod 4 (whose computed det are rounding
    noise, not 0: test_degenerate_inputs_need_the_floor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(M, n, D, generator=g), dim=-1)
    if kind == "duplicate":
        x[2, ::4] = x[1, ::4]
        x[2, 1::4] = -0.7 * x[1, 1::4]
    return x


def _key(case: tuple) -> str:
    return "/".join(map(str, case))


# ----------------------------------------------------------------------------- the contract


def _consts(others: torch.Tensor):
    gram = gram_matrices(others)
    det_h, adj_h = column_constants_from_gram(gram)
    return det_h, adj_h, floor_from_gram(gram, gram.dtype)


#: (N, row cuts, column cuts): within one tile of every backend, and across the CUDA
#: kernels' 64-row and 32-column tiles (row offsets from -100 to 70, blocks whose own
#: columns are partly, wholly or not at all inside).
CUTS = {
    "small": (13, [(0, 5), (5, 13)], [(0, 4), (4, 4), (4, 9), (9, 13)]),
    "tiles": (130, [(0, 70), (70, 130)], [(0, 45), (45, 45), (45, 100), (100, 130)]),
}
BLOCK_CASES = [_case(b, c, first=True) for b in RECTANGULAR for c in ("small",)] + [
    _case(b, "tiles", first=True) for b in ("torch", CUDA_EMULATED)
]


@pytest.mark.parametrize(("backend", "cuts"), BLOCK_CASES)
@pytest.mark.parametrize("kind", ["unit", "duplicate"])
def test_rectangular_blocks_merge_to_the_square_call(kind, backend, cuts):
    """Rows and columns split as CUTS (an empty column block too): each (row block,
    column block) call with row_offset = row start - column start, merged, gives the
    square call's five statistics and, from the merged LSEs with total = N, its five
    gradients (sums over the blocks), on each backend with the rectangular form."""
    module = backend_module(backend, "gram")
    n, row_cuts, col_cuts = CUTS[cuts]
    eps = 0.1
    x = _data(n, kind, 3)
    t, o = x[0], x[1:].contiguous()
    s = torch.tensor(SCALE)
    g = torch.tensor(GRAD_OUT)
    consts = _consts(o)
    full = module.gram_forward(GramBlock(t, o, s, *consts))
    full_bwd = module.gram_backward(
        GramBlock(t, o, s, *consts), GramCoefs(full[0], full[1], g, eps)
    )
    inf = float("-inf")
    row_lse, col_lse = torch.full((n,), inf), torch.full((n,), inf)
    diag, row_sum, col_sum = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for r0, r1 in row_cuts:
        for c0, c1 in col_cuts:
            blk = [c[c0:c1] for c in consts]
            st = module.gram_forward(
                GramBlock(t[r0:r1], o[:, c0:c1].contiguous(), s, *blk, r0 - c0)
            )
            row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], st[0])
            col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], st[1])
            diag[r0:r1] += st[2]
            row_sum[r0:r1] += st[3]
            col_sum[c0:c1] += st[4]
    for name, got, want in zip(
        ("row_lse", "col_lse", "diag", "row_sum", "col_sum"),
        (row_lse, col_lse, diag, row_sum, col_sum),
        full,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    da, do = torch.zeros(n, D), torch.zeros(M - 1, n, D)
    ds, ctt, cuu = torch.zeros(()), torch.zeros(n), torch.zeros(n, M - 1, M - 1)
    for r0, r1 in row_cuts:
        for c0, c1 in col_cuts:
            blk = [c[c0:c1] for c in consts]
            block = GramBlock(t[r0:r1], o[:, c0:c1].contiguous(), s, *blk, r0 - c0)
            coefs = GramCoefs(row_lse[r0:r1], col_lse[c0:c1], g, eps, total=n)
            out = module.gram_backward(block, coefs, out_dtype=torch.float32)
            da[r0:r1] += out[0]
            do[:, c0:c1] += out[1]
            ds += out[2]
            ctt[c0:c1] += out[3]
            cuu[c0:c1] += out[4]
    for name, got, want in zip(
        ("d_anchor", "d_others_u", "dscale", "col_tt", "col_uu"), (da, do, ds, ctt, cuu), full_bwd
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- over ranks


def _body(backend: str, rank: int, world: int) -> dict:
    import flashcontrast
    import flashcontrast.distributed as fd

    if backend == "cuda":  # route backend="cuda" to the emulated extension in this rank
        import cuda_emulator

        cuda_emulator.install(pytest.MonkeyPatch(), f"test_distributed_gram_engine/{world}")

    sizes = SIZES[world]
    n = sum(sizes)
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    out = {}
    for i, case in enumerate(CASES):
        strategy, eps, kind = case
        x = _data(n, kind, i)[:, sl].clone().requires_grad_(True)
        s = torch.tensor(SCALE, requires_grad=True)
        loss = fd.gram_loss(
            x[0], list(x[1:]), s, label_smoothing=eps, strategy=strategy, backend=backend,
            grad_scaling="sum",
        )  # fmt: skip
        ran = flashcontrast.last_backend()
        loss.backward(torch.tensor(GRAD_OUT))
        out[_key(case)] = [ran, loss.item(), x.grad.tolist(), s.grad.item()]
    for strategy, where in NAN_CASES:
        x = _data(n, "unit", 9)
        x[0 if where == "anchor" else 2, n - 2, 1] = float("nan")  # on the last rank
        loss = fd.gram_loss(x[0, sl], list(x[1:, sl]), SCALE, strategy=strategy, backend=backend)
        out[f"nan/{strategy}/{where}"] = repr(loss.item())
    if backend == "torch":
        try:
            fd.gram_loss(x[0, sl], list(x[1:, sl]), SCALE, backend="cuda")
            out["cuda"] = None
        except Exception as e:  # every type is recorded, and asserted on
            out["cuda"] = [type(e).__name__, str(e)]
    return out


def _reference(case: tuple, n: int, dtype: torch.dtype, backend: str = "reference") -> list:
    """Loss and gradients (d x (M, N, D), d scale) of the single-process loss."""
    _, eps, kind = case
    x = _data(n, kind, CASES.index(case)).to(dtype).requires_grad_(True)
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    loss = gram_loss(x[0], list(x[1:]), s, label_smoothing=eps, backend=backend)
    loss.backward(torch.tensor(GRAD_OUT, dtype=dtype))
    return [loss.detach(), x.grad, s.grad]


@pytest.mark.parametrize(("world", "backend"), WORLDS)
def test_distributed_gram_matches_one_process(world, backend, tmp_path):
    if backend == "cuda":
        import cuda_emulator

        cuda_emulator.module()  # build (or load) once here, so the ranks find it cached
    results = spawn(world, tmp_path, functools.partial(_body, backend))
    n = sum(SIZES[world])
    for case in CASES:
        key = _key(case)
        exact = _reference(case, n, torch.float64)
        same = _reference(case, n, torch.float32)
        one = _reference(case, n, torch.float32, backend)  # the single-process kernels
        per_rank = [res[key] for res in results]
        assert [r[0] for r in per_rank] == [backend] * world, (key, [r[0] for r in per_rank])
        # (M, n_r, D) per rank, concatenated along the samples (an empty rank: (M, 0, D))
        dx = torch.cat([torch.tensor(r[2]).reshape(M, -1, D) for r in per_rank], dim=1)
        x = _data(n, case[2], CASES.index(case))
        allowance = gram_det_rounding_allowance(x[0], list(x[1:]), SCALE, case[1], GRAD_OUT,
                                                torch.float32)  # fmt: skip
        allowance = [allowance[0], max(allowance[1:-1]), allowance[-1]]
        for rank, r in enumerate(per_rank):
            got = [torch.tensor(r[1]), dx, torch.tensor(r[3])]
            try:
                assert_by_rule(("loss", "dx", "dscale"), got, same, exact, torch.float32,
                               allowance)  # fmt: skip
                # and the single-process kernels' own values, to float32 summation order
                for name, a, b in zip(("loss", "dx", "dscale"), got, one):
                    torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=2e-6, msg=name)
            except AssertionError as e:
                raise AssertionError(f"{backend} W={world} rank {rank} {key}: {e}") from None
            assert r[1] == per_rank[0][1], f"{key}: rank {rank}'s loss differs from rank 0's"
    for strategy, where in NAN_CASES:
        got = [res[f"nan/{strategy}/{where}"] for res in results]
        assert got == ["nan"] * world, (strategy, where, got)
    if backend == "torch":
        for res in results:
            # "cuda" has no (emulated) extension in these ranks: every rank's setup fails
            assert res["cuda"][0] == "RuntimeError", res["cuda"]
            assert "cannot run" in res["cuda"][1], res


def test_degenerate_inputs_need_the_floor():
    """The degenerate cases' data is degenerate: in float32, the det the ranks' old tiles
    computed (u = t O^T, v = adj u, det = det_h |t|^2 - u.v, then sqrt where det > 0) are
    below the floor on the duplicated columns, and positive rounding noise on some
    collinear ones, whose sqrt and 1/sqrt gradients the floor removes."""
    n = sum(SIZES[3])
    for case in CASES:
        if case[2] != "duplicate":
            continue
        x = _data(n, "duplicate", CASES.index(case))
        t, o = x[0], x[1:]
        det_h, adj_h, floor_h = _consts(o)
        tt = (t * t).sum(1)
        u = torch.matmul(t, o.transpose(1, 2))  # (K, N, N)
        v = torch.einsum("rim,mrs->sim", u, adj_h)
        det = torch.outer(tt, det_h) - (u * v).sum(0)
        for cols in (slice(0, None, 4), slice(1, None, 4)):
            assert (det[:, cols].abs() < tt[:, None] * floor_h[None, cols]).all()
        assert (det[:, 1::4] > 0).any(), case
