"""flashcontrast.distributed.symile_loss(strategy="ring") over real processes: W in 1..4
gloo ranks with uneven shards, float64, against the single-process
:func:`flashcontrast.symile_loss` on the concatenated batch with the same permutations.

One spawn per world size runs every case (M = 3 and 4; explicit permutations, rank 0's
generator, explicit non-bijective index maps; ddp and sum scaling; grad_output != 1),
the bad setups, and the byte count at W = 4, n = 256, D = 512, float32, and writes its
findings to a JSON file per rank (harness: tests/dist_harness.py).
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import SIZES, assert_rank_errors, spawn

D = 6
GRAD_OUT = 0.7


def _err(x, y) -> float:
    return (x.detach().double() - y.detach().double()).abs().max().item()


def expected_ring_bytes(
    perms: torch.Tensor, sizes: list, rank: int, d: int, e: int, f: int, drawn: bool
) -> int:
    """The formula of distributed/symile.py's module doc: bytes rank ``rank`` sends in one
    forward + backward of Symile "ring" (perms (M, M-1, N) global index maps)."""
    w, m, n_tot = len(sizes), perms.shape[0], sum(sizes)
    off = sum(sizes[:rank])
    n_r, n_next = sizes[rank], sizes[(rank + 1) % w]
    col_mine = torch.zeros(n_tot, dtype=torch.bool)
    col_mine[off : off + n_r] = True
    row_mine = (perms >= off) & (perms < off + n_r)  # (M, M-1, N): factor row on this rank
    a_r = int((row_mine & ~col_mine).sum())  # factor rows this rank sends
    b_r = int((~row_mine & col_mine).sum())  # factor rows it receives

    def ar(x: int) -> int:
        return int(2 * (w - 1) / w * x)

    # metadata: 7 + F int64 per rank, F = 5 (M, permutations given, N, checksum,
    # negative_sampling)
    meta = (w - 1) * 8 * (7 + 5) + (m * (m - 1) * n_tot * 8 if drawn and w > 1 else 0)
    fwd = a_r * d * e + (n_tot - n_next) * m * d * e + (n_tot - n_r) * m * f + ar(f)
    bwd = ar(f) + (n_tot - n_next) * m * (d * e + f) + (n_tot - n_r) * m * d * f
    bwd += b_r * d * f + ar(f)
    return meta + fwd + bwd


def _case(rank, world, m, mode, scaling, g) -> dict:
    """One comparison against the single-process loss; errors and the byte check."""
    import flashcontrast as fc
    import flashcontrast.distributed as fd
    from flashcontrast._sampling import symile_negative_permutations

    sizes = SIZES[world]
    n = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    reps = [
        torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
        for _ in range(m)
    ]
    if mode == "permutations":
        perms = torch.stack([torch.randperm(n, generator=g) for _ in range(m * (m - 1))])
        perms = perms.view(m, m - 1, n)
    elif mode == "indices":  # index maps that are not permutations (repeated rows)
        perms = torch.randint(0, n, (m, m - 1, n), generator=g)
    else:  # rank 0's generator draws them; replayed here for the reference and formula
        perms = symile_negative_permutations(m, n, generator=torch.Generator().manual_seed(77))
    glob = [r.clone().requires_grad_(True) for r in reps]
    s_ref = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    ref = fc.symile_loss(glob, s_ref, permutations=perms, backend="reference")
    (ref * GRAD_OUT).backward()
    loc = [r[sl].clone().requires_grad_(True) for r in reps]
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    kw = {"permutations": perms}
    if mode == "generator":
        kw = {"generator": torch.Generator().manual_seed(77 + rank)}  # only rank 0's counts
    fd.reset_comm_bytes()
    loss = fd.symile_loss(loc, s, strategy="ring", grad_scaling=scaling, **kw)
    loss.backward(torch.tensor(GRAD_OUT, dtype=torch.float64))
    factor = world if scaling == "ddp" else 1
    want = expected_ring_bytes(perms, sizes, rank, D, 8, 8, drawn=mode == "generator")
    return {
        "loss": _err(loss, ref),
        "dfeat": max(_err(x.grad, factor * y.grad[sl]) for x, y in zip(loc, glob)),
        "dscale": _err(s.grad, s_ref.grad),
        "bytes": fd.comm_bytes(),
        "bytes_formula": want,
    }


def _cases(rank, world) -> dict:
    g = torch.Generator().manual_seed(1000 + world)
    out = {}
    for m, modes in ((3, ("permutations", "generator", "indices")), (4, ("permutations",))):
        for mode in modes:
            for scaling in ("ddp", "sum"):
                out[f"M={m}/{mode}/{scaling}"] = _case(rank, world, m, mode, scaling, g)
    return out


def _errors(rank, world) -> dict:
    """Bad setups with strategy="ring": each must raise on every rank (not hang)."""
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    bad = rank == world - 1
    msgs = {}

    def attempt(key, fn):
        try:
            fn()
            msgs[key] = None
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"

    def reps(m=3, d=D):
        return [torch.randn(n, d) for _ in range(m)]

    p = torch.stack([torch.arange(sum(SIZES[world]))] * 6).view(3, 2, -1)
    calls = {
        "dim": lambda: fd.symile_loss(reps(d=D + 1 if bad else D), 2.0, strategy="ring"),
        "perms": lambda: fd.symile_loss(
            reps(), 2.0, permutations=p.flip(-1) if bad else p, strategy="ring"
        ),
        "modalities": lambda: fd.symile_loss(reps(m=4 if bad else 3), 2.0, strategy="ring"),
        "n_squared": lambda: fd.symile_loss(
            reps(), 2.0, negative_sampling="n_squared", strategy="ring"
        ),
    }
    for key, fn in calls.items():  # one rank differs in D, permutations, M; n_squared
        attempt(key, fn)
    return msgs


def _measure(rank, world, n=256, d=512, m=3) -> dict:
    """Bytes of one forward + backward at n rows per rank, float32, explicit permutations
    (no broadcast), and the formula's figure."""
    import flashcontrast.distributed as fd
    from flashcontrast._sampling import symile_negative_permutations

    perms = symile_negative_permutations(m, n * world, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(rank)
    reps = [torch.randn(n, d, generator=g).requires_grad_(True) for _ in range(m)]
    fd.reset_comm_bytes()
    fd.symile_loss(reps, 10.0, permutations=perms, strategy="ring").backward()
    return {
        "ring": fd.comm_bytes(),
        "ring_formula": expected_ring_bytes(perms, [n] * world, rank, d, 4, 4, drawn=False),
        "dtype_ok": all(r.grad.dtype == torch.float32 for r in reps),
    }


def _body(rank, world) -> dict:
    return {
        "cases": _cases(rank, world),
        "errors": _errors(rank, world) if world > 1 else {},
        "bytes": _measure(rank, world) if world == 4 else {},
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_symile_ring_matches_single_process(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        assert len(res["cases"]) == 8
        for key, case in res["cases"].items():
            for q in ("loss", "dfeat", "dscale"):
                assert case[q] < 1e-10, f"rank {r} {key}: {q} off by {case[q]:.3g}"
            assert case["bytes"] == case["bytes_formula"], (r, key, case)
    if world == 4:
        for r, res in enumerate(results):
            b = res["bytes"]
            assert b["ring"] == b["ring_formula"], (r, b)
            assert b["dtype_ok"], (r, b)
        print(
            'Symile "ring" bytes sent per rank per step (W=4, n=256, D=512, float32, M=3), '
            "ranks 0..3:",
            [res["bytes"]["ring"] for res in results],
        )
    if world == 1:
        return
    for key, substring in (
        ("dim", "same feature dimension D"),
        ("perms", "same permutations"),
        ("modalities", "same number of modalities M"),
        ("n_squared", 'only negative_sampling="n"'),
    ):
        assert_rank_errors(results, key, substring)
