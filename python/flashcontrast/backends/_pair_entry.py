"""The pair engine's two public entry points, spelled once for the three backends.

Every backend's ``pair_forward`` / ``pair_backward`` (``blockwise/pair.py``,
``triton/pair.py``, ``cuda.py``) has the contract's signature (``backends/__init__.py``;
the semantics: ``backends/pair.py``). A backend writes only its sweep, as a function of
one :class:`Sweep` (the arguments both directions share), and takes its public functions
from :func:`forward_entry` / :func:`backward_entry`: same parameters, defaults, docstring
and module as a plain ``def`` would have. ``max_block_elements`` (the "torch" backend's
block budget; "cuda" accepts and ignores it) is not in Triton's signatures:
``budget=False`` leaves it out, and passing it raises the TypeError Python would.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .pair import Coefs, Grads, Pair, Stats

__all__ = ["Sweep", "backward_entry", "forward_entry"]


class Sweep(NamedTuple):
    """The arguments of one sweep (``backends/pair.py``) both directions take."""

    a: Tensor  # (n, D) rows
    b: Tensor  # (m, D) columns
    scale: Tensor  # one element
    bias: Optional[Tensor]  # one element; None: 0
    pair: Pair
    row_offset: int  # global index of row 0
    col_offset: int  # global index of column 0
    row_groups: Optional[Tensor]  # (n,) int32/int64 group ids, with col_groups, or None
    col_groups: Optional[Tensor]  # (m,)
    positive_logits: Optional[Tensor]  # (n,) the positives' logits, or None
    max_block_elements: Optional[int]  # "torch"'s block budget; "cuda" ignores it; Triton: None


#: impl(sweep) -> Stats
ForwardImpl = Callable[[Sweep], Stats]
#: impl(sweep, stats, coefs, out_dtype) -> Grads
BackwardImpl = Callable[[Sweep, Stats, Coefs, Optional[torch.dtype]], Grads]


def forward_entry(impl: ForwardImpl, budget: bool = True) -> Callable[..., Stats]:
    """The public ``pair_forward`` of a backend whose sweep is ``impl``."""

    def pair_forward(
        a: Tensor,
        b: Tensor,
        scale: Tensor,
        bias: Optional[Tensor],
        pair: Pair,
        row_offset: int = 0,
        col_offset: int = 0,
        row_groups: Optional[Tensor] = None,
        col_groups: Optional[Tensor] = None,
        positive_logits: Optional[Tensor] = None,
        max_block_elements: Optional[int] = None,
    ) -> Stats:
        sweep = Sweep(
            a, b, scale, bias, pair, row_offset, col_offset, row_groups, col_groups,
            positive_logits, max_block_elements,
        )  # fmt: skip
        return impl(sweep)

    return _public(pair_forward, impl, budget)


def backward_entry(impl: BackwardImpl, budget: bool = True) -> Callable[..., Grads]:
    """The public ``pair_backward`` of a backend whose backward sweep is ``impl``."""

    def pair_backward(
        a: Tensor,
        b: Tensor,
        scale: Tensor,
        bias: Optional[Tensor],
        pair: Pair,
        stats: Stats,
        coefs: Coefs,
        row_offset: int = 0,
        col_offset: int = 0,
        row_groups: Optional[Tensor] = None,
        col_groups: Optional[Tensor] = None,
        positive_logits: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
        max_block_elements: Optional[int] = None,
    ) -> Grads:
        sweep = Sweep(
            a, b, scale, bias, pair, row_offset, col_offset, row_groups, col_groups,
            positive_logits, max_block_elements,
        )  # fmt: skip
        return impl(sweep, stats, coefs, out_dtype)

    return _public(pair_backward, impl, budget)


def _public(entry: Callable, impl: Callable, budget: bool) -> Callable:
    """``entry`` named and documented as the backend's own function (impl's docstring and
    module); without ``budget``, with the signature minus its last parameter
    (``max_block_elements``), enforced as Python enforces a ``def``'s."""
    entry.__module__, entry.__doc__ = impl.__module__, impl.__doc__
    entry.__qualname__ = entry.__name__
    if budget:
        return entry
    full = inspect.signature(entry)
    narrow = full.replace(parameters=list(full.parameters.values())[:-1])

    @functools.wraps(entry)
    def without_budget(*args, **kwargs):
        narrow.bind(*args, **kwargs)  # TypeError for max_block_elements, as for any extra
        return entry(*args, **kwargs)

    without_budget.__signature__ = narrow  # type: ignore[attr-defined]
    return without_budget
