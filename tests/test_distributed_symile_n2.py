"""flashcontrast.distributed.symile_loss(negative_sampling="n_squared") over real processes.

W = 1..3 gloo ranks; per world size two uneven layouts (for W > 1 one of them with an
empty shard); M = 3, strategy "gather" (the only one it has). Against the single-process
:func:`flashcontrast.symile_loss` with ``negative_sampling="n_squared"`` of the
concatenated batch:

* float64, backend "torch" (and "reference", which runs the same torch tiles), "ddp" and
  "sum" scaling, upstream gradient 0.7: the loss on every rank and every gradient (the
  feature gradients W x / 1x the single-process ones of the rank's rows, d scale equal)
  to 1e-10, against the float64 reference (the (N, N^2) logits written out);
* float32 ("auto", which resolves to the torch tiles on the CPU) against the
  single-process "torch" backend in float32, and bfloat16 features (float32 tiles, 16-bit
  features travelling, gradients rounded once) against the float64 reference by the
  verification rule;
* float32 also on "triton" (the rectangular Triton kernels, interpreted) and "cuda" (the
  rectangular CUDA kernels, csrc/ built for the CPU: tests/cuda_emulator, installed by
  each spawned rank itself as in tests/test_distributed_gram_engine.py; skipped where the
  emulator cannot be built), n_r rows against the gathered N columns, an empty shard
  included;
* the setups it refuses, on every rank: strategy="ring" and M = 4 (NotImplementedError),
  explicit permutations (ValueError).

The bytes it sends are checked by tests/test_distributed_bytes.py. Sizes are small
(N <= 13, D = 6).
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import spawn
from verification import EMULATOR_SKIP, assert_by_rule

D = 6
SCALE = 3.0
GRAD_OUT = 0.7
LAYOUTS = {1: ([7],), 2: ([3, 6], [0, 9]), 3: ([4, 1, 7], [5, 0, 6])}


def _data(n: int, dtype: torch.dtype, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(
        torch.randn(3, n, D, generator=g, dtype=torch.float64), dim=-1
    )
    return [t.to(dtype) for t in x]


def _err(x, y) -> float:
    return (x.detach().double() - y.detach().double()).abs().max().item() if x.numel() else 0.0


def _single(reps: list, dtype: torch.dtype, backend: str) -> list:
    """Loss, the three feature gradients (N, D) and d scale of the single-process loss."""
    import flashcontrast as fc

    xs = [r.detach().to(dtype).clone().requires_grad_(True) for r in reps]
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    loss = fc.symile_loss(xs, s, negative_sampling="n_squared", backend=backend)
    loss.backward(torch.tensor(GRAD_OUT, dtype=loss.dtype))
    return [loss.detach(), *(x.grad for x in xs), s.grad]


def _dist(reps: list, sizes: list, rank: int, backend: str, scaling: str) -> list:
    import flashcontrast.distributed as fd

    off = sum(sizes[:rank])
    xs = [r[off : off + sizes[rank]].clone().requires_grad_(True) for r in reps]
    dtype = torch.float64 if reps[0].dtype == torch.float64 else torch.float32
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    loss = fd.symile_loss(
        xs, s, negative_sampling="n_squared", backend=backend, grad_scaling=scaling
    )
    loss.backward(torch.tensor(GRAD_OUT, dtype=loss.dtype))
    return [loss.detach(), *(x.grad for x in xs), s.grad]


def _cases(rank: int, world: int) -> dict:
    out = {}
    for li, sizes in enumerate(LAYOUTS[world]):
        n = sum(sizes)
        off = sum(sizes[:rank])
        sl = slice(off, off + sizes[rank])
        factor = {"ddp": world, "sum": 1}
        reps = _data(n, torch.float64, 10 + li)
        ref = _single(reps, torch.float64, "reference")
        for backend, scaling in (("torch", "ddp"), ("reference", "sum")):
            got = _dist(reps, sizes, rank, backend, scaling)
            errs = [_err(got[0], ref[0])]
            errs += [_err(g, factor[scaling] * r[sl]) for g, r in zip(got[1:4], ref[1:4])]
            errs.append(_err(got[4], ref[4]))
            shapes_ok = all(g.shape == (sizes[rank], D) and g.dtype == torch.float64
                            for g in got[1:4])  # fmt: skip
            out[f"{sizes}/float64/{backend}/{scaling}"] = {"errs": errs, "shapes": shapes_ok}
        # float32 ("auto": the torch tiles on the CPU; "triton": the rectangular Triton
        # kernels, interpreted; "cuda": the rectangular CUDA kernels, emulated) against the
        # single-process float32 torch backend, "sum"
        reps32 = _data(n, torch.float32, 20 + li)
        ref32 = _single(reps32, torch.float32, "torch")
        for backend in ("auto", "triton") + (("cuda",) if EMULATOR_SKIP is None else ()):
            got = _dist(reps32, sizes, rank, backend, "sum")
            errs = [_err(got[0], ref32[0]), _err(got[4], ref32[4])]
            errs += [_err(g, r[sl]) for g, r in zip(got[1:4], ref32[1:4])]
            out[f"{sizes}/float32/{backend}/sum"] = {"errs": errs, "shapes": True}
        # bfloat16: the rank's loss and gradients, for the parent's rule check
        reps16 = _data(n, torch.bfloat16, 30 + li)
        got = _dist(reps16, sizes, rank, "torch", "sum")
        out[f"{sizes}/bfloat16"] = (
            [got[0].item()] + [g.float().tolist() for g in got[1:4]] + [got[4].item()]
        )
    return out


def _errors(rank: int, world: int) -> dict:
    """Every refused setup, with this rank's inputs valid but for the odd argument on every
    rank."""
    import flashcontrast.distributed as fd

    n = 3 + rank
    reps = [torch.randn(n, D) for _ in range(3)]
    calls = {
        "ring": lambda: fd.symile_loss(reps, 2.0, negative_sampling="n_squared", strategy="ring"),
        "m4": lambda: fd.symile_loss(reps + reps[:1], 2.0, negative_sampling="n_squared"),
        "perms": lambda: fd.symile_loss(
            reps, 2.0, negative_sampling="n_squared", permutations=torch.zeros((3, 2, 1))
        ),
    }
    out = {}
    for key, fn in calls.items():
        try:
            fn()
            out[key] = None
        except Exception as e:  # every type is recorded, and asserted on
            out[key] = [type(e).__name__, str(e)]
    return out


def _body(rank: int, world: int) -> dict:
    if EMULATOR_SKIP is None:  # route backend="cuda" to the emulated extension in this rank
        import cuda_emulator

        cuda_emulator.install(pytest.MonkeyPatch(), f"test_distributed_symile_n2/{world}")
    return {"cases": _cases(rank, world), "errors": _errors(rank, world)}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_symile_n_squared_matches_single_process(world, tmp_path):
    if EMULATOR_SKIP is None:
        import cuda_emulator

        cuda_emulator.module()  # build (or load) once here, so the ranks find it cached
    results = spawn(world, tmp_path, _body)
    for li, sizes in enumerate(LAYOUTS[world]):
        n = sum(sizes)
        for r, res in enumerate(results):
            cases = res["cases"]
            if EMULATOR_SKIP is None:  # the emulated CUDA kernels ran on every rank
                assert f"{sizes}/float32/cuda/sum" in cases, (r, sorted(cases))
            for key, case in cases.items():
                if key.endswith("bfloat16") or not key.startswith(str(sizes)):
                    continue
                tol = 1e-10 if "float64" in key else 2e-6
                assert case["shapes"], (r, key)
                assert max(case["errs"]) < tol, f"rank {r} {key}: errors {case['errs']}"
        # bfloat16 by the rule: the global gradients from every rank's rows
        key = f"{sizes}/bfloat16"
        per_rank = [res["cases"][key] for res in results]
        reps16 = _data(n, torch.bfloat16, 30 + li)
        exact = _single(reps16, torch.float64, "reference")
        same = _single(reps16, torch.float32, "torch")
        grads = [
            torch.cat(
                [torch.tensor(p[1 + k], dtype=torch.float32).reshape(-1, D) for p in per_rank]
            )
            for k in range(3)
        ]
        for r, p in enumerate(per_rank):
            kernel = [torch.tensor(p[0]), *grads, torch.tensor(p[4])]
            names = ("loss", "dx", "dy", "dz", "dscale")
            try:
                assert_by_rule(names, kernel, same, exact, torch.bfloat16)
            except AssertionError as e:
                raise AssertionError(f"W={world} rank {r} {key}: {e}") from None
            assert p[0] == per_rank[0][0], (key, r)
    if world == 1:
        return
    expect = {
        "ring": ("NotImplementedError", 'strategy="ring" runs only negative_sampling="n"'),
        "m4": ("NotImplementedError", "takes M = 3 modalities"),
        "perms": ("ValueError", 'permutations only apply to negative_sampling="n"'),
    }
    for key, (name, substring) in expect.items():
        for r, res in enumerate(results):
            got = res["errors"][key]
            assert got is not None and got[0] == name and substring in got[1], (key, r, got)


@pytest.mark.parametrize("budget", [None, 7, 40, 200])
@pytest.mark.parametrize("n,m", [(5, 11), (11, 11), (1, 4), (0, 6)])
def test_rank_local_tiles_match_the_dense_loss(n, m, budget):
    """The rank's n_squared tiles (the "torch" backend's symile_n2 of n rows against m
    columns, blocks of any size down to one (row, pair) block) against the dense (n, m^2)
    logits and autograd, float64."""
    from flashcontrast.backends.blockwise.symile import symile_n2_backward, symile_n2_forward

    g = torch.Generator().manual_seed(n * 100 + m)
    x, y, z = (torch.randn(k, D, generator=g, dtype=torch.float64) for k in (n, m, m))
    scale = torch.tensor(SCALE, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    xs, ys, zs, ss = (t.clone().requires_grad_(True) for t in (x, y, z, scale))
    dense = torch.logsumexp(ss * torch.einsum("id,jd,kd->ijk", xs, ys, zs).reshape(n, m * m), 1)
    (w * dense).sum().backward()
    got = symile_n2_forward(x, y, z, scale, budget)
    assert torch.allclose(got, dense.detach(), rtol=0, atol=1e-12)
    dx, dy, dz, ds = symile_n2_backward(x, y, z, scale, got, w, budget)
    for a, b in ((dx, xs.grad), (dy, ys.grad), (dz, zs.grad), (ds, ss.grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()
