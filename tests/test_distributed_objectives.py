"""flashcontrast.distributed MV-InfoNCE, MV-DHEL, GRAM and Symile over real processes:
W in 1..4 gloo ranks with uneven shards, float64, against the single-process losses on
the concatenated batch.

One spawn per world size runs every case and writes its findings to a JSON file per
rank. Every process group is torn down with a barrier before destroy_process_group, and
every process is joined with a timeout and killed if it overruns.
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import SIZES, spawn, symile_sampling

D = 6


def _err(x, y) -> float:
    return (x.double() - y.double()).abs().max().item()


def _compare(rank, world, scaling, feats, run_dist, run_single):
    """feats: list of global (N, D)-row tensors (leading dim = sample); run_*(tensors,
    scale) -> loss. Returns the max errors of loss, features' and scale's gradients."""
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    glob = [f.clone().requires_grad_(True) for f in feats]
    s_ref = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    ref = run_single(glob, s_ref)
    ref.backward()
    loc = [f[sl].clone().requires_grad_(True) for f in feats]
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    fd.reset_comm_bytes()
    loss = run_dist(loc, s)
    loss.backward()
    factor = world if scaling == "ddp" else 1
    return {
        "loss": _err(loss, ref),
        "dfeat": max(_err(x.grad, factor * y.grad[sl]) for x, y in zip(loc, glob)),
        "dscale": _err(s.grad, s_ref.grad),
        "bytes": fd.comm_bytes(),
    }


def _cases(rank, world):
    import flashcontrast as fc
    import flashcontrast.distributed as fd

    n = sum(SIZES[world])
    off = sum(SIZES[world][:rank])
    sl = slice(off, off + SIZES[world][rank])
    g = torch.Generator().manual_seed(1234 + world)

    def rnd(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1)

    out = {}
    views = [rnd(n, D) for _ in range(3)]
    groups = torch.randint(0, max(2, n // 2), (n,), generator=g)
    for strategy in ("gather", "ring"):
        for scaling in ("ddp", "sum"):
            for grouped in (False, True):
                gr = groups if grouped else None
                for name, fdist, fsingle in (
                    ("mv_infonce", fd.multiview_infonce_loss, fc.multiview_infonce_loss),
                    ("mv_dhel", fd.multiview_dhel_loss, fc.multiview_dhel_loss),
                ):
                    if name == "mv_dhel" and grouped:
                        gr = torch.arange(n) // 2  # keeps every row some negative
                    key = f"{name}/{strategy}/{scaling}/groups={grouped}"

                    def run_dist(t, s, f=fdist, gr=gr, strategy=strategy, scaling=scaling):
                        return f(
                            t,
                            s,
                            groups=None if gr is None else gr[sl],
                            strategy=strategy,
                            grad_scaling=scaling,
                        )

                    def run_single(t, s, f=fsingle, gr=gr):
                        return f(t, s, groups=gr, backend="reference")

                    out[key] = _compare(rank, world, scaling, views, run_dist, run_single)
    anchor, others = rnd(n, D), [rnd(n, D), rnd(n, D)]
    for strategy in ("gather", "ring"):
        for scaling in ("ddp", "sum"):
            for eps in (0.0, 0.1):
                key = f"gram/{strategy}/{scaling}/eps={eps}"

                def run_dist(t, s, eps=eps, strategy=strategy, scaling=scaling):
                    return fd.gram_loss(
                        t[0], t[1:], s, label_smoothing=eps, strategy=strategy,
                        grad_scaling=scaling,
                    )  # fmt: skip

                def run_single(t, s, eps=eps):
                    return fc.gram_loss(t[0], t[1:], s, label_smoothing=eps, backend="reference")

                out[key] = _compare(rank, world, scaling, [anchor, *others], run_dist, run_single)
    reps = [rnd(n, D) for _ in range(3)]
    for scaling in ("ddp", "sum"):
        for mode in ("generator", "permutations", "default"):
            key = f"symile/gather/{scaling}/{mode}"
            perms = torch.stack([torch.randperm(n, generator=g) for _ in range(6)]).view(3, 2, n)

            def run_dist(t, s, mode=mode, perms=perms, scaling=scaling):
                kw = symile_sampling(mode, perms, rank)  # rank 0's draw counts
                return fd.symile_loss(t, s, grad_scaling=scaling, **kw)

            def run_single(t, s, mode=mode, perms=perms):
                kw = symile_sampling(mode, perms)
                return fc.symile_loss(t, s, backend="reference", **kw)

            out[key] = _compare(rank, world, scaling, reps, run_dist, run_single)
    return out


def _errors(rank, world):
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    bad = rank == world - 1
    msgs = {}
    v = 3 if bad else 2  # different number of views on the last rank
    try:
        fd.multiview_infonce_loss(torch.randn(v, n, D), 2.0, strategy="ring")
        msgs["views"] = None
    except (TypeError, ValueError, RuntimeError) as e:
        msgs["views"] = f"{type(e).__name__}: {e}"
    try:  # Symile "n_squared" over a process group with M = 4: NotImplementedError
        reps = [torch.randn(n, D) for _ in range(4)]
        fd.symile_loss(reps, 2.0, negative_sampling="n_squared")
        msgs["symile_n2"] = None
    except NotImplementedError as e:
        msgs["symile_n2"] = f"{type(e).__name__}: {e}"
    try:  # different explicit permutations on the last rank
        p = torch.stack([torch.arange(sum(SIZES[world]))] * 6).view(3, 2, -1)
        if bad:
            p = p.flip(-1)
        fd.symile_loss([torch.randn(n, D) for _ in range(3)], 2.0, permutations=p)
        msgs["perms"] = None
    except (TypeError, ValueError, RuntimeError) as e:
        msgs["perms"] = f"{type(e).__name__}: {e}"
    return msgs


def _body(rank, world):
    """Every case on this rank, and the bad setups."""
    return {
        "cases": _cases(rank, world),
        "errors": _errors(rank, world) if world > 1 else {},
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_more_objectives_match_single_process(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        assert len(res["cases"]) == 16 + 8 + 6
        for key, case in res["cases"].items():
            for q in ("loss", "dfeat", "dscale"):
                assert case[q] < 1e-10, f"rank {r} {key}: {q} off by {case[q]:.3g}"
    if world == 1:
        return
    last = world - 1
    for r, res in enumerate(results):
        msg = res["errors"]["views"]
        assert msg is not None, f"rank {r} did not raise"
        assert "number of views V" in msg, msg
        msg = res["errors"]["symile_n2"]
        assert msg is not None and "takes M = 3 modalities" in msg, msg
        msg = res["errors"]["perms"]
        assert msg is not None and "same permutations" in msg, msg
    assert last >= 1
