"""The distributed losses in one process (a one-rank group, mocked backend queries): what
multi-process gloo runs on a CPU cannot show, checked on the CPU:

* where the metadata all-gather runs for each backend configuration (NCCL: the features'
  GPU, not the current device; mixed "cpu:gloo,cuda:nccl": the CPU on every rank), with
  ``torch.distributed``'s backend query mocked, and that features on a device the backend
  does not serve raise before any collective;
* the Symile "ring" all-to-all plan: built on the host, its index tensors land on the
  features' device (a "meta" layout stands in for a GPU), and it matches a plain-Python
  plan;
* double backward raises instead of returning a silently partial second derivative
  (in-process one-rank gloo group).
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist

import flashcontrast.distributed as fd
from flashcontrast.distributed import _comm
from flashcontrast.distributed.symile import _plan

# ----------------------------------------------------------------------------- metadata device


@pytest.fixture
def backend_config(monkeypatch):
    """Set the backend configuration string that ``_comm`` reads, e.g. "cuda:nccl"; the
    current CUDA device is mocked to 0 (no GPU needed)."""

    def set_config(config: str, name: str = "nccl") -> None:
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: name)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return set_config


def test_nccl_metadata_on_the_features_gpu_not_the_current_device(backend_config):
    backend_config("cuda:nccl")
    # features on cuda:3 while the current device is cuda:0 (set_device not called):
    # the metadata must go where the features' collectives go
    assert _comm._meta_device(None, torch.device("cuda", 3)) == torch.device("cuda", 3)
    # a rank whose inputs failed the checks still needs a GPU tensor for NCCL
    assert _comm._meta_device(None, None) == torch.device("cuda", 0)
    assert _comm._meta_device(None, torch.device("cpu")) == torch.device("cuda", 0)


@pytest.mark.parametrize("config", ["cpu:gloo,cuda:nccl", "cpu:gloo,cuda:gloo"])
def test_metadata_on_the_cpu_whenever_the_backend_serves_it(backend_config, config):
    backend_config(config, name=config)
    # the same device type on every rank, whatever each rank's inputs: a mixed group
    # would otherwise route a failing rank's CPU tensor to gloo, the others' to NCCL
    for device in (torch.device("cuda", 1), torch.device("cpu"), None):
        assert _comm._meta_device(None, device) == torch.device("cpu")


def test_backend_devices_without_get_backend_config(monkeypatch):
    monkeypatch.delattr(dist, "get_backend_config")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert _comm._backend_devices(None) == {"cuda"}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _comm._backend_devices(None) == {"cpu", "cuda"}


def test_features_on_a_device_the_backend_does_not_serve_raise(backend_config):
    backend_config("cuda:nccl")
    with pytest.raises(ValueError, match=r"features are on cpu.*\['cuda'\]"):
        _comm._check_served(None, torch.device("cpu"))
    _comm._check_served(None, torch.device("cuda", 0))
    backend_config("cpu:gloo,cuda:nccl", name="cpu:gloo,cuda:nccl")
    _comm._check_served(None, torch.device("cpu"))
    _comm._check_served(None, torch.device("cuda", 0))


# ----------------------------------------------------------------------------- Symile ring plan


def _reference_plan(perms: torch.Tensor, sizes: list, rank: int) -> tuple:
    """The plan of symile._plan by plain Python loops (lists of ints)."""
    m = perms.shape[0]
    offs = [sum(sizes[:q]) for q in range(len(sizes))]

    def owner(row: int) -> int:
        return max(q for q in range(len(sizes)) if offs[q] <= row)

    def flat(q: int) -> list:
        out = []
        for a in range(m):
            others = [o for o in range(m) if o != a]
            for k in range(m - 1):
                for j in range(offs[q], offs[q] + sizes[q]):
                    out.append((int(perms[a, k, j]), others[k]))
        return out

    mine = flat(rank)
    recv_pos = [
        [i for i, (row, _) in enumerate(mine) if owner(row) == p] for p in range(len(sizes))
    ]
    send_rows = [
        [(row - offs[rank]) * m + mod for row, mod in flat(q) if owner(row) == rank]
        for q in range(len(sizes))
    ]
    return recv_pos, send_rows


@pytest.mark.parametrize("m", [3, 4])
def test_symile_ring_plan_matches_reference_and_lands_on_the_features_device(m):
    sizes = [2, 5, 3, 6]
    n_tot = sum(sizes)
    g = torch.Generator().manual_seed(1)
    perms = torch.stack(
        [torch.stack([torch.randint(0, n_tot, (n_tot,), generator=g) for _ in range(m - 1)])
         for _ in range(m)]
    ).to(torch.int32)  # any integer dtype, not necessarily permutations  # fmt: skip
    for rank in range(len(sizes)):
        recv_ref, send_ref = _reference_plan(perms, sizes, rank)
        lay = _comm.Layout(None, rank, len(sizes), sizes, torch.device("cpu"))
        plan = _plan(perms, lay)
        assert [t.tolist() for t in plan.recv_pos] == recv_ref
        assert [t.tolist() for t in plan.send_rows] == send_ref
        assert all(t.dtype == torch.int64 for t in plan.recv_pos + plan.send_rows)
        # a layout on another device (meta stands in for the GPU): every index tensor is
        # moved there, the split sizes stay host integers
        meta = _plan(perms, _comm.Layout(None, rank, len(sizes), sizes, torch.device("meta")))
        assert all(t.device.type == "meta" for t in meta.recv_pos + meta.send_rows)
        assert meta.send_counts(rank) == plan.send_counts(rank)
        assert meta.recv_counts(rank) == plan.recv_counts(rank)


# ----------------------------------------------------------------------------- one-rank group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    """An in-process gloo group of one rank, torn down afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gen() -> torch.Generator:
    """The same Symile permutations on every call."""
    return torch.Generator().manual_seed(0)


