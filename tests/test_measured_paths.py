"""Measured Triton path times replacing the cost model's choice (flashcontrast/_measured.py):
the GPU report's paths file, its merge into the record, and ``auto`` reading it.

No GPU here: the report's device is stubbed where it is asked for its class and name, and
the record is built from synthetic rows; what is checked is the plumbing, so that the
first GPU report's measured rows decide ``auto``'s path without a code change.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flashcontrast import _measured, _verified, costmodel
from flashcontrast.bench import first_contact, record
from verification import TRITON_SKIP


def _timing(d: int, fused: float, panel: float, n: int = 65536, dtype: str = "bfloat16"):
    return dict(objective="clip", n=n, d=d, dtype=dtype, fused_ms=fused, panel_ms=panel)


def _report(*timings, cls: str = "sm_90", date: str = "2026-12-03T0000") -> dict:
    return dict(kind="paths", device_class=cls, device="NVIDIA H200", date=date,
                timings=list(timings))  # fmt: skip


def test_a_newer_report_replaces_its_shapes_and_keeps_the_others():
    rec = record.merge_paths(_report(_timing(512, 40.0, 30.0), _timing(1024, 90.0, 60.0)), {})
    rec = record.merge_paths(_report(_timing(1024, 50.0, 70.0), date="2026-12-04T0000"), rec)
    (only,) = rec["records"]
    assert only["date"] == "2026-12-04T0000"
    got = {t["d"]: (t["fused_ms"], t["panel_ms"]) for t in only["timings"]}
    assert got == {512: (40.0, 30.0), 1024: (50.0, 70.0)}
    rec = record.merge_paths(_report(_timing(512, 1.0, 2.0), cls="sm_100"), rec)
    assert [r["device_class"] for r in rec["records"]] == ["sm_90", "sm_100"]


def test_the_nearest_measured_shape_decides(monkeypatch, tmp_path):
    path = tmp_path / "measured_paths.json"
    rec = record.merge_paths(
        _report(_timing(256, 10.0, 20.0), _timing(1024, 90.0, 60.0), _timing(1024, 5.0, 9.0,
                dtype="float32")), {}
    )  # fmt: skip
    path.write_text(json.dumps(rec))
    monkeypatch.setattr(_measured, "MEASURED", _measured.load(path))
    assert _measured.measured_choice("sm_90", 65536, 65536, 1024, "bfloat16") == "panel"
    assert _measured.measured_choice("sm_90", 65536, 65536, 300, "bfloat16") == "fused"
    assert _measured.measured_choice("sm_90", 4096, 4096, 900, "float32") == "fused"
    assert _measured.measured_choice("sm_90", 4096, 4096, 900, "float16") is None
    assert _measured.measured_choice("sm_80", 4096, 4096, 900, "bfloat16") is None
    assert _measured.measured_choice(None, 4096, 4096, 900, "bfloat16") is None


def test_the_shipped_record_loads():
    assert isinstance(_measured.load(), dict)
    assert _measured.load(Path("/nonexistent/measured_paths.json")) == {}


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
def test_auto_takes_the_measurement_over_the_model(monkeypatch):
    from flashcontrast.backends.triton.pair import auto_path

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(_verified, "device_class", lambda device: "sm_90")
    model = costmodel.choose_pair_path(65536, 65536, 1024, 2)
    monkeypatch.setattr(_measured, "MEASURED", {})
    assert auto_path(cuda, 65536, 65536, 1024, bf16) == model
    other = {"panel": "fused", "fused": "panel"}[model]
    fast, slow = 10.0, 20.0
    row = _measured.PathTiming("clip", 65536, 1024, "bfloat16", *(
        (fast, slow) if other == "fused" else (slow, fast)))  # fmt: skip
    monkeypatch.setattr(_measured, "MEASURED", {"sm_90": (row,)})
    assert auto_path(cuda, 65536, 65536, 1024, bf16) == other


def test_the_report_writes_the_shapes_timed_on_both_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    ctx = SimpleNamespace(
        out=tmp_path, device=torch.device("cuda"), stamp="2026-12-03T0000",
        args=SimpleNamespace(command="python -m flashcontrast.bench --gpu-report"),
        path_times=[("clip", 65536, 1024, "bfloat16", "panel", 61.0),
                    ("clip", 65536, 1024, "bfloat16", "fused", 380.0),
                    ("siglip", 65536, 1024, "bfloat16", "panel", 60.0)],
        path=lambda name: tmp_path / f"{name}-2026-12-03T0000",
    )  # fmt: skip
    written = first_contact.write_path_timings(ctx)
    report = json.loads(written.read_text())
    assert report["kind"] == "paths" and report["device_class"] == "sm_90"
    assert report["timings"] == [_timing(1024, 380.0, 61.0)], "siglip had one path only"
    target = tmp_path / "measured_paths.json"
    assert record.main([str(written), "--paths-record", str(target)]) == 0
    merged = _measured.load(target)
    assert merged["sm_90"] == (_measured.PathTiming(**_timing(1024, 380.0, 61.0)),)
