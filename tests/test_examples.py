"""The README's examples run: the DDP one (two gloo ranks under torchrun, a few steps, the
loss printed per step and going down; tiny model, synthetic pairs that share a latent
code) and the sentence-transformers cached-MNRL one."""

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


ST_EXAMPLE = EXAMPLE.with_name("train_st_cached.py")


def test_train_st_cached_example():
    """The sentence-transformers cached-MNRL example trains: the loss goes down over a few
    steps (a small batch here; the README's run uses 16,384)."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    cmd = [sys.executable, str(ST_EXAMPLE), "--batch", "1024", "--steps", "6"]
    cmd += ["--mini-batch", "256", "--backend", "torch"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = _run(cmd, env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 6, out.stdout
    assert losses[-1] < 0.8 * losses[0], losses
