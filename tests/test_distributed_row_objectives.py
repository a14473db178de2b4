"""flashcontrast.distributed.infonce_loss, uniform_loss, cross_uniform_loss,
multi_positive_infonce_loss (row-only sweeps), align_loss, contrastive_gap_loss (CLIP plus
those) and cwcl_loss
(CLIP's sweep plus all-reduced soft-target moments) over a process group: W = 1 to 4 gloo
ranks, uneven shards and an empty one, both gradient scalings, with and without a bias,
on the torch engine in float64 and (W = 2) on the Triton kernels in float32; each rank's
loss and gradients against the single-process function of the concatenated batch (feature
gradients W x for "ddp"); "ring" where there is none and bad shards raising on every
rank."""

from __future__ import annotations

import pytest
import torch

from dist_harness import assert_case_errors, assert_rank_errors, spawn

D, DU = 8, 5
SIZES = {1: [6], 2: [0, 9], 3: [4, 1, 6], 4: [3, 0, 4, 5]}
# (objective, strategy, grad_scaling, bias)
CASES = (
    ("infonce", "gather", "ddp", None),
    ("infonce", "gather", "sum", 0.4),
    ("uniform", "gather", "ddp", None),
    ("uniform", "gather", "sum", None),
    ("cwcl", "gather", "ddp", None),
    ("cwcl", "ring", "sum", 0.3),
    ("cwcl", "gather", "sum", -1.0),
    ("multipos", "gather", "ddp", None),
    ("multipos", "gather", "sum", None),
    ("xuniform", "gather", "ddp", None),
    ("align", "gather", "sum", None),
    ("gap-cua", "gather", "ddp", None),
    ("gap-cuaxu", "gather", "sum", None),
    ("gap-cuaxu", "gather", "ddp", None),
)


def _data(n: int):
    """Global (N, D) features q, k and frozen embeddings u (N, Du), float64."""
    g = torch.Generator().manual_seed(n)
    q = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return q, k, torch.randn(n, DU, generator=g, dtype=torch.float64)


def _call(module, case, q, k, u, s, bias, **kw):
    """The case's loss from ``module`` (flashcontrast or flashcontrast.distributed)."""
    if case[0] == "infonce":
        return module.infonce_loss(q, k, s, bias, **kw)
    if case[0] == "cwcl":
        return module.cwcl_loss(q, k, s, bias, weight_features=u, **kw)
    if case[0] == "multipos":  # K = 2 candidate batches per anchor, built row by row
        c = torch.stack([k, torch.nn.functional.normalize(k + 0.5 * q, dim=1)])
        if module.__name__ == "flashcontrast":  # the (K N, D) stack, p_ik = k N + i
            c = c.reshape(-1, c.shape[-1])
        return module.multi_positive_infonce_loss(q, c, s, **kw)
    if case[0] == "xuniform":
        return module.cross_uniform_loss(q, k, 1.5, **kw) + 0 * s
    if case[0] == "align":  # no sweep: no strategy or backend
        kw = {k: v for k, v in kw.items() if k == "grad_scaling"}
        return module.align_loss(q, k, **kw) + 0 * s
    if case[0].startswith("gap-"):
        variant = case[0][len("gap-") :]
        return module.contrastive_gap_loss(q, k, s, variant=variant, t=1.5, **kw)
    return module.uniform_loss(q, 1.5, **kw) + 0 * s  # no scale: a zero gradient for it


def _leaves(q, k, bias0, dtype):
    s = torch.tensor(6.0, dtype=dtype, requires_grad=True)
    bias = None if bias0 is None else torch.tensor(bias0, dtype=dtype, requires_grad=True)
    return q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_(), s, bias


def _grads(loss, q, k, s, bias):
    leaves = [q, k, s] + ([bias] if bias is not None else [])
    return torch.autograd.grad(loss * 0.7, leaves, allow_unused=True)


def _errors(rank: int, world: int) -> dict:
    import flashcontrast.distributed as fd

    q, k, u = _data(SIZES[world][rank])
    last = rank == world - 1
    out = {}
    for kind, call in (
        ("ring", lambda: fd.infonce_loss(q, k, 6.0, strategy="ring")),
        ("dim", lambda: fd.uniform_loss(q[:, :5] if last else q)),
        ("variant", lambda: fd.contrastive_gap_loss(q, k, 6.0, variant="cuaxu" if last else "cua")),
        ("xdim", lambda: fd.cross_uniform_loss(q, k[:, :5] if last else k)),
        ("du", lambda: fd.cwcl_loss(q, k, 6.0, weight_features=u[:, :3] if last else u)),
        (
            "kk",
            lambda: fd.multi_positive_infonce_loss(q, torch.stack([k] * (3 if last else 2)), 6.0),
        ),
    ):
        try:
            call()
            out[kind] = None
        except Exception as e:
            out[kind] = f"{type(e).__name__}: {e}"
    return out


def _body(rank: int, world: int, backend: str = "torch", dtype=torch.float64) -> dict:
    import flashcontrast
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    q_all, k_all, u_all = _data(sum(sizes))
    out = {}
    for case in CASES:
        _, strategy, scaling, bias0 = case
        ref = _leaves(q_all, k_all, bias0, torch.float64)
        want = _call(flashcontrast, case, *ref[:2], u_all, *ref[2:], backend="torch")
        grads = _grads(want, *ref)
        mine = _leaves(q_all[lo:hi], k_all[lo:hi], bias0, dtype)
        kw = dict(strategy=strategy, grad_scaling=scaling, backend=backend)
        loss = _call(fd, case, *mine[:2], u_all[lo:hi].to(dtype), *mine[2:], **kw)
        got = _grads(loss, *mine)
        factor = world if scaling == "ddp" else 1
        errs = {"loss": (loss.detach() - want.detach()).abs().item()}
        for name, x, y, local in zip(("dq", "dk", "ds", "db"), got, grads, (1, 1, 0, 0)):
            if x is None or y is None:
                assert x is None and y is None, (case, name)
                continue
            y = factor * y[lo:hi] if local else y
            errs[name] = (x - y).abs().max().item() if x.numel() else 0.0
        out["/".join(map(str, case))] = errs
    return {"cases": out, "errors": _errors(rank, world) if world > 1 else {}}


def _triton_body(rank: int, world: int) -> dict:
    return _body(rank, world, "triton", torch.float32)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    assert_case_errors(results, CASES, 1e-12)
    if world > 1:
        assert_rank_errors(results, "ring", "ring")
        assert_rank_errors(results, "dim", "same feature dimension D")
        assert_rank_errors(results, "variant", "same variant")
        assert_rank_errors(results, "xdim", "same shape", failing_rank=world - 1)
        assert_rank_errors(results, "du", "weight_features' Du")
        assert_rank_errors(results, "kk", "number of candidate batches K")


def test_triton_engine_two_ranks(tmp_path):
    """The sweeps on the Triton kernels (the interpreter), float32 features (Triton has no
    float64 tiles) against the float64 single-process loss: float32 rounding only."""
    assert_case_errors(spawn(2, tmp_path, _triton_body), CASES, 1e-5)
