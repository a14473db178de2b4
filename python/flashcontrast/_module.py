"""The base of the loss modules: a backend name and nothing to learn."""

from __future__ import annotations

from torch import nn


class BackendLoss(nn.Module):
    """A loss module that holds no parameters (the logit scale and bias belong to the
    model) and the backend its calls run on ("auto", "cuda", "triton", "torch" or
    "reference"; see :func:`flashcontrast.backend_for`). Subclasses keep their constructor
    options as attributes, name them in :attr:`option_names` and call their function in
    ``forward``, with :meth:`call_options` where its keywords are those names."""

    #: The attributes holding the constructor options, shown by ``repr`` before the backend.
    option_names: tuple[str, ...] = ()

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def call_options(self) -> dict:
        """The options and the backend, as keyword arguments of the module's function."""
        return {**{k: getattr(self, k) for k in self.option_names}, "backend": self.backend}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.call_options().items())
