"""The cost model (flashcontrast/costmodel.py) and the Triton backend's path choice it
drives (triton/pair.py ``sweep_path``).

The model's numbers are predictions; these tests check what must hold of any such model
(the flop count of the objectives, stage sums never below the single roofline, the choice
following the predictions) and that the README shows the model's own table, not numbers
typed by hand. The routing tests run the Triton interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import flashcontrast
from flashcontrast import costmodel, reference
from verification import TRITON_SKIP, assert_by_rule, pair_inputs, pair_loss_and_grads

N, DIMS = 65536, (256, 512, 1024)


@pytest.mark.parametrize("path", ["reference", "torch", "triton", "panel", "cuda"])
@pytest.mark.parametrize("d", DIMS)
def test_every_path_counts_four_gemm_equivalents_for_clip(path, d):
    # CLIP forward + backward: S, then S again, dS B and dS^T A, 2 N^2 D flops each
    assert costmodel.pair_cost("clip", path, N, d).flops == pytest.approx(8.0 * N * N * d)


@pytest.mark.parametrize("path", ["reference", "torch", "panel"])
@pytest.mark.parametrize("d", DIMS)
def test_kernels_in_sequence_take_at_least_the_roofline_of_their_totals(path, d):
    cost = costmodel.pair_cost("clip", path, N, d)
    assert cost.stages, "a multi-kernel path is a list of stages"
    fused = dataclasses.replace(cost, stages=())
    assert costmodel.predict_seconds(cost, path) >= costmodel.predict_seconds(fused, path)


def test_panel_bytes_do_not_grow_with_d_per_logit_but_its_flops_do():
    # the panel path's traffic is per logit (X, dS) plus O(D / R): the larger D, the
    # closer to the GEMM rate; the fused path's atomics grow with D and stay where they are
    fractions = [costmodel.gemm_fraction("clip", "panel", N, d) for d in DIMS]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    per_logit = [costmodel.pair_cost("clip", "panel", N, d).bytes / N**2 for d in DIMS]
    assert max(per_logit) / min(per_logit) < 1.5


def test_a_smaller_panel_costs_more_bytes():
    big = costmodel.pair_cost("clip", "panel", N, 1024, panel=4096)
    small = costmodel.pair_cost("clip", "panel", N, 1024, panel=64)
    assert small.bytes > big.bytes and small.flops == big.flops


@pytest.mark.parametrize(("elem_bytes", "per_entry"), [(2, 6), (4, 8)])
def test_default_panel_is_the_budget_at_x_and_ds_per_entry(elem_bytes, per_entry):
    from flashcontrast.backends.blockwise import PANEL_FRACTION

    budget = costmodel.H200.memory * PANEL_FRACTION
    rows = costmodel.default_panel_rows(N, "panel", elem_bytes)
    assert rows * N * per_entry <= budget < (rows + 1) * N * per_entry


@pytest.mark.parametrize("d", [16, 64, 256, 1024])
def test_the_choice_is_the_faster_prediction(d, monkeypatch):
    def seconds(path):
        return costmodel.predict_seconds(costmodel.pair_cost("clip", path, N, d), path)

    want = "panel" if seconds("panel") < seconds("triton") else "fused"
    assert costmodel.choose_pair_path(N, N, d, 2) == want
    # a fused path as fast as cuBLAS and without atomics would win at every D here
    monkeypatch.setitem(costmodel.EFFICIENCY, "triton", (0.95, "hypothetical"))
    monkeypatch.setattr(costmodel, "pair_cost", _without_atomics(costmodel.pair_cost))
    assert costmodel.choose_pair_path(N, N, d, 2) == "fused"


def _without_atomics(pair_cost):
    def cost(objective, path, n, d, *args, **kwargs):
        got = pair_cost(objective, path, n, d, *args, **kwargs)
        return dataclasses.replace(got, bytes=4 * n * d * 2) if path == "triton" else got

    return cost


def test_readme_table_is_the_models_output():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = costmodel.table()
    assert table in readme, "the README table differs: python -m flashcontrast.costmodel"
    assert re.search(r"PREDICTED", readme[: readme.index(table)][-600:])


# ------------------------------------------------------------------------ the routing

triton_only = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_panel_path_takes_the_models_panel(dtype, monkeypatch):
    """On a device with the model's memory the panel path's rows per panel are the model's
    (X in float32 and dS in the input dtype per entry)."""
    from flashcontrast.backends import _panel

    props = type("Props", (), {"total_memory": costmodel.H200.memory})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    size = dtype.itemsize
    got = _panel.rows_per_panel(N, torch.device("cuda"), size)
    assert got == costmodel.default_panel_rows(N, "panel", size)


@triton_only
def test_an_unknown_path_is_refused(monkeypatch):
    from flashcontrast.backends.triton import pair

    monkeypatch.setenv(pair.PATH_VARIABLE, "fastest")
    a, b = pair_inputs(8, 16, torch.float32, True)
    with pytest.raises(ValueError, match="FLASHCONTRAST_TRITON_PATH='fastest'"):
        flashcontrast.clip_loss(a, b, 10.0, backend="triton")


@triton_only
@pytest.mark.parametrize("objective", ["clip", "siglip"])
@pytest.mark.parametrize("path", ["auto", "panel"])
def test_each_path_is_the_one_taken_and_matches_the_reference(objective, path, monkeypatch):
    """ "auto" on the CPU is the fused path; "panel" runs triton/panel.py in both
    directions; either meets the verification rule against the float64 reference."""
    from flashcontrast.backends.triton import pair, panel

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            # the panel path runs the fused kernels as its epilogues (x= / panel= given)
            calls.append("epilogue" if kwargs.get("x", kwargs.get("panel")) is not None else name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(panel, "panel_forward", spy("panel", panel.panel_forward))
    monkeypatch.setattr(panel, "panel_backward", spy("panel", panel.panel_backward))
    monkeypatch.setattr(pair, "_pair_forward", spy("fused", pair._pair_forward))
    monkeypatch.setattr(pair, "_pair_backward", spy("fused", pair._pair_backward))
    monkeypatch.setenv(pair.PATH_VARIABLE, path)
    loss = {"clip": flashcontrast.clip_loss, "siglip": flashcontrast.siglip_loss}[objective]
    ref = {"clip": reference.clip_loss, "siglip": reference.siglip_loss}[objective]
    a, b = pair_inputs(45, 24, torch.float32, True)
    bias = -2.0 if objective == "siglip" else None
    ours = pair_loss_and_grads(lambda *x: loss(*x, backend="triton"), a, b, 12.0, bias, 1.3)
    exact = pair_loss_and_grads(ref, a, b, 12.0, bias, 1.3, torch.float64)
    same = pair_loss_and_grads(ref, a, b, 12.0, bias, 1.3, torch.float32)
    names = ("loss", "d_a", "d_b", "d_scale", "d_bias")[: len(ours)]
    assert_by_rule(names, ours, same, exact, torch.float32)
    want = {"fused"} if path == "auto" else {"panel", "epilogue"}
    assert set(calls) == want, calls
