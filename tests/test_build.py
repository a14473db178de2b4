"""The build path: flashcontrast imports with or without the compiled extension ``_C``.

These tests build nothing; they check whatever install is being tested. Where ``_C`` is
absent (``FLASHCONTRAST_SKIP_CUDA_BUILD=1`` or no nvcc at build time) only the
no-extension checks run; where it is present but no GPU is, the GPU fill is skipped and
the "no device" error path is checked instead.
"""

import pytest
import torch

import flashcontrast
from flashcontrast import _cuda_ext

HAS_C = _cuda_ext.HAS_C
HAS_CUDA = torch.cuda.is_available()

needs_c = pytest.mark.skipif(
    not HAS_C, reason=f"flashcontrast._C is not built: {_cuda_ext.C_UNAVAILABLE_REASON}"
)
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch.cuda sees none")


def test_package_imports_with_or_without_c():
    assert isinstance(flashcontrast.__version__, str)
    assert isinstance(HAS_C, bool)
    assert (_cuda_ext.C_UNAVAILABLE_REASON is None) == HAS_C
    info = _cuda_ext.runtime_info()
    assert info["has_c"] is HAS_C


@pytest.mark.skipif(HAS_C, reason="_C is built: this test checks the no-extension install")
def test_no_extension_install_explains_itself():
    reason = _cuda_ext.C_UNAVAILABLE_REASON
    assert isinstance(reason, str) and reason.strip()
    assert _cuda_ext.runtime_info() == {"has_c": False, "reason": reason}


@needs_c
def test_runtime_info():
    c = _cuda_ext._C
    assert c.cuda_runtime_version() >= 12000
    assert c.cuda_driver_version() >= 0  # 0: no driver installed
    assert c.cuda_device_count() == torch.cuda.device_count()
    archs = c.compiled_archs()
    assert archs and all(isinstance(a, int) and a >= 50 for a in archs)
    assert archs == sorted(archs)
    info = _cuda_ext.runtime_info()
    assert "error" not in info, info
    assert info["compiled_archs"] == archs
    assert info["device_count"] == torch.cuda.device_count()


@needs_c
def test_selftest_fill_rejects_bad_arguments():
    fill = _cuda_ext._C._selftest_fill
    with pytest.raises(ValueError, match=r"flashcontrast\._C\._selftest_fill: n must be >= 0"):
        fill(1024, -1, 1.0, 0)
    with pytest.raises(ValueError, match=r"flashcontrast\._C\._selftest_fill: ptr is null"):
        fill(0, 4, 1.0, 0)
    fill(0, 0, 1.0, 0)  # an empty buffer is a no-op, with or without a GPU


@needs_c
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: this checks the no-device error path")
def test_selftest_fill_without_gpu_raises_runtime_error():
    host = torch.zeros(16)
    with pytest.raises(RuntimeError, match=r"flashcontrast\._C\._selftest_fill: cuda\w+"):
        _cuda_ext._C._selftest_fill(host.data_ptr(), host.numel(), 1.0, 0)
    assert _cuda_ext._C.cuda_device_count() == 0  # the failure left no sticky state behind


@needs_c
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [1, 97, 1025])
@pytest.mark.parametrize("side_stream", [False, True])
def test_selftest_fill_on_gpu(n, side_stream):
    buf = torch.zeros(n + 3, device="cuda")
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        target = buf[3:]  # an offset pointer: only these n floats may change
        _cuda_ext._C._selftest_fill(
            target.data_ptr(), n, 2.5, torch.cuda.current_stream().cuda_stream
        )
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(buf[:3].cpu(), torch.zeros(3))
    assert torch.equal(buf[3:].cpu(), torch.full((n,), 2.5))


@needs_c
@pytest.mark.gpu
@needs_gpu
def test_selftest_fill_rejects_host_memory_on_gpu_machine():
    host = torch.zeros(16)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _cuda_ext._C._selftest_fill(host.data_ptr(), host.numel(), 1.0, 0)
