"""Measured times of the Triton backend's two pair paths: what replaces the cost model's
choice between them once a GPU has run.

``python -m flashcontrast.bench --gpu-report`` times CLIP and SigLIP on the Triton backend
twice per shape: on ``auto``'s path and on the fused path forced (bench/first_contact.py)
and writes the pairs to ``benchmarks/results/<device>/paths-<date>.json``; ``python -m
flashcontrast.bench.record FILE`` merges them into ``measured_paths.json`` beside this
module, committed and shipped in the wheel. ``auto`` on a CUDA device of a class with
measured rows in the features' dtype takes the faster measured path of the nearest row
(nearest D first, then nearest N); elsewhere, the cost model (``costmodel.choose_pair_path``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RECORD = Path(__file__).with_name("measured_paths.json")


@dataclass(frozen=True)
class PathTiming:
    """One shape's forward + backward, both Triton paths, on one device class."""

    objective: str
    n: int
    d: int
    dtype: str  # "bfloat16", "float16", "float32"
    fused_ms: float
    panel_ms: float


def load(path: Path = RECORD) -> dict[str, tuple[PathTiming, ...]]:
    """device class -> its measured rows (an unreadable or absent file: none)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, list[PathTiming]] = {}
    for record in data.get("records", []):
        rows = out.setdefault(record["device_class"], [])
        rows += [PathTiming(**row) for row in record.get("timings", [])]
    return {cls: tuple(rows) for cls, rows in out.items()}


#: Loaded once, at import: a constant while torch.compile traces.
MEASURED: dict[str, tuple[PathTiming, ...]] = load()


def measured_choice(
    device_class: Optional[str], n: int, m: int, d: int, dtype: str
) -> Optional[str]:
    """ "fused" or "panel" by the nearest measured row of ``device_class`` in ``dtype`` (an
    (n x m) sweep at D = ``d``: nearest log D, then nearest log N against the geometric
    mean of n and m); None where nothing was measured."""
    rows = [r for r in MEASURED.get(device_class or "", ()) if r.dtype == dtype]
    if not rows or d <= 0:
        return None
    side = math.sqrt(max(n * m, 1))
    best = min(rows, key=lambda r: (abs(math.log(r.d / d)), abs(math.log(r.n / side))))
    return "panel" if best.panel_ms < best.fused_ms else "fused"
