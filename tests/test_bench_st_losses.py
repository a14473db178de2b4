"""``python -m flashcontrast.bench.st_losses``: the sentence-transformers loss-step bench
runs its four implementations, writes its table and skips a row predicted too large."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test extra")

from flashcontrast.bench import st_losses


def test_rows_table_and_skips(tmp_path, capsys):
    # a memory limit between the first size's dense scores and the second's
    args = ["--sizes", "64", "128", "--dim", "16", "--mini-batch", "32", "--repeats", "2"]
    limit_gib = 12.0 * 100 * 100 * 2 / 2**30
    assert st_losses.main([*args, "--memory-gib", str(limit_gib), "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("st-losses-*.md")
    text = md.read_text()
    assert "command: python -m flashcontrast.bench.st_losses" in text
    measured = re.findall(r"^\s*(.+?)\s+(64|128)\s+1\s+([\d.]+)\s", text, re.M)
    names = {name for name, _, _ in measured}
    assert names == {
        "sentence-transformers MNRL",
        "sentence-transformers Cached (mb 32)",
        "flashcontrast MNRL",
        "flashcontrast Cached",
    }
    assert all(float(ms) > 0 for _, _, ms in measured)
    # the dense MNRL at N = 128 (4 x 128^2 x 2 x 3 bytes) is over the limit: skipped
    assert re.search(r"sentence-transformers MNRL\s+128\s+1\s+skipped: predicted", text)
    assert ("sentence-transformers MNRL", "128") not in {(n, s) for n, s, _ in measured}
    assert len(measured) == 7
