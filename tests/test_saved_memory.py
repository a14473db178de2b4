"""What each loss keeps alive between its forward and its backward, for bf16 features: the
inputs themselves and O(N) statistics, never a float32 copy of the features (twice the
bf16 input memory) or anything of size N x N.

Measured with torch.autograd.graph.saved_tensors_hooks: every tensor autograd saves for
the backward passes through the pack hook; tensors that share storage with an input are
the input, the rest is counted in bytes.
"""

from __future__ import annotations

import pytest
import torch

import flashcontrast as fc
from verification import BACKENDS

N, D, V = 96, 256, 3


def _saved_bytes_beyond_inputs(fn, inputs: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves while ``fn(*inputs)`` runs, other than the
    inputs' own storage (each storage counted once)."""
    own = {x.untyped_storage().data_ptr() for x in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and t.numel() > 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs)
    loss.backward()  # the saved graph must be the one that runs
    return sum(seen.values())


def _features(count: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    xs = torch.nn.functional.normalize(torch.randn(count, N, D), dim=-1).bfloat16()
    return [x.clone().requires_grad_() for x in xs]


def _views() -> list[torch.Tensor]:
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(V, N, D), dim=-1).bfloat16()
    return [u.requires_grad_()]


def _anchors_and_candidates() -> list[torch.Tensor]:
    """anchors (N, D) and candidates (2 N, D): two stacked batches of N (K = 2)."""
    torch.manual_seed(0)
    xs = torch.nn.functional.normalize(torch.randn(3 * N, D), dim=-1).bfloat16()
    return [xs[:N].clone().requires_grad_(), xs[N:].clone().requires_grad_()]


_LABELS = torch.arange(N) // 4  # four samples a class
_PERMS = torch.stack([torch.stack([torch.roll(torch.arange(N), k + 1) for k in range(2)])] * 3)

# objective -> (inputs, loss given the backend, statistics vectors of N it may keep)
LOSSES = {
    "clip": (lambda: _features(2), lambda b: lambda x, y: fc.clip_loss(x, y, 20.0, backend=b)),
    "siglip": (
        lambda: _features(2),
        lambda b: lambda x, y: fc.siglip_loss(x, y, 10.0, -10.0, backend=b),
    ),
    "infonce": (
        lambda: _features(2),
        lambda b: lambda x, y: fc.infonce_loss(x, y, 20.0, backend=b),
    ),
    "mv-infonce": (
        _views,
        lambda b: lambda u: fc.multiview_infonce_loss(u, 20.0, backend=b),
    ),
    "mv-dhel": (_views, lambda b: lambda u: fc.multiview_dhel_loss(u, 20.0, backend=b)),
    "symile-n": (
        lambda: _features(3),
        lambda b: lambda x, y, z: fc.symile_loss([x, y, z], 20.0, permutations=_PERMS, backend=b),
    ),
    "multi-positive": (
        _anchors_and_candidates,
        lambda b: lambda a, c: fc.multi_positive_infonce_loss(a, c, 20.0, backend=b),
    ),
    "cwcl": (
        lambda: _features(3),
        lambda b: lambda x, y, u: fc.cwcl_loss(x, y, 20.0, weight_features=u, backend=b),
    ),
    "cwcl-weight-fn": (
        lambda: _features(3),
        lambda b: (
            lambda x, y, u: fc.cwcl_loss(
                x, y, 20.0, weight_features=u, weight_fn=lambda c: (1 + c) ** 2, backend=b
            )
        ),
    ),
    "supcon": (_views, lambda b: lambda u: fc.supcon_loss(u, _LABELS, 0.1, backend=b)),
    "uniformity": (lambda: _features(1), lambda b: lambda x: fc.uniform_loss(x, backend=b)),
    "cross-uniformity": (
        lambda: _features(2),
        lambda b: lambda x, y: fc.cross_uniform_loss(x, y, backend=b),
    ),
    "align": (lambda: _features(2), lambda b: lambda x, y: fc.align_loss(x, y)),
    "contrastive-gap": (
        lambda: _features(2),
        lambda b: lambda x, y: fc.contrastive_gap_loss(x, y, 20.0, variant="cuaxu", backend=b),
    ),
    "gram": (
        lambda: _features(3),
        lambda b: lambda t, v, a: fc.gram_loss(t, [v, a], 14.3, backend=b),
    ),
}

# Up to 16 float32 vectors of N per (view or modality) and anchor: statistics, (max, sum)
# pairs, per-column constants. A float32 copy of one (N, D) feature matrix is D / 16 = 16
# times more; the inputs' own bf16 storage would be 8 times more.
BOUND = 16 * 4 * N * V * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_saved_tensors_are_inputs_and_statistics(name, backend):
    inputs, make = LOSSES[name]
    xs = inputs()
    extra = _saved_bytes_beyond_inputs(make(backend), xs)
    feature_bytes = sum(x.numel() for x in xs) * 4  # one float32 copy of the features
    if name == "gram":  # its one visible copy: the (K, N, D) stack of the others, in bf16
        extra -= sum(x.numel() * x.element_size() for x in xs[1:])
    assert extra <= BOUND < 4 * N * D, (  # below one float32 (N, D) copy
        f"{name} on {backend} keeps {extra} bytes beyond its bf16 inputs "
        f"(bound {BOUND}; a float32 copy of the features is {feature_bytes})"
    )


def test_symile_n_squared_saves_inputs_and_statistics():
    """Symile "n_squared" (its own kernels, N^2 candidates per row: the torch backend only
    here, the others' n^2 kernels are slow on the CPU at this N) keeps the inputs and the
    (M, N) LSEs, no float32 copy (it kept three before)."""
    xs = _features(3)
    extra = _saved_bytes_beyond_inputs(
        lambda x, y, z: fc.symile_loss([x, y, z], 20.0, negative_sampling="n_squared"), xs
    )
    assert extra <= BOUND, extra
