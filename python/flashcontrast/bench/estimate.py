"""How long the default benchmark run will take, said before it starts.

One calibration call (the torch backend's CLIP at N = 1024, D = 256, a few milliseconds)
measures this machine; every row is then predicted from it by the relative costs in
``RELATIVE``, read off the committed full CPU run
(benchmarks/results/cpu/bench-2026-11-25T1858.csv, 2 threads): each objective and
implementation at N = 1024, D = 256 over CLIP's torch backend there, scaled by N^2 (N^3
for Symile "n_squared") and D. ``torch.compile`` of the reference adds its compile time
to each row. An estimate, printed as one; the progress lines show how it goes.
"""

from __future__ import annotations

import time

import torch

# total ms at N = 1024 (Symile n_squared: N = 128), D = 256, over clip/torch's 9.59 ms
RELATIVE = {
    ("clip", "reference"): 2.17,
    ("clip", "torch"): 1.0,
    ("siglip", "reference"): 0.95,
    ("siglip", "torch"): 0.95,
    ("mv-infonce-v4", "reference"): 30.5,
    ("mv-infonce-v4", "torch"): 15.2,
    ("mv-dhel-v4", "reference"): 5.5,
    ("mv-dhel-v4", "torch"): 3.8,
    ("gram-m4", "reference"): 39.4,
    ("gram-m4", "torch"): 5.4,
    ("symile-n", "reference"): 3.6,
    ("symile-n", "torch"): 3.1,
    ("symile-n2", "reference"): 6.9,  # at N = 128
    ("symile-n2", "torch"): 7.4,
    # not in that run: best of 5 against clip/torch in one session on the same machine
    ("infonce", "reference"): 0.6,
    ("infonce", "torch"): 0.75,
    ("supcon-v2", "reference"): 1.6,
    ("supcon-v2", "torch"): 2.4,
    ("multi-positive-k2", "reference"): 1.6,
    ("multi-positive-k2", "torch"): 2.2,  # was 4.8 with two sweeps (CPU time x 0.46)
    ("cwcl", "reference"): 1.2,  # three runs, the CPU shared with another job
    ("cwcl", "torch"): 1.45,
    ("contrastive-gap-cuaxu", "reference"): 2.8,  # best of 5, the CPU shared with another job
    ("contrastive-gap-cuaxu", "torch"): 2.0,
}
COMPILE_S = 12.0  # torch.compile of the reference, per row, on a 2-core CPU (seen: ~10 s)


def calibrate(device: torch.device) -> float:
    """Seconds of one CLIP forward + backward on the torch backend at N = 1024, D = 256."""
    from .measure import backend_call, make_inputs

    xs, scale = make_inputs("clip", 1024, 256, torch.float32, device)
    fn = backend_call("clip", "torch")
    fn(xs, scale).backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        fn(xs, scale).backward()
    return (time.perf_counter() - t0) / 3


def row_seconds(objective: str, impl: str, n: int, d: int, calls: int, unit_s: float) -> float:
    """Predicted seconds of one row (``calls`` forward + backward calls)."""
    base = "reference" if impl.startswith("reference") else "torch"
    rel = RELATIVE.get((objective, base), 1.0)
    scale = (n / 128) ** 3 if objective == "symile-n2" else (n / 1024) ** 2
    per_call = unit_s * rel * scale * d / 256
    return calls * per_call + (COMPILE_S if impl == "reference-compiled" else 0.0)
