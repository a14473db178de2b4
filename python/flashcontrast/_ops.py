"""What every objective's ops share: finding the backend module that implements them.

Each objective lives in ``objectives/<name>.py``: its input checks, its torch.library ops
(a forward that returns the loss and O(N) statistics, a backward that recomputes tiles,
both with fake implementations so that ``torch.compile(fullgraph=True)`` traces callers
without graph breaks), the autograd formula attached with
``torch.library.register_autograd``, and the public function. register_autograd plays the
role of the original design's per-objective autograd Function (docs/design.md), and
unlike a Python autograd.Function it is traced by AOTAutograd as one opaque op in both
the forward and the backward graph.

``backend`` reaches the ops as a resolved name ("torch", "triton" or "cuda"), a string
argument, so the choice is part of the traced graph. :func:`backend_module` (importlib)
runs only inside the ops' implementations, which torch.compile does not trace (it traces
the fake implementations and calls the op at run time), so it needs no care there.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_PACKAGES = {"torch": "blockwise", "triton": "triton"}


def backend_module(name: str, objective: str) -> ModuleType:
    """The module implementing ``objective`` for backend ``name`` (the contract of
    ``flashcontrast.backends``): backends/blockwise/<objective>.py for "torch",
    backends/triton/<objective>.py for "triton", backends/cuda.py for "cuda"."""
    if name == "cuda":
        return importlib.import_module(f"{__package__}.backends.cuda")
    if name not in _PACKAGES:
        raise ValueError(f"no kernel backend named {name!r}")
    return importlib.import_module(f"{__package__}.backends.{_PACKAGES[name]}.{objective}")
