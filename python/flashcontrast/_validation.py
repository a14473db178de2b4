"""Input checks shared by every objective: clear errors that name the problem.

Checks here never synchronize with the device (no ``.item()``): they look at shapes,
dtypes and devices only. NaN or inf in the inputs are not checked for; they propagate to
the loss and the gradients as they would in the reference.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: A scalar argument (logit scale, bias, temperature): a Python float or int, a NumPy real
#: scalar (``np.floating`` / ``np.integer``) or one-element array, or a one-element
#: floating tensor (the only kind that can receive a gradient).
Scalar = Union[float, int, np.floating, np.integer, np.ndarray, torch.Tensor]


def check_strided(name: str, x: torch.Tensor) -> None:
    """Require a dense (strided) tensor: sparse (COO, CSR, ...) and mkldnn tensors have no
    strides the kernels could read, and torch's own errors on them name no argument."""
    if x.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {x.layout}; "
            "convert it with .to_dense()"
        )


def check_features(
    name: str,
    x: object,
    *,
    dense: Callable[[str, torch.Tensor], object] = check_strided,
    empty_ok: bool = False,
) -> torch.Tensor:
    """Return ``x`` if it is a dense floating (N, D) tensor with N >= 1 and D >= 1, else
    raise (TypeError for a non-tensor, a non-strided layout or a dtype outside
    FEATURE_DTYPES; ValueError for a shape that is not (N >= 1, D >= 1)). ``dense(name,
    x)``: the layout check; ``empty_ok``: allow N = 0 (the process-group shard check
    passes both: its own dense check, and empty shards)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    dense(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.shape[0] == 0 and not empty_ok:
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


def check_symile_modalities(m: int, clip_loss: str) -> None:
    """Require M >= 3 Symile representations (ValueError); for M = 2 the error points to
    ``clip_loss`` (the CLIP loss to call instead: Symile of two modalities is CLIP)."""
    if m == 2:
        raise ValueError(
            "Symile with M = 2 modalities is CLIP InfoNCE (the multilinear inner product "
            f"of two vectors is their dot product): use {clip_loss}"
        )
    if m < 3:
        raise ValueError(f"Symile needs M >= 3 representations, got {m}")


def check_rows_and_columns(
    name_a: str, a: object, name_b: str, b: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check rows a (N, D) and columns b (M, D) as features (:func:`check_features`) that
    share dtype, device and D (N and M may differ); return them. ValueError names both."""
    a, b = check_features(name_a, a), check_features(name_b, b)
    if b.dtype != a.dtype or b.device != a.device or b.shape[1] != a.shape[1]:
        raise ValueError(
            f"{name_b} must match {name_a}'s dtype, device and D: got {tuple(b.shape)} "
            f"{b.dtype} on {b.device} against {tuple(a.shape)} {a.dtype} on {a.device}"
        )
    return a, b


def check_groups(
    groups: object, n: int, device: torch.device, owner: str = "the features"
) -> Optional[torch.Tensor]:
    """Return ``groups`` (None, or an (n,) int32 / int64 tensor on ``device``: the group
    ids of false negatives), else raise (TypeError for a non-tensor or another dtype,
    ValueError for the shape or the device; ``owner`` names what the ids belong to)."""
    if groups is None:
        return None
    if not isinstance(groups, torch.Tensor):
        raise TypeError(
            f"groups must be an integer tensor of shape (N,), got {type(groups).__name__}"
        )
    if groups.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"groups must be an integer tensor (int32 or int64), got {groups.dtype}")
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape (N,) = ({n},), got {tuple(groups.shape)}")
    if groups.device != device:
        raise ValueError(f"groups is on {groups.device} but {owner} are on {device}")
    return groups


def pair_arguments(
    name_a: str, a: object, name_b: str, b: object, logit_scale: object, logit_bias: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The checked (a, b, scale, bias) of a two-tower loss: two (N, D) feature matrices
    that agree in shape, dtype and device, the scale as a 0-d tensor, the bias as one or
    None (see :func:`as_scalar_tensor`)."""
    a = check_features(name_a, a)
    b = check_features(name_b, b)
    check_pair(name_a, a, name_b, b)
    scale = as_scalar_tensor("logit_scale", logit_scale, a)
    bias = as_scalar_tensor("logit_bias", logit_bias, a, required=False)
    return a, b, scale, bias


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _numpy_real(name: str, value: Union[np.generic, np.ndarray]) -> float:
    """A NumPy real scalar or one-element array as a Python float (bool and complex raise)."""
    kind = value.dtype.kind
    if kind not in "fiu":  # b: bool, c: complex, O/U/S/M/m: not numbers
        raise TypeError(f"{name} must be a real number, got a NumPy {value.dtype} value")
    if value.size != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {value.shape}")
    return float(value.reshape(()))


def as_scalar_tensor(
    name: str, value: Optional[Scalar], like: torch.Tensor, required: bool = True
) -> Optional[torch.Tensor]:
    """Turn a number or a one-element tensor into a 0-d tensor for the kernels.

    Accepted: a Python float or int (not bool), a NumPy real scalar (``np.float32``,
    ``np.int64``, ...; not ``np.bool_``) or one-element real array, or a one-element
    floating tensor. The result is 0-d, on ``like``'s device, in its accumulation dtype;
    autograd flows back to ``value`` when it is a tensor that requires grad. A 0-d CPU
    tensor is moved to the feature device (as PyTorch itself allows CPU scalars beside
    device tensors). Numbers become a new tensor (no host synchronization either way).
    """
    acc = accumulation_dtype(like.dtype)
    if value is None:
        if required:
            raise TypeError(f"{name} is required, got None")
        return None
    if isinstance(value, (np.generic, np.ndarray)):
        return torch.tensor(_numpy_real(name, value), dtype=acc, device=like.device)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"{name} must be a float, an int, a NumPy real scalar or a one-element tensor, "
            f"got {type(value).__name__}"
        )
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=acc, device=like.device)
    check_strided(name, value)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != like.device and not (value.device.type == "cpu" and value.dim() == 0):
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value.reshape(()).to(device=like.device, dtype=acc)
