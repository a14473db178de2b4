"""The GPU report's correctness smoke: every objective x backend x dtype, by the rule.

Each case runs one objective's loss and all its gradients (features, logit scale, bias)
through a kernel backend and checks them against a float64 oracle by the verification
rule (``rule.py``). Shapes: an odd N with a D that is not a multiple of 16, and N with
N^2 > 2^31 (rows past 32-bit pair indices); in bf16 also the timing step's D = 512 and
1024 at a small N, so that its Triton kernels are compiled here, in parallel. The oracle
is the materializing reference in float64 (and in the input dtype for the rule's
same-dtype error) where N is small; at the large N, where the dense float64 reference
would hold tens of GB, it is the torch backend in float64 (O(N D) memory, itself checked
against the reference by the test suite) and, as the same-dtype stand-in, the torch
backend on the inputs as given (fp32 accumulation).

Cases are grouped by (objective, dtype, shape): one oracle per group, then each backend.
The groups are spread over worker processes (``python -m flashcontrast.bench.smoke
--worker``) so that Triton's JIT compiles run on many cores at once; each worker appends
one JSON line per case as it finishes, and the report folds them into its CSV as they
come. A failing case is a row, never an abort.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import functional
from ..backends import _paths
from .rule import check_rule

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: The kernel backends' two pair paths, each forced (``backends/_paths.py``): "triton" and
#: "cuda" rows run the fused tile kernels, "triton-panel" and "cuda-panel" the panel path
#: (cuBLAS GEMMs, the kernels as epilogues), on the pair engine's objectives. ``auto``
#: picks either by the shape, so an (objective, backend, dtype) triple is verified only
#: when both of its paths pass.
TRITON_PANEL, CUDA_PANEL = "triton-panel", "cuda-panel"
BACKENDS = ("torch", "triton", TRITON_PANEL, "cuda", CUDA_PANEL)
VERIFIED_AS = {TRITON_PANEL: "triton", CUDA_PANEL: "cuda"}
# backend name -> the implementation it runs as (backends/_paths.py's FORCED_PATHS)
_AS = {"triton": "triton-fused", "cuda": "cuda-fused"}
_PANELS = (TRITON_PANEL, CUDA_PANEL)  # pair-engine objectives only
# N with N^2 > 2^31 (46341^2 > 2^31): 46349, and its 3-view counterpart for the
# self-similarity losses (3 N rows).
LARGE_N = 46349


@dataclass(frozen=True)
class Objective:
    """How to build one objective's inputs and call it."""

    name: str
    key: str  # the dispatcher's objective name (the verification record's key)
    modalities: int
    call: Callable[[list, str], torch.Tensor]  # (leaves, backend) -> loss
    bias: bool = False
    large_n: int = LARGE_N
    engine: bool = True  # on the pair engine (so on the Triton panel path too)


