"""flashcontrast.compat.open_clip in a real process group, against OpenCLIP's own classes.

W = 2 and 3 gloo processes (one spawn per world size, tests/dist_harness.py). On every
rank, OpenCLIP's ``ClipLoss`` / ``SigLipLoss`` (``open_clip/loss.py``, loaded by file path
because ``import open_clip`` needs torchvision) and flashcontrast's drop-in classes run on
the same equal shard, and the returned value(s) and the gradients of the features,
``logit_scale`` and ``logit_bias`` are compared per rank: every ``local_loss`` x
``gather_with_grad`` x ``cache_labels`` combination with and without a bias, every SigLIP
``dist_impl`` (all four run on gloo: P2P, ``torch.distributed.nn.all_reduce`` and
``all_gather``), float64, and float32 once each. The documented deliberate differences
are asserted too: uneven shards (OpenCLIP cannot take them; ours raise on every rank, or,
for ``local_loss=False``, return the global loss), a bad input on one rank (every rank
raises), and the exactly-zero CLIP bias gradient.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from types import ModuleType
from typing import Callable, Optional

import pytest
import torch

from dist_harness import spawn

D = 8
N_LOCAL = 4
SCALE = 7.5
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
F64_TOL, F32_TOL = 1e-10, 2e-5
QUANTITIES = ("loss", "loss_dict", "image", "text", "scale", "bias")


def _openclip_loss_path() -> Optional[str]:
    """Path of the installed ``open_clip/loss.py``, or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "loss.py")
    return path if os.path.isfile(path) else None