def _losses() -> dict:
    def two(f):
        return lambda x, s: f(x[0], x[1], s)

    return {
        "clip gather": two(lambda a, b, s: fd.clip_loss(a, b, s)),
        "clip ring": two(lambda a, b, s: fd.clip_loss(a, b, s, strategy="ring")),
        "siglip": two(lambda a, b, s: fd.siglip_loss(a, b, s, -1.0)),
        "mv-infonce": lambda x, s: fd.multiview_infonce_loss(list(x), s),
        "gram": lambda x, s: fd.gram_loss(x[0], list(x[1:]), s),
        "symile gather": lambda x, s: fd.symile_loss(list(x), s, generator=_gen()),
        "symile ring": lambda x, s: fd.symile_loss(list(x), s, generator=_gen(), strategy="ring"),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_double_backward_raises(one_rank_group, name):
    feats = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = _losses()[name](feats, scale)
    upstream = torch.ones((), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss, feats[0], upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    # a plain backward is unaffected
    loss = _losses()[name](feats, scale)
    loss.backward()
    assert feats[0].grad is not None and scale.grad is not None


def test_cpu_features_over_a_cuda_only_backend_raise_before_communicating(
    one_rank_group, monkeypatch
):
    monkeypatch.setattr(_comm, "_backend_devices", lambda group: {"cuda"})
    monkeypatch.setattr(_comm, "_meta_device", lambda group, device: torch.device("cpu"))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="features are on cpu"):
        fd.clip_loss(a, b, 2.0)
    with pytest.raises(ValueError, match="features are on cpu"):
        fd.symile_loss([a, b, a], 2.0)


def test_symile_explicit_permutations_out_of_range_raise(one_rank_group):
    reps = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    perms = torch.zeros((3, 2, 4), dtype=torch.int64)
    perms[1, 0, 2] = 4  # N = 4: out of range
    for strategy in ("gather", "ring"):
        with pytest.raises(ValueError, match=r"row indices in \[0, 4\)"):
            fd.symile_loss(reps, 2.0, permutations=perms, strategy=strategy)


@pytest.mark.parametrize("name", list(_losses()))
def test_autocast_does_not_change_the_loss_or_its_gradients(one_rank_group, name):
    """Under torch.autocast (bf16 GEMMs; on the CPU here, the same dispatch as on CUDA)
    the loss must still compute in float32: without autocast_off the forward's GEMMs ran
    in bf16 while the backward recomputed in float32 (7% gradient error for CLIP)."""
    feats = [torch.nn.functional.normalize(torch.randn(16, 8), dim=1) for _ in range(3)]
    feats = [f.requires_grad_(True) for f in feats]
    scale = torch.tensor(50.0, requires_grad=True)
    ref = _losses()[name](feats, scale)
    ref_grads = torch.autograd.grad(ref, [*feats, scale], allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _losses()[name](feats, scale)
    grads = torch.autograd.grad(loss, [*feats, scale], allow_unused=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_compat_rank_local_kernels_ignore_autocast():
    """compat.open_clip's rank-local InfoNCE and SigLIP sweeps (no process group
    needed: the local rows against given columns)."""
    from flashcontrast.compat.open_clip import SIGLIP_PAIR, _row_cross_entropy, sweep

    q = torch.nn.functional.normalize(torch.randn(8, 8), dim=1).requires_grad_(True)
    keys = torch.nn.functional.normalize(torch.randn(24, 8), dim=1).requires_grad_(True)
    scale = torch.tensor(50.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    for run in (
        lambda: _row_cross_entropy(q, keys, scale, None, "torch"),
        lambda: sweep(q, keys, scale, bias, SIGLIP_PAIR, "torch")["total"] / q.shape[0],
    ):
        ref = run()
        ref_grads = torch.autograd.grad(ref, (q, keys, scale))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run()
        grads = torch.autograd.grad(loss, (q, keys, scale))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
