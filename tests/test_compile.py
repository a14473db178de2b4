"""torch.compile(fullgraph=True) traces every public loss, on every backend that runs here.

The README promises that code calling the losses compiles without graph breaks. What has
to be traceable is everything above the ops: the input checks, backend selection
(``backend="auto"`` and the availability checks behind every explicit name), the
reductions, and for backend="reference" the oracle itself. Each case compiles a step that
calls one objective (function or nn.Module) with ``fullgraph=True`` under the aot_eager
backend (Dynamo and AOTAutograd, which is where breaks and failures come from; inductor's
code generation is not what is being tested and is slow on a CPU) and checks that the
forward value and every gradient (features, logit scale, bias) equal the eager ones.

"cuda" runs the CUDA backend on csrc/ built for the CPU (tests/cuda_emulator), swapped in
by tests/conftest.py for tests parametrized with backend="cuda"; "triton" runs the Triton
interpreter on CPU tensors. Sizes stay small: compiling is slow on a 2-core CPU.

Symile "n" is compiled with explicit ``permutations``. Without them the negatives come
from ``torch.randperm`` on the default generator (the published package's stream): see
``test_symile_n_default_generator_under_compile`` for what happens then.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import flashcontrast
from flashcontrast import _dispatch
from verification import CUDA_EMULATED, TRITON, TRITON_SKIP

COMPILE_BACKENDS = ["torch", TRITON, "reference", "auto", CUDA_EMULATED]

N, D = 10, 12


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every case compiles from scratch: the steps below share code objects, and cached
    graphs (or recompilation limits) from one case must not decide another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _unit(*shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def _perms(m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(m - 1)])
                        for _ in range(m)])  # fmt: skip


# Each case: (leaves, call). leaves() makes the tensors that receive gradients (features
# and scalars); call(backend, *leaves) returns the loss. Non-differentiable arguments
# (groups, permutations) are made once per case and closed over.


def _clip():
    g = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 6, 7])

    def call(backend, a, b, s, t):
        return flashcontrast.clip_loss(a, b, s, t, groups=g, backend=backend)

    return lambda: [_unit(N, D), _unit(N, D), torch.tensor(8.0), torch.tensor(-1.0)], call


def _siglip():
    def call(backend, a, b, s, t):
        return flashcontrast.siglip_loss(a, b, s, t, backend=backend)

    return lambda: [_unit(N, D), _unit(N, D), torch.tensor(6.0), torch.tensor(-3.0)], call


def _multiview(fn):
    g = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])

    def call(backend, u, s):
        return fn(u, s, groups=g, backend=backend)

    return lambda: [_unit(3, N, D), torch.tensor(5.0)], call


def _gram():
    def call(backend, a, o1, o2, s):
        return flashcontrast.gram_loss(a, [o1, o2], s, label_smoothing=0.1, backend=backend)

    return lambda: [_unit(N, D), _unit(N, D), _unit(N, D), torch.tensor(4.0)], call


def _symile_n():
    perms = _perms(3, N)

    def call(backend, x, y, z, s):
        return flashcontrast.symile_loss(
            [x, y, z], s, negative_sampling="n", permutations=perms, backend=backend
        )

    return lambda: [_unit(N, D), _unit(N, D), _unit(N, D), torch.tensor(6.0)], call


def _symile_n2():
    def call(backend, x, y, z, s):
        return flashcontrast.symile_loss(
            [x, y, z], s, negative_sampling="n_squared", backend=backend
        )

    return lambda: [_unit(N, D), _unit(N, D), _unit(N, D), torch.tensor(6.0)], call


_CWCL_U = torch.randn(N, 5)  # CWCL's frozen embeddings: no gradient


def _cwcl():
    def call(backend, a, b, s, t):
        return flashcontrast.cwcl_loss(a, b, s, t, weight_features=_CWCL_U, backend=backend)

    return lambda: [_unit(N, D), _unit(N, D), torch.tensor(7.0), torch.tensor(0.5)], call


def _contrastive_gap():
    def call(backend, a, b, s):
        return flashcontrast.contrastive_gap_loss(a, b, s, variant="cuaxu", backend=backend)

    return lambda: [_unit(N, D), _unit(N, D), torch.tensor(9.0)], call


FUNCTIONS = {
    "clip": _clip,
    "contrastive_gap": _contrastive_gap,
    "cwcl": _cwcl,
    "siglip": _siglip,
    "multiview_infonce": lambda: _multiview(flashcontrast.multiview_infonce_loss),
    "multiview_dhel": lambda: _multiview(flashcontrast.multiview_dhel_loss),
    "gram": _gram,
    "symile_n": _symile_n,
    "symile_n_squared": _symile_n2,
}


# The nn.Modules, built outside the compiled step (as a model holds them) and called in it
# with the leaves of the same objective's function case.
MODULES = {
    "clip": (flashcontrast.ClipLoss, lambda m, a, b, s, t: m(a, b, s, t)),
    "contrastive_gap": (
        lambda be: flashcontrast.ContrastiveGapLoss("cuaxu", backend=be),
        lambda m, a, b, s: m(a, b, s),
    ),
    "cwcl": (
        lambda be: flashcontrast.CWCLLoss(backend=be),
        lambda m, a, b, s, t: m(a, b, s, t, weight_features=_CWCL_U),
    ),
    "siglip": (flashcontrast.SigLipLoss, lambda m, a, b, s, t: m(a, b, s, t)),
    "multiview_infonce": (flashcontrast.MultiviewInfoNCELoss, lambda m, u, s: m(u, s)),
    "multiview_dhel": (flashcontrast.MultiviewDHELLoss, lambda m, u, s: m(u, s)),
    "gram": (
        lambda be: flashcontrast.GramLoss(0.1, be),
        lambda m, a, o1, o2, s: m(a, [o1, o2], s),
    ),
    "symile_n": (
        lambda be: flashcontrast.SymileLoss("n", be),
        lambda m, x, y, z, s: m([x, y, z], s, permutations=_PERMS),
    ),
    "symile_n_squared": (
        lambda be: flashcontrast.SymileLoss("n_squared", be),
        lambda m, x, y, z, s: m([x, y, z], s),
    ),
}
_PERMS = _perms(3, N)


def _eager_and_compiled(leaves: Callable, call: Callable, backend: str):
    """[loss, *grads] of call(backend, *leaves) in eager mode and compiled with
    fullgraph=True, on the same inputs, with upstream gradient 1.7."""
    inputs = leaves()

    def step(*xs):
        return call(backend, *xs) * 1.7

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        loss = fn(*xs)
        grads = torch.autograd.grad(loss, xs)
        results.append([loss.detach(), *grads])
    return results


def _assert_same(eager, compiled):
    assert len(eager) == len(compiled)
    names = ["loss"] + [f"grad[{k}]" for k in range(len(eager) - 1)]
    for name, e, c in zip(names, eager, compiled):
        assert torch.isfinite(e).all(), f"{name}: eager result is not finite"
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("objective", list(FUNCTIONS))
def test_functions_compile_fullgraph(objective, backend):
    leaves, call = FUNCTIONS[objective]()
    eager, compiled = _eager_and_compiled(leaves, call, backend)
    _assert_same(eager, compiled)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("objective", list(FUNCTIONS))
def test_modules_compile_fullgraph(objective, backend):
    leaves, _ = FUNCTIONS[objective]()
    make, invoke = MODULES[objective]
    module = make(backend)

    def call(_backend, *xs):
        return invoke(module, *xs)

    eager, compiled = _eager_and_compiled(leaves, call, backend)
    _assert_same(eager, compiled)


@pytest.mark.parametrize("objective", ["clip", "siglip", "multiview", "gram", "symile"])
def test_auto_resolution_for_cuda_tensors_traces(objective):
    """backend="auto" for CUDA tensors walks the CUDA and Triton availability checks (the
    Triton one imports triton). No GPU is needed to trace the choice itself: the compiled
    step returns a value that depends on it, which must equal the eager choice."""
    labels = {name: float(k) for k, name in enumerate(_dispatch.BACKENDS)}

    def step(x):
        chosen = _dispatch.backend_for(objective, torch.device("cuda"), "auto")
        return x + labels[chosen]

    x = torch.zeros(())
    want = step(x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
def test_triton_availability_traces_as_a_constant():
    """The availability answer is baked into the graph: tracing calls it for real and the
    compiled step gives the eager answer, for a device Triton can and one it cannot run on."""

    def step(x):
        ok_cpu = flashcontrast.backend_for("clip", "cpu", "triton") == "triton"
        meta = _dispatch._unavailable("triton", "clip", torch.device("meta"))
        return x + (1.0 if ok_cpu else 0.0) + (10.0 if meta is not None else 0.0)

    x = torch.zeros(())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, torch.tensor(11.0))


def test_symile_n_default_generator_under_compile():
    """Symile "n" without permutations draws torch.randperm(N) from the default generator.

    Dynamo traces the draws into the graph (no break with fullgraph=True); the compiled
    step draws from the same default generator, so after the same seed it computes what
    eager computes (values and gradients)."""
    inputs = [_unit(N, D), _unit(N, D), _unit(N, D), torch.tensor(6.0)]

    def step(x, y, z, s):
        return flashcontrast.symile_loss([x, y, z], s, backend="torch") * 1.7

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        torch.manual_seed(123)
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        loss = fn(*xs)
        results.append([loss.detach(), *torch.autograd.grad(loss, xs)])
    _assert_same(*results)


def test_symile_n_generator_breaks_the_graph_only():
    """A ``generator=`` is not traceable (Dynamo cannot put a torch.Generator into a graph):
    with fullgraph=True that is an error, without it a graph break, after which the step
    still computes what eager computes from an equally seeded generator. Explicit
    ``permutations`` (drawn outside the compiled region, e.g. by
    ``flashcontrast._sampling.symile_negative_permutations``) compile without a break."""
    xs = [_unit(N, D) for _ in range(3)]

    def step(x, y, z, gen):
        return flashcontrast.symile_loss([x, y, z], 6.0, generator=gen, backend="torch")

    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(step, fullgraph=True, backend="aot_eager")(*xs, torch.Generator())
    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager")(*xs, torch.Generator().manual_seed(3))
    want = step(*xs, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
