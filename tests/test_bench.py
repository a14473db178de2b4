"""The benchmark runner produces real rows: times and a peak for every backend it ran."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from flashcontrast.bench.__main__ import main
from flashcontrast.bench.measure import Row
from flashcontrast.bench.plot import write_plots
from flashcontrast.bench.report import Report

COLUMNS = {
    "objective",
    "backend",
    "dtype",
    "n",
    "d",
    *(f"{p}ms_{q}" for p in ("fwd_", "bwd_", "") for q in ("median", "p20", "p80")),
    "peak_mib",
    "tflops",
    "device",
    "versions",
    "timestamp",
}


def test_bench_writes_rows_for_reference_and_torch(tmp_path):
    argv = ["--objectives", "clip", "--sizes", "64", "--dims", "16", "--repeats", "2"]
    argv += ["--backends", "reference", "torch", "--out", str(tmp_path)]
    assert main(argv) == 0
    (csv_path,) = tmp_path.glob("bench-*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert COLUMNS <= set(rows[0])
    assert {r["backend"] for r in rows} == {"reference", "torch"}
    for r in rows:
        assert r["objective"] == "clip" and r["n"] == "64" and r["d"] == "16"
        assert r["versions"].startswith("flashcontrast") and r["timestamp"]
        for key in ("fwd_ms_median", "bwd_ms_median", "ms_median", "peak_mib", "tflops"):
            assert float(r[key]) > 0, key
        assert float(r["ms_p20"]) <= float(r["ms_median"]) <= float(r["ms_p80"])
    (md_path,) = tmp_path.glob("bench-*.md")
    text = md_path.read_text()
    assert "versions: flashcontrast" in text and "command: python -m flashcontrast.bench" in text


def _row(backend, n):
    t = 0.1 * n
    times = (t, t, t, t, t, t, 2 * t, 2 * t, 2 * t)
    return Row("clip", backend, n, 16, "float32", "cpu", *times, 0.01 * n, 8.0 * n * n * 16)


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'flashcontrast[bench]')",
)
def test_plot_writer_draws_a_png_and_an_svg_per_objective(tmp_path):
    rows = [_row(b, n) for b in ("reference", "torch") for n in (64, 128, 256)]
    png, svg = write_plots(rows, tmp_path, "bench-x", print)
    assert (png.name, svg.name) == ("bench-x-clip.png", "bench-x-clip.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = svg.read_text()
    # text kept as text (svg.fonttype none), both implementations in the legend
    assert text.lstrip().startswith("<?xml") and "reference" in text and "torch" in text
    again = tmp_path / "again"
    again.mkdir()
    write_plots(rows, again, "bench-x", print)
    assert (again / svg.name).read_text() == text, "the same rows must give the same SVG"


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'flashcontrast[bench]')",
)
def test_plots_redrawn_from_a_written_csv(tmp_path):
    from flashcontrast.bench.plot import main as plot_main
    from flashcontrast.bench.plot import read_rows

    rows = [_row(b, n) for b in ("reference", "torch") for n in (64, 128)]
    rows.append(
        Row(
            "clip",
            "matmul-bf16",
            64,
            16,
            "bfloat16",
            "cpu",
            *[1.0] * 3,
            *[None] * 3,
            *[1.0] * 3,
            0.0,
            None,
        )
    )
    report = Report(torch.device("cpu"), "python -m flashcontrast.bench (test)")
    report.rows.extend(rows)
    csv_path, _ = report.write(tmp_path)
    assert read_rows(csv_path) == rows
    assert plot_main([str(csv_path)]) == 0
    assert (tmp_path / f"{csv_path.stem}-clip.svg").exists()
