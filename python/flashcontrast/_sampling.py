"""Random negatives for Symile's O(N) negative sampling, drawn like the published package.

``symile.Symile(negative_sampling="n")`` (pip ``symile`` 0.1.0) loops over the modalities
as anchors, in list order, and for each anchor over the *other* modalities, in list order,
calling ``torch.randperm(N)`` once per other modality on the default (CPU) generator. The
permutation drawn for other-modality ``o`` shuffles its rows: column ``j`` of the anchor's
logit matrix is built from ``x^o[perm[j]]``.

:func:`symile_negative_permutations` makes exactly those calls, in exactly that order, and
returns them as one ``(M, M-1, N)`` int64 tensor::

    perms[m, k, :]   the permutation applied to the k-th non-anchor modality (the k-th
                     entry of ``[x for o, x in enumerate(reps) if o != m]``) when
                     modality m is the anchor.

so that, after ``torch.manual_seed(seed)``, the reference, the fused backends and the
published package all see the same negatives. Drawing them up front, in one place, is
what lets a fused kernel consume them as a plain index tensor.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["symile_negative_permutations"]


def symile_negative_permutations(
    num_modalities: int,
    n: int,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> torch.Tensor:
    """Draw Symile's per-anchor row permutations in the published package's order.

    Args:
        num_modalities: M, the number of modalities (>= 2; the Symile losses need >= 3).
        n: N, the batch size (>= 1).
        generator: the generator to draw from. ``None`` draws from the default CPU
            generator, exactly as ``symile.Symile`` does (``torch.randperm(N)`` with no
            generator and no device, whatever device the representations live on). A
            generator given here draws on its own device.
        device: where to put the result (default: where it was drawn). Moving it does not
            change the values.

    Returns:
        ``(M, M-1, N)`` int64 tensor; ``out[m, k]`` is the ``k``-th draw made while
        modality ``m`` is the anchor, i.e. the permutation of the ``k``-th other modality
        in list order. The draws happen in row-major order of the first two axes.
    """
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
        raise TypeError(f"num_modalities must be an int, got {type(num_modalities).__name__}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if num_modalities < 2:
        raise ValueError(f"num_modalities must be >= 2, got {num_modalities}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    draws = []
    for _anchor in range(num_modalities):
        for _other in range(num_modalities - 1):
            if generator is None:
                # Exactly the published call: default generator, CPU, int64.
                draws.append(torch.randperm(n))
            else:
                draws.append(torch.randperm(n, generator=generator, device=generator.device))
    out = torch.stack(draws).view(num_modalities, num_modalities - 1, n)
    if device is not None:
        out = out.to(device)
    return out
