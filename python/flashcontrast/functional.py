"""The public loss functions, one namespace for all objectives.

Each objective's function lives with its ops in ``objectives/<name>.py``: it checks its
inputs, resolves the backend and calls the shared torch.library ops, so the semantics
live there once, whatever backend runs.
"""

from .objectives.clip import clip_loss
from .objectives.contrastive_gap import contrastive_gap_loss
from .objectives.cwcl import cwcl_loss
from .objectives.gram import gram_loss, gram_volume
from .objectives.infonce import infonce_loss
from .objectives.multipositive import multi_positive_infonce_loss
from .objectives.multiview import multiview_dhel_loss, multiview_infonce_loss
from .objectives.siglip import siglip_loss
from .objectives.supcon import supcon_loss
from .objectives.symile import symile_loss
from .objectives.uniformity import align_loss, cross_uniform_loss, uniform_loss

__all__ = [
    "align_loss",
    "clip_loss",
    "contrastive_gap_loss",
    "cross_uniform_loss",
    "cwcl_loss",
    "gram_loss",
    "gram_volume",
    "infonce_loss",
    "multi_positive_infonce_loss",
    "multiview_dhel_loss",
    "multiview_infonce_loss",
    "siglip_loss",
    "supcon_loss",
    "symile_loss",
    "uniform_loss",
]
