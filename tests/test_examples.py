"""The README's DDP example runs: two gloo ranks under torchrun, a few steps, the loss
printed per step and going down (tiny model, synthetic pairs that share a latent code)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_clip_ddp.py"


def _run(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun in a session of its own; on a timeout kill the whole session (the
    workers too: left alone they outlive the test) and fail with what it printed."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun ran past {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("strategy", ["gather", "ring"])
def test_train_clip_ddp_two_ranks(strategy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", str(EXAMPLE), "--strategy", strategy, "--steps", "6"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is present
    out = _run(cmd, env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 6, out.stdout
    assert f"2 ranks, {strategy}" in out.stdout
    assert losses[-1] < 0.5 * losses[0], losses
