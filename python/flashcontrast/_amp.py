"""Autocast and the losses: every op computes in the accumulation dtype it chose itself.

The kernels take the features in their own dtype and accumulate in float32 (float64 for
float64 inputs) by explicit casts. Under ``torch.autocast`` (how bf16 / fp16 training
usually calls a loss) the GEMMs of the blockwise PyTorch tiles would silently run in 16
bits in the forward, while the backward, usually called outside autocast, recomputes the
logits in float32 against 16-bit logsumexps: the gradient of neither loss (measured: 1-7%
relative error in the feature gradients). So every op of the package runs with autocast
disabled: under autocast the loss and gradients equal those without it, for every backend
(the Triton and CUDA kernels never saw autocast anyway). Inputs are not cast: 16-bit
features stay 16-bit.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)


def _first_device_type(args: tuple, kwargs: dict):
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor):
                    return t.device.type
    return None


def autocast_off(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled on the device type of its first tensor
    argument (an autograd.Function's forward/backward, or a torch.library op's
    implementation; the signature is kept, so custom_op still infers its schema)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = _first_device_type(args, kwargs)
        available = getattr(torch.amp, "is_autocast_available", None)
        if dev is None or (available is not None and not available(dev)):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    # torch.library.custom_op reads the schema from the signature and evaluates string
    # annotations (``from __future__ import annotations``) in the wrapper's module: hand
    # it the resolved ones of ``fn``.
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
    ]
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=hints.get("return", sig.return_annotation)
    )
    return wrapper  # type: ignore[return-value]
