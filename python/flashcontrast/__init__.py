"""flashcontrast: fused, memory-linear kernels for contrastive objectives.

Import it and swap one line: ``flashcontrast.clip_loss(img, txt, logit_scale)`` computes
CLIP's symmetric InfoNCE without ever holding the N x N logit matrix, with exact gradients
for both feature matrices, the logit scale and the optional bias.

Backends (``backend=``): "cuda" (AOT kernels in the wheel, planned), "triton" (JIT
kernels), "torch" (blockwise PyTorch, any device), "reference" (the materializing oracle),
and "auto", which picks by what is built and where the tensors live. See
:func:`backend_for` and :func:`last_backend` for which one runs.
"""

from ._dispatch import BACKENDS, backend_for, last_backend
from ._version import __version__
from .functional import clip_loss
from .modules import ClipLoss

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "__version__",
    "backend_for",
    "clip_loss",
    "last_backend",
]
