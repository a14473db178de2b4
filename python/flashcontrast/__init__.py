"""flashcontrast: fused, memory-linear kernels for contrastive objectives.

Import it and swap one line: ``flashcontrast.clip_loss(img, txt, logit_scale)`` computes
CLIP's symmetric InfoNCE without ever holding the N x N logit matrix, with exact gradients
for both feature matrices, the logit scale and the optional bias. ``gram_loss`` (GRAM's
Gram-volume loss) and ``symile_loss`` (Symile, "n" and "n_squared" negatives) do the same
for objectives whose references hold (N, N, M, M) and (N, N^2) tensors, and
``siglip_loss``, ``multiview_infonce_loss`` and ``multiview_dhel_loss`` complete the set.

Backends (``backend=``): "cuda" (AOT kernels in the wheel), "triton" (JIT
kernels), "torch" (blockwise PyTorch, any device), "reference" (the materializing oracle),
and "auto", which picks by what is built and where the tensors live. See
:func:`backend_for`, :func:`explain_backend` and :func:`last_backend` for which one runs.
"""

from . import functional, modules
from ._dispatch import BACKENDS, backend_for, explain_backend, last_backend
from ._version import __version__
from .functional import *  # noqa: F403  (the loss functions: functional.__all__)
from .modules import *  # noqa: F403  (their nn.Module forms: modules.__all__)

__all__ = [
    "BACKENDS",
    "__version__",
    "backend_for",
    "explain_backend",
    "last_backend",
    *functional.__all__,
    *modules.__all__,
]
