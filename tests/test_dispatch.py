"""backend="auto": never a kernel that has not passed on a GPU; always one that can run.

On CUDA tensors "auto" takes "cuda", then "triton", only where the verification record
(flashcontrast/verified_gpu.json, written from GPU reports' smoke passes) lists (device
class, objective, backend, dtype); otherwise "torch". The GPU here is simulated: the
backends' availability and the device class are patched, the record is swapped.
"""

from __future__ import annotations

import json

import pytest
import torch

import flashcontrast
from flashcontrast import _dispatch, _verified
from flashcontrast.bench import record

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A pretend sm_90 GPU on which every backend is available; returns a function that
    sets the verification record's entries."""
    monkeypatch.setattr(_dispatch, "_unavailable", lambda backend, objective, device: None)
    monkeypatch.setattr(_verified, "_cuda_class", lambda index: "sm_90")

    def verified(*entries):
        monkeypatch.setattr(_verified, "VERIFIED", frozenset(entries))

    verified()
    return verified


def test_the_shipped_record_loads():
    data = json.loads(_verified.RECORD.read_text())
    assert isinstance(data["records"], list)
    for r in data["records"]:
        assert r["device_class"].startswith("sm_") and r["passed"]


def test_unverified_kernels_are_not_picked(gpu):
    for objective in ("clip", "siglip", "multiview", "gram", "symile"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, None):
            chosen, why = flashcontrast.explain_backend(objective, CUDA, "auto", dtype)
            assert chosen == "torch", why
            assert "not yet verified on a sm_90 GPU" in why
    # asked for by name, they run anyway
    assert flashcontrast.backend_for("clip", CUDA, "triton") == "triton"
    assert flashcontrast.backend_for("clip", CUDA, "cuda") == "cuda"


def test_verified_kernels_are_picked_per_dtype_and_class(gpu, monkeypatch):
    gpu(("sm_90", "clip", "triton", "bfloat16"), ("sm_90", "gram", "cuda", "float32"))
    assert flashcontrast.backend_for("clip", CUDA, dtype=torch.bfloat16) == "triton"
    assert flashcontrast.backend_for("clip", CUDA, dtype=torch.float16) == "torch"
    assert flashcontrast.backend_for("gram", CUDA, dtype=torch.float32) == "cuda"
    assert flashcontrast.backend_for("gram", CUDA, dtype=torch.bfloat16) == "torch"
    chosen, why = flashcontrast.explain_backend("clip", CUDA, dtype=torch.bfloat16)
    assert chosen == "triton" and "not cuda" in why and "passed a GPU report on sm_90" in why
    monkeypatch.setattr(_verified, "_cuda_class", lambda index: "sm_80")  # another class
    assert flashcontrast.backend_for("clip", CUDA, dtype=torch.bfloat16) == "torch"


def test_float64_never_goes_to_a_kernel_backend(gpu):
    """With Triton installed, float64 CUDA tensors resolved to "triton", which raised."""
    gpu(*[("sm_90", "clip", b, "float64") for b in ("cuda", "triton")])
    chosen, why = flashcontrast.explain_backend("clip", CUDA, dtype=torch.float64)
    assert chosen == "torch" and "not torch.float64" in why


_OBJECTIVES = ("clip", "siglip", "infonce", "multiview", "gram", "symile")
_VARIANTS = (None, *_dispatch.VARIANTS)
# what "auto" takes on a GPU with every kernel verified, per call variant (16/32-bit)
_AUTO_FOR_VARIANT = {
    None: "cuda",
    "symile_n_squared_many": "torch",
    "gram_many_others": "torch",
    "symile_n_squared_rectangular": "cuda",
}


def _every_entry():
    return [
        ("sm_90", objective, backend, dtype)
        for objective in _OBJECTIVES
        for backend in ("cuda", "triton")
        for dtype in ("float32", "float16", "bfloat16", "float64")
    ]


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("objective", _OBJECTIVES)
def test_auto_picks_only_what_runs_the_call(gpu, objective, dtype, variant):
    """Whatever "auto" resolves to (here every kernel counts as verified), naming that
    backend explicitly for the same call resolves without raising: auto never hands a
    call to a backend that cannot run it (dtype, call variant)."""
    gpu(*_every_entry())
    chosen, why = flashcontrast.explain_backend(objective, CUDA, "auto", dtype, variant)
    assert flashcontrast.backend_for(objective, CUDA, chosen, dtype, variant) == chosen, why
    assert set(_AUTO_FOR_VARIANT) == set(_VARIANTS)
    if dtype == torch.float64:
        assert chosen == "torch", why
    else:
        assert chosen == _AUTO_FOR_VARIANT[variant], why


def test_explicit_backends_that_cannot_run_the_call_raise(gpu):
    with pytest.raises(TypeError, match="float64"):
        flashcontrast.backend_for("clip", CUDA, "triton", torch.float64)
    with pytest.raises(TypeError, match="float64"):
        flashcontrast.backend_for("gram", CUDA, "cuda", torch.float64)
    with pytest.raises(RuntimeError, match="M > 3"):
        flashcontrast.backend_for("symile", CUDA, "cuda", torch.float32, "symile_n_squared_many")
    for backend in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match="more than 6 modalities"):
            flashcontrast.backend_for("gram", CUDA, backend, torch.float32, "gram_many_others")
    with pytest.raises(ValueError, match="unknown call variant"):
        flashcontrast.backend_for("symile", CUDA, "torch", torch.float32, "no_such_variant")
    assert flashcontrast.backend_for("clip", CUDA, "torch", torch.float64) == "torch"


def test_cpu_tensors_take_torch():
    assert flashcontrast.explain_backend("clip", "cpu")[0] == "torch"


def test_the_debug_log_says_why(gpu, caplog):
    a = torch.randn(4, 3)
    with caplog.at_level("DEBUG", logger="flashcontrast"):
        flashcontrast.clip_loss(a, a, 1.0)
    assert "resolved to 'torch' on cpu (cpu tensors" in caplog.text


def test_record_merge_adds_passes_and_drops_failures(tmp_path):
    path = tmp_path / "verified_gpu.json"
    path.write_text(json.dumps({"about": "x", "records": []}))
    first = tmp_path / "verification-1.json"
    first.write_text(
        json.dumps(
            {
                "device_class": "sm_90",
                "device": "NVIDIA H200",
                "date": "2026-12-02T1200",
                "passed": [["clip", "triton", "bfloat16"], ["gram", "triton", "bfloat16"]],
                "failed": [["clip", "cuda", "bfloat16"]],
            }
        )
    )
    second = tmp_path / "verification-2.json"
    second.write_text(
        json.dumps(
            {
                "device_class": "sm_90",
                "date": "2026-12-03T1200",
                "passed": [["siglip", "triton", "float32"]],
                "failed": [["gram", "triton", "bfloat16"]],
            }
        )
    )
    assert record.main([str(first), str(second), "--record", str(path)]) == 0
    merged = json.loads(path.read_text())
    assert merged["about"] == "x"
    assert _verified._load(path) == {
        ("sm_90", "clip", "triton", "bfloat16"),
        ("sm_90", "siglip", "triton", "float32"),
    }
