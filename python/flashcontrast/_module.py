"""The base of the loss modules: a backend name and nothing to learn."""

from __future__ import annotations

from torch import nn


class BackendLoss(nn.Module):
    """A loss module that holds no parameters (the logit scale and bias belong to the
    model) and the backend its calls run on ("auto", "cuda", "triton", "torch" or
    "reference"; see :func:`flashcontrast.backend_for`). Subclasses add their options to
    :meth:`options` and call their function in ``forward``."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def options(self) -> dict:
        """The constructor options shown by ``repr`` besides the backend."""
        return {}

    def extra_repr(self) -> str:
        shown = {**self.options(), "backend": self.backend}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
