"""The CUDA emulator (tests/cuda_emulator) must fail broken kernels, or its passes mean nothing.

A kernel with a barrier removed is built beside the real one: its results must be wrong
where the real kernel's are right. The emulator's knobs are checked to reject bad values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulator

pytestmark = [
    pytest.mark.emulator,
    pytest.mark.skipif(
        cuda_emulator.SKIP_REASON is not None, reason=str(cuda_emulator.SKIP_REASON)
    ),
]

# pair_impl.cuh's forward (the pair engine's kernels), columns: the barrier between the
# half-column partials one half of the CTA writes to shared memory and the merge the other
# half reads them for.
_BARRIER = """          __syncthreads();
          if (ch == 0 && cc < ncols) {"""


def _drop_barrier(name: str, source: str) -> str:
    if name != "pair_impl.cuh":
        return source
    assert source.count(_BARRIER) == 1, "pair_impl.cuh changed: update the mutation"
    return source.replace(_BARRIER, "          if (ch == 0 && cc < ncols) {")


def _col_lse(c, a, b, scale):
    """The column logsumexps of one softmax sweep (pair.cu) through the typed structs."""
    (n, d), m = a.shape, b.shape[0]
    out = {k: torch.empty(n) for k in ("row_max", "row_sum")}
    out.update({k: torch.empty(m) for k in ("col_max", "col_sum")})
    p = c.PairParams(
        a=a.data_ptr(), b=b.data_ptr(), n=n, m=m, d=d, a_stride0=a.stride(0),
        a_stride1=a.stride(1), b_stride0=b.stride(0), b_stride1=b.stride(1), dtype="float32",
        scale=scale.data_ptr(), epilogue="softmax", positives=False,
    )  # fmt: skip
    ws = torch.empty(c.pair_forward_workspace_elems(p, device=0))
    stats = c.PairStats(**{k: t.data_ptr() for k, t in out.items()})
    c.pair_forward(p, stats, workspace=ws.data_ptr(), workspace_elems=ws.numel(), stream=0)
    return out["col_max"] + out["col_sum"].log()


_MUTANT_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from cuda_emulator import build
import test_cuda_emulator as t
torch.manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(97, 64), dim=1)
b = torch.nn.functional.normalize(torch.randn(97, 64), dim=1)
scale = torch.tensor(10.0)
want = torch.logsumexp(scale * a.double() @ b.double().t(), 0)
mutant = build.load(build.build(mutate=t._drop_barrier if sys.argv[2] == "mutant" else None))
got = t._col_lse(mutant, a, b, scale).double()
print("close" if torch.allclose(got, want, atol=1e-5) else "wrong")
"""


@pytest.mark.parametrize("variant", ["real", "mutant"])
def test_a_missing_barrier_fails(variant):
    """The real kernel is right and the mutant without one barrier is wrong (in a child
    process: Python keeps one extension module per name, so both cannot live in one)."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "FC_EMU_SCHEDULE": "forward"}
    proc = subprocess.run(
        [sys.executable, "-c", _MUTANT_RUN, tests, variant],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == ("close" if variant == "real" else "wrong")


def test_bad_schedule_is_refused(monkeypatch):
    a = torch.randn(8, 4)
    monkeypatch.setenv("FC_EMU_SCHEDULE", "sideways")
    with pytest.raises(ValueError, match="FC_EMU_SCHEDULE"):
        _col_lse(cuda_emulator.module(), a, a, torch.tensor(1.0))
