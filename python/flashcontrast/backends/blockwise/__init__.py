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


#: The pair engine's panels on CUDA (``pair.py``, the panel path): unless a call passes
#: ``max_block_elements``, a (rows x m) panel's buffers may take this fraction of the
#: device's memory (at least the ``MAX_BLOCK_ELEMENTS`` block). Large panels keep the dB
#: product's K dimension (the panel's rows) long: its float32 read-modify-write of dB costs
#: 8 D / rows bytes per logit. The knob: set it, or pass ``max_block_elements``.
PANEL_FRACTION = 1 / 32
#: Bytes per (row, column) entry the torch backend's backward keeps for a panel at its
#: peak: S, X, dS and one softmax in float32, dS rounded to 16 bits, the masks' booleans.
#: (The Triton panel path keeps X in float32 and dS in the features' dtype: 4 + e.)
PANEL_BYTES_PER_ENTRY = 20


def panel_rows(
    m: int,
    device: torch.device,
    max_elements: Optional[int] = None,
    bytes_per_entry: int = PANEL_BYTES_PER_ENTRY,
) -> int:
    """Rows per panel of the pair engine against ``m`` columns: ``max_elements`` per panel
    where given, else on CUDA :data:`PANEL_FRACTION` of the device's memory at
    ``bytes_per_entry`` (at least the ``MAX_BLOCK_ELEMENTS`` block), else that block."""
    if max_elements is None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        panel = int(total * PANEL_FRACTION) // bytes_per_entry
        max_elements = max(MAX_BLOCK_ELEMENTS["cuda"], panel)
    return block_rows(m, device, max_elements)


def block_rows(n: int, device: torch.device, max_elements: Optional[int] = None) -> int:
    """Rows per block so that a (rows, n) block stays within the element budget."""
    budget = max_elements or MAX_BLOCK_ELEMENTS.get(device.type, 1 << 22)
    return max(1, min(n, budget // n))
