"""The "torch" backend: blockwise PyTorch that runs on any device in O(N D) memory.

The pair engine (``pair.py``: CLIP, SigLIP, InfoNCE, the multi-view losses and Symile
"n") and the kernels that stay outside it (``gram.py``; ``symile.py``: Symile
"n_squared"), with the functions of the backend contract (``flashcontrast.backends``).
Named blockwise rather than torch (the first design notes' name, docs/design.md) so that
it can never shadow the ``torch`` package for code inside ``flashcontrast.backends``.
Logits are visited a block of rows at a time; the block budget below bounds the memory
of every objective.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Upper bound on the elements of one (rows x columns) logit block, per device type.
MAX_BLOCK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 22}


def block_rows(n: int, device: torch.device, max_elements: Optional[int] = None) -> int:
    """Rows per block so that a (rows, n) block stays within the element budget."""
    budget = max_elements or MAX_BLOCK_ELEMENTS.get(device.type, 1 << 22)
    return max(1, min(n, budget // n))
