"""Under torch.autocast every loss computes as without it (flashcontrast/_amp.py).

Autocast would run the blockwise tiles' GEMMs (and the positives computed above the ops)
in bfloat16 in the forward while the backward, called outside autocast, recomputes the
logits in float32: the gradient of neither loss (1-2% relative error before the fix). CPU
autocast dispatches like CUDA autocast, so this runs here; with float32 inputs the losses
and gradients under autocast must equal those without it.
"""

from __future__ import annotations

import pytest
import torch

import flashcontrast as fc
from verification import BACKENDS

N, D = 37, 24


def _feats(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1) for _ in range(k)]


def _perms() -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    return torch.stack([torch.randperm(N, generator=g) for _ in range(6)]).view(3, 2, N)


CALLS = {
    "clip": (2, lambda xs, s, be: fc.clip_loss(xs[0], xs[1], s, backend=be)),
    "clip-groups": (
        2,
        lambda xs, s, be: fc.clip_loss(xs[0], xs[1], s, groups=torch.arange(N) // 3, backend=be),
    ),
    "siglip": (2, lambda xs, s, be: fc.siglip_loss(xs[0], xs[1], s, -5.0, backend=be)),
    "mv-infonce": (3, lambda xs, s, be: fc.multiview_infonce_loss(xs, s, backend=be)),
    "mv-dhel": (3, lambda xs, s, be: fc.multiview_dhel_loss(xs, s, backend=be)),
    "gram": (3, lambda xs, s, be: fc.gram_loss(xs[0], xs[1:], s, backend=be)),
    "symile-n": (3, lambda xs, s, be: fc.symile_loss(xs, s, permutations=_perms(), backend=be)),
    "symile-n2": (
        3,
        lambda xs, s, be: fc.symile_loss(xs, s, negative_sampling="n_squared", backend=be),
    ),
    "contrastive-gap": (
        2,
        lambda xs, s, be: fc.contrastive_gap_loss(xs[0], xs[1], s, variant="cuaxu", backend=be),
    ),
}


def _loss_and_grads(call, xs, autocast: bool) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_(True) for x in xs]
    s = torch.tensor(10.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = call(xs, s)
    loss.backward()
    return [loss.detach(), *[x.grad for x in xs], s.grad]


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_autocast_leaves_loss_and_gradients_unchanged(name, backend):
    k, fn = CALLS[name]
    xs = _feats(k)

    def call(feats, s):
        return fn(feats, s, backend)

    plain = _loss_and_grads(call, xs, autocast=False)
    under = _loss_and_grads(call, xs, autocast=True)
    assert plain[0].dtype == torch.float32
    for i, (p, u) in enumerate(zip(plain, under)):
        assert u.dtype == p.dtype, (i, u.dtype)
        torch.testing.assert_close(u, p, rtol=1e-6, atol=1e-7, msg=f"output {i}")
