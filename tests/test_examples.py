"""The README's DDP example runs: two gloo ranks under torchrun, a few steps, the loss
printed per step and going down (tiny model, synthetic pairs that share a latent code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_clip_ddp.py"


@pytest.mark.parametrize("strategy", ["gather", "ring"])
def test_train_clip_ddp_two_ranks(strategy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", str(EXAMPLE), "--strategy", strategy, "--steps", "6"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is present
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 6, out.stdout
    assert f"2 ranks, {strategy}" in out.stdout
    assert losses[-1] < 0.5 * losses[0], losses
