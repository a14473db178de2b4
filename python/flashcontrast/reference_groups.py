"""Materializing oracles for the group-masked multi-view losses (``groups=``).

Same formulas as :func:`flashcontrast.reference.multiview_infonce_loss` and
:func:`flashcontrast.reference.multiview_dhel_loss` (docs/objectives.md section 3), with one
extra mask. ``groups`` is an integer tensor (N,) of group ids: a pair of DIFFERENT samples
j != i with groups[j] == groups[i] is not a negative pair, so its similarities leave the
negative sums. Nothing else changes:

    MV-InfoNCE:  L = -(1/N) sum_i log [ sum_{l != l'} e^{s u_il.u_il'}
                        / sum_l sum_{(j,m) != (i,l), j = i or g_j != g_i} e^{s u_il.u_jm} ]
                 (the numerator is untouched; the other views of sample i itself stay in
                 the denominator, as the published code has them)
    MV-DHEL:     L = -(1/N) sum_i [ LSE_{l < l'} (s u_il.u_il')
                                    - sum_l LSE_{j != i, g_j != g_i} (s u_il.u_jl) ]

With all ids distinct these are the unmasked losses. An MV-DHEL row with no negative left
(every other sample in i's group) has LSE = -inf, and so has the loss.
These oracles build the full (V N, V N) / (V, N, N) matrices: tests only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import Scale, Views, _check_scale, _eye_mask, _stack_views

__all__ = ["multiview_dhel_loss_masked", "multiview_infonce_loss_masked"]


def _same_group_other_sample(groups: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """(N, N) bool: j != i and groups[j] == groups[i] (all False without groups)."""
    if groups is None:
        return torch.zeros(n, n, dtype=torch.bool, device=device)
    g = groups.reshape(-1).to(device)
    return (g[:, None] == g[None, :]) & ~_eye_mask(n, device)


def _views_and_view_pairs(views: Views, logit_scale: Scale):
    """(u (V, N, D), pos (N, V, V)): the stacked views and s <u_l,n, u_k,n> for every pair
    of views (l, k) of each sample n, after the scale's check."""
    _check_scale("logit_scale", logit_scale)
    u = _stack_views(views)
    return u, logit_scale * torch.einsum("lnd,knd->nlk", u, u)


def multiview_infonce_loss_masked(
    views: Views, logit_scale: Scale, groups: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MV-InfoNCE whose denominator skips other samples of the anchor's group."""
    u, pos = _views_and_view_pairs(views, logit_scale)
    v, n, d = u.shape
    z = u.reshape(v * n, d)  # row l * N + i
    sim = logit_scale * (z @ z.T)
    mask = _eye_mask(v * n, sim.device) | _same_group_other_sample(groups, n, sim.device).repeat(
        v, v
    )
    sim = sim.masked_fill(mask, float("-inf"))
    log_den = torch.logsumexp(torch.logsumexp(sim, dim=1).view(v, n), dim=0)
    pos = pos.masked_fill(_eye_mask(v, pos.device), float("-inf"))
    log_num = torch.logsumexp(pos.reshape(n, v * v), dim=1)
    return (log_den - log_num).mean()


def multiview_dhel_loss_masked(
    views: Views, logit_scale: Scale, groups: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MV-DHEL whose per-view uniformity term skips other samples of the anchor's group."""
    u, pos = _views_and_view_pairs(views, logit_scale)
    v, n, _ = u.shape
    sim = logit_scale * torch.einsum("lid,ljd->lij", u, u)
    mask = _eye_mask(n, sim.device) | _same_group_other_sample(groups, n, sim.device)
    sim = sim.masked_fill(mask, float("-inf"))
    log_neg = torch.logsumexp(sim, dim=2).sum(dim=0)
    rows, cols = torch.triu_indices(v, v, offset=1, device=pos.device)
    log_pos = torch.logsumexp(pos[:, rows, cols], dim=1)
    return (log_neg - log_pos).mean()
