"""The public loss functions, one namespace for all objectives.

Each objective's function lives with its ops in ``objectives/<name>.py``: it checks its
inputs, resolves the backend and calls the shared torch.library ops, so the semantics
live there once, whatever backend runs.
"""

from .objectives.clip import clip_loss

__all__ = ["clip_loss"]
