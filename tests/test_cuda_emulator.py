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

# tile_logits (clip.cu): the barrier between loading the A/B chunks into shared memory and
# the tile product that reads every thread's part of them.
_BARRIER = """    __syncthreads();
    acc.template mma<kBK, true, false>(As, L::kLdK, Bs, L::kLdK);"""


def _drop_barrier(name: str, source: str) -> str:
    if name != "clip.cu":
        return source
    assert source.count(_BARRIER) == 1, "clip.cu changed: update the mutation"
    return source.replace(
        _BARRIER, "    acc.template mma<kBK, true, false>(As, L::kLdK, Bs, L::kLdK);"
    )


def _clip_row_lse(c, a, b, scale):
    n, d = a.shape
    out = [torch.empty(n) for _ in range(3)]
    ws = torch.empty(c.clip_forward_workspace_elems(n, d, 0))
    c.clip_forward(a.data_ptr(), b.data_ptr(), n, d, *a.stride(), *b.stride(), "float32",
                   scale.data_ptr(), 0, *(t.data_ptr() for t in out), ws.data_ptr(), ws.numel(),
                   0, 0)  # fmt: skip
    return out[0]


_MUTANT_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from cuda_emulator import build
import test_cuda_emulator as t
torch.manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(97, 64), dim=1)
b = torch.nn.functional.normalize(torch.randn(97, 64), dim=1)
scale = torch.tensor(10.0)
want = torch.logsumexp(scale * a.double() @ b.double().t(), 1)
mutant = build.load(build.build(mutate=t._drop_barrier if sys.argv[2] == "mutant" else None))
got = t._clip_row_lse(mutant, a, b, scale).double()
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
        _clip_row_lse(cuda_emulator.module(), a, a, torch.tensor(1.0))
