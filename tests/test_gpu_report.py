"""The budgeted first-contact GPU report, run on the CPU with toy sizes.

The report's promises: --dry-run prints a plan whose estimates fit the budget and says
what each rests on, running nothing; every step writes its rows as they exist, so a run cut
off by its budget or killed from outside keeps everything measured so far; a smoke worker
that dies is replaced and the cases it could not finish are recorded as not run.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashcontrast.bench import first_contact, smoke
from flashcontrast.bench.__main__ import main
from verification import TRITON_SKIP

TINY = ["--gpu-report", "--device", "cpu", "--smoke-tiny", "--backends", "torch"]
TINY += ["--sizes", "64", "--dims", "16"]


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one(folder: Path, prefix: str) -> Path:
    (path,) = folder.glob(f"{prefix}-*")
    return path


def test_dry_run_prints_a_plan_that_fits_and_runs_nothing(tmp_path, capsys):
    assert main(["--gpu-report", "--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    steps = re.findall(r"^\d\. \((\w)\) .*: ~(\d+) s$", text, flags=re.M)
    assert [s for s, _ in steps] == list("abcdef"), text
    assert text.count("     estimate: ") == 6, "every step says what its estimate rests on"
    total = re.search(r"^total: ~(\d+) s of a 420 s budget \(fits\)$", text, flags=re.M)
    assert total and int(total.group(1)) <= 420, text
    assert abs(int(total.group(1)) - sum(int(s) for _, s in steps)) <= len(steps), text
    assert "measured on the CI machine" in text and "costmodel" in text
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"


def test_report_on_cpu_writes_every_step(tmp_path):
    assert main([*TINY, "--budget-s", "300", "--out", str(tmp_path)]) == 0
    log = _one(tmp_path, "report").read_text()
    for step in "abcdef":
        assert f"\n({step}) " in log
    smoke = _rows(_one(tmp_path, "smoke"))
    assert len(smoke) == 48 and {r["status"] for r in smoke} == {"pass"}
    assert {r["oracle"] for r in smoke} == {"reference-float64", "torch-float64"}
    bench = _rows(_one(tmp_path, "bench"))
    got = {(r["objective"], r["backend"]) for r in bench}
    assert {("clip", "torch"), ("siglip", "torch"), ("gram-m4", "torch")} <= got
    assert all(float(r["ms_median"]) > 0 for r in bench)
    assert _one(tmp_path, "env").read_text().count("gemm_tflops") == 1


def test_budget_cut_records_what_did_not_run(tmp_path):
    """Two seconds: the smoke deadline stops the workers (their unfinished cases become
    "not run" rows) and later rows say "not run (budget)"; files are complete CSV."""
    assert main([*TINY, "--budget-s", "2", "--out", str(tmp_path)]) == 0
    smoke = _rows(_one(tmp_path, "smoke"))
    assert smoke, "the smoke writes a row for every case, run or not"
    assert any(r["status"] == "not run" and r["detail"] == "budget" for r in smoke)
    assert "not run (budget)" in _one(tmp_path, "report").read_text()


def test_killed_report_keeps_its_rows(tmp_path):
    """SIGKILL in the middle of the timings: the log and the CSVs hold every line and
    row written before, each complete."""
    argv = [*TINY, "--budget-s", "600", "--out", str(tmp_path), "--sizes", "64", "2048"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashcontrast.bench", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            bench = list(tmp_path.glob("bench-*.csv"))
            if bench and len(_rows(bench[0])) >= 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the report wrote no timing rows in 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = _rows(_one(tmp_path, "bench"))
    assert len(rows) >= 2 and all(r["timestamp"] and r["ms_median"] for r in rows)
    assert len(_rows(_one(tmp_path, "smoke"))) == 48
    log = _one(tmp_path, "report").read_text()
    assert "(d) CLIP and SigLIP timings" in log and "done in" not in log


def test_a_dying_smoke_worker_is_replaced(tmp_path, monkeypatch):
    """A worker that dies (as after a CUDA error) is restarted for the groups after the
    one it was on; that one's cases are recorded as not run, with the reason."""
    monkeypatch.setenv("FLASHCONTRAST_SMOKE_CRASH_AT", "3")
    assert main([*TINY, "--budget-s", "300", "--out", str(tmp_path)]) == 0
    smoke = _rows(_one(tmp_path, "smoke"))
    assert len(smoke) == 48
    dead = [r for r in smoke if r["status"] == "not run"]
    assert dead and all(r["detail"] == "worker exit 3" for r in dead)
    assert "restarting it" in _one(tmp_path, "report").read_text()


def test_first_contact_script_runs_from_the_checkout_without_installing(tmp_path):
    """benchmarks/first_contact.sh puts python/ on the path and runs the report: its dry
    run works from a bare environment (no installed flashcontrast needed)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    proc = subprocess.run(
        ["bash", str(root / "benchmarks" / "first_contact.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu-report plan" in proc.stdout and "(fits)" in proc.stdout


def _counted(monkeypatch, module, name: str) -> list:
    """``module.name`` wrapped to append 1 per call to the returned list."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_smoke_runs_each_path_and_verifies_both_as_the_backend(monkeypatch):
    """The smoke's "triton" rows run the fused kernels and its "triton-panel" rows
    triton/panel.py (both forced; "cuda" / "cuda-panel" alike), on the pair engine's
    objectives only, and both count towards the "triton" triple of the record."""
    if TRITON_SKIP is not None:
        pytest.skip(str(TRITON_SKIP))
    from flashcontrast.backends.triton import panel

    have = {g.objective: g.backends for g in smoke.groups(torch.device("cpu"), tiny=True)}
    for pseudo in (smoke.TRITON_PANEL, smoke.CUDA_PANEL):
        assert pseudo in have["clip"] and pseudo in have["mv-dhel"]
        assert pseudo not in have["gram"] + have["symile-n2"]
    calls = _counted(monkeypatch, panel, "panel_backward")
    rows = []
    group = smoke.Group("siglip", "float32", 7, 5, False, ("triton", smoke.TRITON_PANEL))
    smoke.run_group(group, torch.device("cpu"), rows.append)
    assert [r["status"] for r in rows] == ["pass", "pass"] and calls == [1]

    class Ctx:  # what _write_verification reads: rows in, passes out, no file on the CPU
        device, out, passed = torch.device("cuda"), None, []

        @staticmethod
        def log(_):
            pass

    failed_panel = [dict(rows[0]), {**rows[1], "status": "fail"}]
    first_contact._write_verification(Ctx, failed_panel)
    assert Ctx.passed == [], "a failing panel path un-verifies the triton triple"
    first_contact._write_verification(Ctx, rows)
    assert Ctx.passed == [["siglip", "triton", "float32"]]


def test_smoke_runs_the_cuda_panel_path_on_the_emulator(monkeypatch, request):
    from conftest import EMULATOR_SKIP

    if EMULATOR_SKIP is not None:
        pytest.skip(str(EMULATOR_SKIP))
    import cuda_emulator
    from flashcontrast.backends import cuda_panel

    cuda_emulator.install(monkeypatch, request.node.nodeid)
    calls = _counted(monkeypatch, cuda_panel, "panel_backward")
    rows = []
    group = smoke.Group("clip-groups", "bfloat16", 7, 5, False, ("cuda", smoke.CUDA_PANEL))
    smoke.run_group(group, torch.device("cpu"), rows.append)
    assert [r["status"] for r in rows] == ["pass", "pass"], rows
    assert calls == [1], "the cuda row ran the tile kernels, the cuda-panel row the panel"
