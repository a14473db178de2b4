"""OpenCLIP's own SigLIP chunked-loss tests (its main branch, after 3.3.0), unmodified,
with flashcontrast's class in place of OpenCLIP's.

OpenCLIP's main branch added ``SigLipLoss(chunk_size=...)`` and
``tests/test_siglip_chunked_loss.py``, which calls ``SigLipLoss(...)._loss(...,
negative_only=...)`` at several chunk sizes. That file is not in any released package, so
this test runs it only where a checkout of OpenCLIP's tests is at hand
(``FLASHCONTRAST_OPENCLIP_TESTS=<open_clip checkout>/tests pytest
tests/test_compat_open_clip_main.py``).
It copies the file, unchanged, next to a stub ``open_clip`` package whose ``loss`` module
is :mod:`flashcontrast.compat.open_clip`, and runs pytest on it in a subprocess. Without
the variable it skips, saying so. (CI checks the same properties against the released
3.3.0 loss module: tests/test_compat.py::test_siglip_block_loss_matches_openclip.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = os.environ.get("FLASHCONTRAST_OPENCLIP_TESTS")
FILES = ["test_siglip_chunked_loss.py"]


@pytest.mark.skipif(
    not TESTS, reason="FLASHCONTRAST_OPENCLIP_TESTS (an OpenCLIP checkout's tests/) is not set"
)
@pytest.mark.parametrize("name", FILES)
def test_openclip_main_tests_pass_with_our_class(tmp_path, name):
    source = Path(TESTS) / name
    if not source.is_file():
        pytest.skip(f"{source} does not exist in that checkout")
    stub = tmp_path / "stub" / "open_clip"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "loss.py").write_text(
        "from flashcontrast.compat.open_clip import ClipLoss, SigLipLoss\n"
    )
    shutil.copy(source, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), *sys.path])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / name),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
