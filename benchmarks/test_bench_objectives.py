"""Forward+backward of every objective x backend x size, timed by pytest-benchmark.

Small CPU-friendly sizes by default; ``--bench-large`` runs GPU sizes. Each case is
skipped, with the reason, where its backend cannot run (no GPU, no Triton, Inf-CL not
installed, the reference too big for memory).
"""

from __future__ import annotations

import pytest
import torch

from flashcontrast._dispatch import backend_for
from flashcontrast.bench.baselines import INF_CL, inf_cl_clip, inf_cl_unavailable
from flashcontrast.bench.measure import CASES, backend_call, make_inputs, reference_too_big

BACKENDS = ["reference", "torch", "triton", "cuda", INF_CL]
SMALL = {"n": [128, 512], "d": 64, "dtype": torch.float32, "symile-n2": [16, 64]}
LARGE = {"n": [4096, 16384, 65536], "d": 512, "dtype": torch.bfloat16, "symile-n2": [512, 1024]}


def pytest_generate_tests(metafunc):
    if "size_index" in metafunc.fixturenames:
        n_sizes = 3 if metafunc.config.getoption("--bench-large") else 2
        metafunc.parametrize("size_index", range(n_sizes), ids=lambda i: f"size{i}")


@pytest.fixture
def config(request):
    return LARGE if request.config.getoption("--bench-large") else SMALL


@pytest.fixture
def device(request):
    on_gpu = torch.cuda.is_available()
    if request.config.getoption("--bench-large") and not on_gpu:
        pytest.skip("--bench-large sizes are GPU sizes and no CUDA device is visible")
    return "cuda" if on_gpu else "cpu"


def _call(objective, backend, device):
    dev = torch.device(device)
    if backend == INF_CL:
        reason = inf_cl_unavailable(objective, dev)
        if reason:
            pytest.skip(reason)
        return inf_cl_clip()
    if backend == "triton" and dev.type == "cpu":
        pytest.skip("Triton on the CPU is the interpreter, a test tool, not a contender")
    try:
        backend_for(CASES[objective].name, dev, backend)
    except RuntimeError as e:
        pytest.skip(str(e))
    return backend_call(objective, backend)


PAIRS = [(o, b) for o in sorted(CASES) for b in BACKENDS if b != INF_CL or o == "clip"]


@pytest.mark.parametrize(("objective", "backend"), PAIRS)
def test_forward_backward(benchmark, objective, backend, size_index, config, device):
    sizes = config.get(objective, config["n"])
    if size_index >= len(sizes):
        pytest.skip(f"{objective} has {len(sizes)} sizes")
    n, d, dev = sizes[size_index], config["d"], torch.device(device)
    fn = _call(objective, backend, device)
    if backend == "reference":
        too_big = reference_too_big(objective, n, d, dev)
        if too_big:
            pytest.skip(too_big)
    xs, scale = make_inputs(objective, n, d, config["dtype"], dev)

    def setup():
        for t in (*xs, scale):
            t.grad = None
        return (), {}

    def step():
        fn(xs, scale).backward()

    benchmark.extra_info.update(objective=objective, backend=backend, n=n, d=d)
    try:
        benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory at N={n}")
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
