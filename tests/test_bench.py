"""The benchmark runner produces real rows: a time and a peak for every backend it ran."""

from __future__ import annotations

import csv

from flashcontrast.bench.__main__ import main


def test_bench_writes_rows_for_reference_and_torch(tmp_path):
    assert (
        main(
            [
                "--objectives",
                "clip",
                "--sizes",
                "64",
                "--dims",
                "16",
                "--repeats",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (csv_path,) = tmp_path.glob("bench-*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert {r["backend"] for r in rows} == {"reference", "torch"}
    for r in rows:
        assert r["objective"] == "clip" and r["n"] == "64" and r["d"] == "16"
        assert float(r["ms_median"]) > 0 and float(r["peak_mib"]) > 0
    (md_path,) = tmp_path.glob("bench-*.md")
    text = md_path.read_text()
    assert "versions: flashcontrast" in text and "command: python -m flashcontrast.bench" in text