def _perms(n: int, m: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    rows = [torch.stack([torch.randperm(n, generator=gen) for _ in range(m - 1)]) for _ in range(m)]
    return torch.stack(rows).to(device)


def _groups(n: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device) * 7919 % max(1, n // 3)).to(torch.int64)


OBJECTIVES = {
    o.name: o
    for o in [
        Objective(
            "clip", "clip", 2, lambda x, be: functional.clip_loss(x[0], x[1], x[2], backend=be)
        ),
        Objective(
            "clip-groups",
            "clip",
            2,
            lambda x, be: functional.clip_loss(
                x[0], x[1], x[2], x[3], groups=_groups(x[0].shape[0], x[0].device), backend=be
            ),
            bias=True,
        ),
        Objective(
            "siglip",
            "siglip",
            2,
            lambda x, be: functional.siglip_loss(x[0], x[1], x[2], x[3], backend=be),
            bias=True,
        ),
        Objective(
            "mv-infonce",
            "multiview",
            3,
            lambda x, be: functional.multiview_infonce_loss(list(x[:3]), x[3], backend=be),
            large_n=LARGE_N // 3 + 1,
        ),
        Objective(
            "mv-dhel",
            "multiview",
            3,
            lambda x, be: functional.multiview_dhel_loss(list(x[:3]), x[3], backend=be),
            large_n=LARGE_N // 3 + 1,
        ),
        Objective(
            "gram",
            "gram",
            3,
            lambda x, be: functional.gram_loss(x[0], x[1:3], x[3], label_smoothing=0.1, backend=be),
            engine=False,
        ),
        Objective(
            "symile-n",
            "symile",
            3,
            lambda x, be: functional.symile_loss(
                list(x[:3]), x[3], permutations=_perms(x[0].shape[0], 3, x[0].device), backend=be
            ),
        ),
        Objective(
            "symile-n2",
            "symile",
            3,
            lambda x, be: functional.symile_loss(
                list(x[:3]), x[3], negative_sampling="n_squared", backend=be
            ),
            large_n=1537,  # N^3 D work: the N^2 > 2^31 size would take minutes
            engine=False,
        ),
    ]
}


@dataclass(frozen=True)
class Group:
    """One oracle's worth of cases: an objective at one shape and dtype, every backend."""

    objective: str
    dtype: str
    n: int
    d: int
    large: bool  # oracle: the torch backend in float64 instead of the dense reference
    backends: tuple


def groups(device: torch.device, backends=BACKENDS, dtypes=tuple(DTYPES), tiny=False) -> list:
    """Every group of the smoke, most valuable first (bf16, then fp16, then fp32)."""
    out = []
    for dtype in dtypes:
        for name, obj in OBJECTIVES.items():
            if tiny:  # for the CPU test of the report: the same code, toy sizes
                shapes = [(7, 5, False), (33, 6, True)]
            else:
                shapes = [(97, 100, False), (obj.large_n, 40, True)]
                if dtype == "bfloat16":  # the timing step's D, compiled here
                    shapes += [(256, 512, False), (256, 1024, False)]
            mine = tuple(b for b in backends if obj.engine or b not in _PANELS)
            for n, d, large in shapes:
                out.append(Group(name, dtype, n, d, large, mine))
    return out


def _leaves(obj: Objective, n: int, d: int, dtype, device, seed: int) -> list:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    feats = [
        torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)
        for _ in range(obj.modalities)
    ]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scalars = [torch.tensor(10.0, dtype=acc, device=device)]
    if obj.bias:
        scalars.append(torch.tensor(-2.0, dtype=acc, device=device))
    return [*feats, *scalars]


def _loss_and_grads(obj: Objective, leaves: list, backend: str, grad_out: float = 1.3):
    xs = [x.detach().clone().requires_grad_() for x in leaves]
    with _paths.forced_as(_AS.get(backend, backend)) as backend:
        loss = obj.call(xs, backend)
        grads = torch.autograd.grad(loss * grad_out, xs)
    return [loss.detach(), *grads]


def _names(obj: Objective) -> list:
    feats = [f"d_x{k}" for k in range(obj.modalities)]
    return ["loss", *feats, "d_scale", *(["d_bias"] if obj.bias else [])]


def run_group(group: Group, device: torch.device, emit: Callable[[dict], None]) -> None:
    """Run one group: the oracle once, then every backend; ``emit`` one dict per case."""
    obj = OBJECTIVES[group.objective]
    dtype = DTYPES[group.dtype]
    leaves = _leaves(obj, group.n, group.d, dtype, device, seed=group.n * 1000 + group.d)
    t0 = time.perf_counter()
    oracle = "torch" if group.large else "reference"
    base = {
        **{k: v for k, v in asdict(group).items() if k != "backends"},
        "key": obj.key,
        "device": str(device),
        "oracle": f"{oracle}-float64",
    }
    try:
        exact = _loss_and_grads(obj, [x.double() for x in leaves], oracle)
        same = _loss_and_grads(obj, leaves, oracle)
    except Exception as e:  # no oracle, no verdict: every backend of the group says why
        for backend in group.backends:
            emit(
                {**base, "backend": backend, "status": "error", "detail": f"oracle: {_one_line(e)}"}
            )
        if _sticky_cuda_error(e):
            raise
        return
    oracle_s = time.perf_counter() - t0
    for backend in group.backends:
        row = {**base, "backend": backend}
        t0 = time.perf_counter()
        try:
            got = _loss_and_grads(obj, leaves, backend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            results = check_rule(_names(obj), got, same, exact, dtype)
            worst = max(results, key=lambda r: r.ratio)
            row.update(
                status="pass" if all(r.ok for r in results) else "fail",
                worst_ratio=f"{worst.ratio:.3g}",
                detail=worst.describe(),
            )
        except Exception as e:  # a failing kernel is a result, not the end of the run
            row.update(status="error", worst_ratio="", detail=_one_line(e))
            if _sticky_cuda_error(e):
                row["seconds"] = f"{time.perf_counter() - t0:.2f}"
                emit(row)
                raise
        row["seconds"] = f"{time.perf_counter() - t0 + oracle_s / len(group.backends):.2f}"
        emit(row)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _sticky_cuda_error(e: Exception) -> bool:
    """An error after which this process's CUDA context is unusable."""
    text = str(e)
    return any(s in text for s in ("illegal memory access", "CUDA error", "unspecified launch"))


def main(argv: Optional[list] = None) -> int:
    """Worker: run the groups of a JSON file, one JSON line per case to ``--out``."""
    p = argparse.ArgumentParser(prog="python -m flashcontrast.bench.smoke")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--groups", type=Path, required=True, help="a JSON list of groups")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    todo = [
        Group(**{**g, "backends": tuple(g["backends"])})
        for g in json.loads(args.groups.read_text())
    ]
    with open(args.out, "a", buffering=1) as f:

        def emit(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        # For the report's own tests: die (as a crashed CUDA context would) before group k.
        crash_at = int(os.environ.get("FLASHCONTRAST_SMOKE_CRASH_AT", "-1"))
        for i, group in enumerate(todo):
            if i == crash_at:
                os._exit(3)
            f.write(json.dumps({"start": asdict(group)}) + "\n")
            try:
                run_group(group, device, emit)
            except Exception:
                traceback.print_exc()
                return 3  # the CUDA context is gone: the report starts a new worker
            f.write(json.dumps({"done": asdict(group)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