def _openclip() -> ModuleType:
    """OpenCLIP's loss module, loaded from its file (its package needs torchvision)."""
    spec = importlib.util.spec_from_file_location("_dist_open_clip_loss", _openclip_loss_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shard(rank: int, sizes: list, dtype: torch.dtype, seed: int) -> tuple:
    """This rank's rows of a global batch of unit features (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    return a[sl].to(dtype), b[sl].to(dtype)


def _run(loss_fn: Callable, a, b, scale: float, bias: Optional[float]) -> dict:
    """Two calls (output_dict False, then True, which reuses cached labels), summed and
    differentiated: the values and the gradients of every input."""
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=a.dtype, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=a.dtype, requires_grad=True)
    plain = loss_fn(a, b, s, bi, False)
    as_dict = loss_fn(a, b, s, bi, True)
    assert isinstance(plain, torch.Tensor) and plain.dim() == 0
    assert set(as_dict) == {"contrastive_loss"}, sorted(as_dict)
    (plain + as_dict["contrastive_loss"]).backward()
    return {
        "loss": plain.detach(),
        "loss_dict": as_dict["contrastive_loss"].detach(),
        "image": a.grad,
        "text": b.grad,
        "scale": s.grad,
        "bias": None if bi is None else bi.grad,
    }


def _errors(theirs: dict, ours: dict) -> dict:
    """Max abs difference per quantity; "missing" where only one side has a gradient."""
    out = {}
    for q in QUANTITIES:
        t, o = theirs[q], ours[q]
        if (t is None) != (o is None):
            out[q] = "missing"
        elif t is not None:
            out[q] = (t.double() - o.double()).abs().max().item()
    return out


def _clip_cases(rank: int, world: int, oc: ModuleType) -> dict:
    """Every ClipLoss option combination, float64, and float32 once."""
    from flashcontrast.compat import open_clip as coc

    cases, seed = {}, 0
    options = itertools.product((False, True), (False, True), (False, True), (None, -1.5))
    for local, with_grad, cache, bias in options:
        seed += 1
        kwargs = dict(local_loss=local, gather_with_grad=with_grad, cache_labels=cache)
        kwargs.update(rank=rank, world_size=world)
        a, b = _shard(rank, [N_LOCAL] * world, torch.float64, seed)
        theirs = _run(oc.ClipLoss(**kwargs), a, b, SCALE, bias)
        ours = _run(coc.ClipLoss(**kwargs), a, b, SCALE, bias)
        key = f"clip/local={local}/grad={with_grad}/cache={cache}/bias={bias}/float64"
        cases[key] = _errors(theirs, ours)
        if local and bias is not None:
            cases[key]["bias_exact_zero"] = ours["bias"].item() == 0.0
    for local in (False, True):
        kwargs = dict(local_loss=local, gather_with_grad=True, rank=rank, world_size=world)
        a, b = _shard(rank, [N_LOCAL] * world, torch.float32, 100 + local)
        theirs = _run(oc.ClipLoss(**kwargs), a, b, SCALE, 0.5)
        ours = _run(coc.ClipLoss(**kwargs), a, b, SCALE, 0.5)
        cases[f"clip/local={local}/grad=True/float32"] = _errors(theirs, ours)
    return cases


def _siglip_cases(rank: int, world: int, oc: ModuleType) -> dict:
    """Every SigLipLoss dist_impl, with and without bias and cache_labels, float64, and
    float32 once."""
    from flashcontrast.compat import open_clip as coc

    cases, seed = {}, 50
    options = itertools.product((None, "bidir", "shift", "reduce", "gather"), (False, True))
    for impl, cache in options:
        for bias in (SIGLIP_BIAS, None):
            seed += 1
            kwargs = dict(cache_labels=cache, rank=rank, world_size=world, dist_impl=impl)
            a, b = _shard(rank, [N_LOCAL] * world, torch.float64, seed)
            theirs = _run(oc.SigLipLoss(**kwargs), a, b, SIGLIP_SCALE, bias)
            ours = _run(coc.SigLipLoss(**kwargs), a, b, SIGLIP_SCALE, bias)
            cases[f"siglip/{impl}/cache={cache}/bias={bias}/float64"] = _errors(theirs, ours)
    for impl in ("shift", "gather"):
        kwargs = dict(rank=rank, world_size=world, dist_impl=impl)
        a, b = _shard(rank, [N_LOCAL] * world, torch.float32, 90)
        theirs = _run(oc.SigLipLoss(**kwargs), a, b, SIGLIP_SCALE, SIGLIP_BIAS)
        ours = _run(coc.SigLipLoss(**kwargs), a, b, SIGLIP_SCALE, SIGLIP_BIAS)
        cases[f"siglip/{impl}/float32"] = _errors(theirs, ours)
    return cases


def _raises(fn: Callable) -> Optional[str]:
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _differences(rank: int, world: int) -> dict:
    """The documented deliberate differences: uneven shards, a bad input on one rank."""
    from flashcontrast import clip_loss
    from flashcontrast.compat import open_clip as coc

    sizes = [N_LOCAL + q for q in range(world)]  # uneven: OpenCLIP cannot run these
    a, b = _shard(rank, sizes, torch.float64, 7)
    kw = dict(rank=rank, world_size=world)
    out = {
        "uneven_local": _raises(lambda: coc.ClipLoss(local_loss=True, **kw)(a, b, SCALE)),
        "uneven_siglip": _raises(lambda: coc.SigLipLoss(**kw)(a, b, SCALE, SIGLIP_BIAS)),
    }
    full_a = torch.cat([_shard(q, sizes, torch.float64, 7)[0] for q in range(world)])
    full_b = torch.cat([_shard(q, sizes, torch.float64, 7)[1] for q in range(world)])
    got = coc.ClipLoss(**kw)(a, b, SCALE)
    out["uneven_global_err"] = (
        (got - clip_loss(full_a, full_b, SCALE, backend="reference")).abs().item()
    )
    a, b = _shard(rank, [N_LOCAL] * world, torch.float64, 8)
    bad_b = b[:-1] if rank == world - 1 else b  # a local shape error on the last rank
    out["bad_local"] = _raises(lambda: coc.ClipLoss(local_loss=True, **kw)(a, bad_b, SCALE))
    out["bad_siglip"] = _raises(lambda: coc.SigLipLoss(**kw)(a, bad_b, SCALE, None))
    return out


def _body(rank: int, world: int) -> dict:
    oc = _openclip()
    return {
        "cases": {**_clip_cases(rank, world, oc), **_siglip_cases(rank, world, oc)},
        "differences": _differences(rank, world),
    }


def _check_differences(world: int, results: list) -> None:
    for r, res in enumerate(results):
        diff = res["differences"]
        for key in ("uneven_local", "uneven_siglip"):
            assert diff[key] is not None, f"rank {r}: {key} did not raise"
            assert diff[key].startswith("ValueError") and "equal shards" in diff[key], diff[key]
        assert diff["uneven_global_err"] < F64_TOL, (r, diff["uneven_global_err"])
        for key in ("bad_local", "bad_siglip"):
            msg = diff[key]
            assert msg is not None, f"rank {r}: {key} did not raise"
            expected = "same shape" if r == world - 1 else "failed their checks"
            assert expected in msg, (r, key, msg)


@pytest.mark.parametrize("world", [2, 3])
def test_compat_matches_openclip_per_rank(world, tmp_path):
    if _openclip_loss_path() is None:
        pytest.skip("open-clip-torch is not installed (pip install open-clip-torch --no-deps)")
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        for key, errs in res["cases"].items():
            tol = F64_TOL if key.endswith("float64") else F32_TOL
            for q in QUANTITIES:
                if q in errs:
                    assert errs[q] != "missing", f"rank {r} {key}: {q} gradient on one side only"
                    assert errs[q] < tol, f"rank {r} {key}: {q} off by {errs[q]:.3g}"
            if "bias_exact_zero" in errs:
                assert errs["bias_exact_zero"], f"rank {r} {key}: bias gradient not exactly 0"
    _check_differences(world, results)
