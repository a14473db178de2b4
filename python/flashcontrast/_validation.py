"""Input checks shared by every objective: clear errors that name the problem.

Checks here never synchronize with the device (no ``.item()``): they look at shapes,
dtypes and devices only. NaN or inf in the inputs are not checked for; they propagate to
the loss and the gradients as they would in the reference.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Scalar = Union[float, int, torch.Tensor]


def check_features(name: str, x: object) -> torch.Tensor:
    """Return ``x`` if it is a floating (N, D) tensor with N >= 1 and D >= 1, else raise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0): the loss is undefined")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (D = 0)")
    return x


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Require two feature matrices to agree in shape, dtype and device."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (N, D), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scalar_tensor(
    name: str, value: Optional[Scalar], like: torch.Tensor, required: bool = True
) -> Optional[torch.Tensor]:
    """Turn a python number or a one-element tensor into a 0-d tensor for the kernels.

    The result is on ``like``'s device in its accumulation dtype; autograd flows back to
    ``value`` when it is a tensor that requires grad. A 0-d CPU tensor is moved to the
    feature device (as PyTorch itself allows CPU scalars beside device tensors).
    """
    acc = accumulation_dtype(like.dtype)
    if value is None:
        if required:
            raise TypeError(f"{name} is required, got None")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"{name} must be a float or a one-element tensor, got {type(value).__name__}"
        )
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=acc, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != like.device and not (value.device.type == "cpu" and value.dim() == 0):
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value.reshape(()).to(device=like.device, dtype=acc)
