"""Ahead-of-time compile check of the Triton backend's kernels for real NVIDIA GPUs.

Run it as::

    python tools/triton_aot_check.py [--arch 80 90] [--json OUT]
        [--preset full|smoke] [--objectives pair gram symile] [--jobs N]

The tests run the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1), which
accepts programs the GPU compiler rejects (tl.dot on a dimension below 16, mixed 16-bit
dtypes, tiles that need more shared memory than the chip has, ...). This module compiles
every ``@triton.jit`` kernel of the backend with Triton's real compiler for
``GPUTarget("cuda", arch, 32)`` down to a cubin (ptxas ships with the Triton wheel), with
no GPU and no CUDA build of torch:

1. **What is compiled comes from the launchers themselves.** The public backend
   functions (``pair_forward`` / ``pair_backward`` as each objective calls them,
   ``gram_forward``, ``symile_n2_forward``, ... and their backwards) are called on meta
   tensors that report ``device == cuda:0`` inside a simulated GPU of the arch (SM count,
   compute capability), with ``JITFunction.run`` replaced by a recorder: every
   ``kernel[grid](...)`` launch is recorded (bound arguments, constexprs, num_warps,
   num_stages) instead of run. Tile sizes, flags and warps are therefore exactly the ones
   the launchers pick for those sizes on that arch; none of their logic is repeated here.
2. **Specialisation as on a GPU.** The recorded arguments go through Triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, as ``run`` does):
   pointers get ``tt.divisibility`` 16 when their address would be 16-byte aligned (meta
   tensors are placed on an aligned base plus their storage offset, like the CUDA caching
   allocator's 512-byte blocks), integers equal to 1 become constexprs and 16-divisible
   ones get ``tt.divisibility``. Variant ``spec`` is that specialisation; variant
   ``generic`` compiles the same launch with every parameter marked do-not-specialise
   (what any other strides, sizes or misaligned views would get).
3. **Resource fit.** Each compiled kernel's shared memory is compared with the arch's
   per-block opt-in limit (sm_80: 163 KiB, sm_90: 227 KiB), each recorded grid with
   CUDA's grid limits, and ptxas' ``-v`` log (Triton passes ``-v``;
   ``TRITON_DUMP_PTXAS_LOG`` makes it print it) gives registers, spills and stack frame,
   reported (spills are a speed problem, not a failure, unless ``--max-spill`` is given).
   The PTX says which tensor-core instructions each kernel uses (``mma``: wgmma,
   mma.sync, both, none); ``--require-wgmma`` fails an sm_90 kernel whose 16-bit products
   are not all wgmma, or that spills (the Hopper rule, ``wgmma_problem``).
4. **Coverage.** Every entry kernel (a ``@triton.jit`` function of the backend that no
   other one calls) must have been launched by some case: a new kernel that no case
   reaches fails the check. The jit helpers are inlined into the kernels that call them.

What it cannot tell: whether the kernels compute the right numbers (the interpreter tests
do that), how fast they run, or what happens at run time on a real device (driver/loader
errors, illegal memory accesses, the occupancy the scheduler reaches). It proves
compilation and static resource fit for the recorded configurations only.

Triton versions: run with 3.6 and 3.9. The binder, ``JITFunction._pack_args`` and
``KernelParam`` are Triton internals (stable from 3.6 to 3.9); a version that changes them
shows up as "specialize" failures, not as silently wrong signatures. The ptxas that
compiles is the one in the installed wheel (3.9 uses its CUDA 13 ptxas for sm_90).

Exit status: 0 when every kernel x configuration compiles and fits, 1 otherwise. Needs a
fresh process in which TRITON_INTERPRET is not "1" before the kernel modules are imported
(the module drops the variable at import and refuses to run on interpreted kernels).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence
from unittest import mock

# Triton decides interpreter vs compiler when a kernel is *defined*: drop the variable
# before any kernel module is imported (main() checks that this worked).
if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ.pop("TRITON_INTERPRET")

# Triton 3.9 warns once that its fp-fusion default will change; the check compiles with
# whatever default the installed Triton has, as a user's first launch would.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, KernelParam, create_function_from_signature  # noqa: E402

__all__ = ["ARCHS", "Result", "collect_jobs", "main", "run_check"]

_PACKAGE = "flashcontrast.backends.triton"
# The kernel modules: the pair engine (every objective but GRAM and Symile "n_squared"),
# GRAM, Symile "n_squared" (symile.py holds no other kernels).
OBJECTIVES = ("pair", "gram", "symile")
_KERNEL_MODULES = ("_common", *OBJECTIVES)
_PLANNING_MODULES = ("_plan",)  # no kernels; their device-property caches are cleared


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the check needs to know about a GPU generation."""

    capability: int  # 80, 90, ...: GPUTarget arch
    name: str
    sm_count: int  # the launchers plan their grids for it
    max_shared: int  # bytes of shared memory one block may opt into


ARCHS = {
    80: Arch(80, "A100", 108, 163 * 1024),
    86: Arch(86, "A10", 72, 99 * 1024),
    89: Arch(89, "L4", 58, 99 * 1024),
    90: Arch(90, "H100 SXM", 132, 227 * 1024),
    100: Arch(100, "B200", 148, 227 * 1024),
}

# ----------------------------------------------------------------------------- recording


_ALIGNED_BASE = 1 << 20  # a CUDA caching-allocator block: 512-byte aligned (and more)


class PointerArg:
    """Stands in for a tensor argument: Triton's binder only reads ``dtype`` and
    ``data_ptr()`` (whose value decides the 16-byte divisibility specialisation)."""

    def __init__(self, dtype: torch.dtype, byte_offset: int) -> None:
        self.dtype = dtype
        self.byte_offset = byte_offset

    def data_ptr(self) -> int:
        return _ALIGNED_BASE + self.byte_offset

    def __repr__(self) -> str:
        return f"PointerArg({self.dtype}, +{self.byte_offset})"


def _stand_in(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return PointerArg(value.dtype, value.storage_offset() * value.element_size())
    return value


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call as a launcher made it."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: Any
    case: str


class _Recorder:
    """Collects the launches made while it is installed (see :func:`simulated_gpu`)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.case = ""

    def run(self, kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any):
        self.launches.append(
            Launch(
                kernel,
                tuple(_stand_in(a) for a in args),
                {k: _stand_in(v) for k, v in kwargs.items()},
                grid,
                self.case,
            )
        )
        return None


_CUDA0 = torch.device("cuda", 0)
_META = torch.device("meta")


def _to_meta(value: Any) -> Any:
    if isinstance(value, (str, torch.device)):
        with contextlib.suppress(RuntimeError, TypeError):
            if torch.device(value).type == "cuda":
                return _META
    return value


class _MetaAsCuda(TorchFunctionMode):
    """Tensors asked for on a CUDA device are made on "meta" (no memory, no GPU), and
    meta tensors say they live on cuda:0, so the launchers take their GPU code paths."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return _CUDA0 if args[0].is_meta else func(*args)
        if func == torch.Tensor.is_cuda.__get__:
            return True if args[0].is_meta else func(*args)
        if func is torch.device:  # a device object names a device: leave it alone
            return func(*args, **kwargs)
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: (_to_meta(v) if k == "device" else v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _kernel_modules(names: Sequence[str] = _KERNEL_MODULES) -> list[ModuleType]:
    return [importlib.import_module(f"{_PACKAGE}.{name}") for name in names]


def _clear_caches() -> None:
    """The launchers cache device properties (functools caches): forget them."""
    for module in _kernel_modules((*_KERNEL_MODULES, *_PLANNING_MODULES)):
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


@contextlib.contextmanager
def simulated_gpu(arch: Arch) -> Iterator[_Recorder]:
    """Inside: torch believes in one GPU of ``arch`` (cuda:0, meta-backed tensors) and
    every Triton launch is recorded into the yielded recorder instead of run."""
    major, minor = divmod(arch.capability, 10)
    props = SimpleNamespace(
        name=f"simulated {arch.name} (sm_{arch.capability})",
        major=major,
        minor=minor,
        multi_processor_count=arch.sm_count,
        shared_memory_per_block_optin=arch.max_shared,
        total_memory=80 << 30,
    )
    recorder = _Recorder()

    def run(self, *args, **kwargs):
        return recorder.run(self, *args, **kwargs)

    _clear_caches()
    try:
        with contextlib.ExitStack() as stack:
            for attr, value in (
                ("get_device_properties", lambda *a, **k: props),
                ("get_device_capability", lambda *a, **k: (major, minor)),
                ("current_device", lambda: 0),
                ("device_count", lambda: 1),
                ("device", lambda *a, **k: contextlib.nullcontext()),
            ):
                stack.enter_context(mock.patch.object(torch.cuda, attr, value))
            stack.enter_context(mock.patch.object(JITFunction, "run", run))
            stack.enter_context(_MetaAsCuda())
            yield recorder
    finally:
        _clear_caches()


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One call pattern of an objective's backend functions (forward and backward)."""

    objective: str
    label: str
    call: Callable[[], None]


_DTYPES = {
    "fp32": torch.float32,  # torch's default matmul precision "highest": IEEE fp32 FMAs
    "tf32": torch.float32,  # with torch.set_float32_matmul_precision("high")
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@contextlib.contextmanager
def _precision(dtype_name: str) -> Iterator[None]:
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _cuda(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def _gram_case(k: int, n: int, d: int, dtype: torch.dtype, rectangular: bool = False) -> None:
    """GRAM square (the single-process call) or rectangular (a rank's n / 2 rows against
    n columns at an offset: the distributed call, its SQUARE=False kernels)."""
    from flashcontrast.backends.gram import GramBlock, GramCoefs
    from flashcontrast.backends.triton import gram

    rows, offset = (n // 2, n // 4) if rectangular else (n, 0)
    anchor, others = _cuda(rows, d, dtype=dtype), _cuda(k, n, d, dtype=dtype)
    scale, det_h, adj_h, floor_h = _cuda(), _cuda(n), _cuda(n, k, k), _cuda(n)
    block = GramBlock(anchor, others, scale, det_h, adj_h, floor_h, offset)
    row_lse, col_lse, *_ = gram.gram_forward(block)
    coefs = GramCoefs(row_lse, col_lse, _cuda(), 0.1, total=n)
    gram.gram_backward(block, coefs, out_dtype=torch.float32 if rectangular else None)


def _symile_case(n: int, d: int, dtype: torch.dtype) -> None:
    from flashcontrast.backends.triton import symile

    x, y, z = (_cuda(n, d, dtype=dtype) for _ in range(3))
    scale = _cuda()
    lse = symile.symile_n2_forward(x, y, z, scale)
    symile.symile_n2_backward(x, y, z, scale, lse, _cuda(n))


# The pair engine (triton/pair.py) as each objective calls it: (Pair options, coefficients
# given); the kernels' constexprs follow from these and the optional arguments.
_PAIR_OBJECTIVES = {
    "clip": (dict(epilogue="softmax"), ("rows", "pos_rows", "cols", "pos_cols")),
    "siglip": (dict(epilogue="sigmoid"), ("total",)),
    "siglip-negatives": (dict(epilogue="sigmoid", positives=False), ("total",)),
    "infonce": (dict(epilogue="rows"), ("rows", "pos_rows")),
    "mv-infonce": (dict(epilogue="rows", exclude_self=True, period=1024), ("rows", "pos_rows")),
    "mv-dhel": (dict(epilogue="rows", positives=False, exclude_self=True), ("rows",)),
}


def _pair_case(
    n: int, d: int, dtype: torch.dtype, kind: str, bias: bool, groups, override: bool, path: str
) -> None:
    """The pair engine's forward and backward on ``path``: "fused" (the kernels forming dA
    and dB) or "panel" (their X_IN_MEMORY epilogues between cuBLAS GEMMs, triton/panel.py),
    forced, since ``auto`` would pick one of them by the shape."""
    from flashcontrast.backends.triton import forced_path

    with forced_path(path):
        _pair_calls(n, d, dtype, kind, bias, groups, override)


def _pair_calls(
    n: int, d: int, dtype: torch.dtype, kind: str, bias: bool, groups, override: bool
) -> None:
    from flashcontrast.backends.pair import Coefs, Pair
    from flashcontrast.backends.triton import pair as triton_pair

    options, given = _PAIR_OBJECTIVES[kind]
    pair = Pair(**options)
    a, b, scale = _cuda(n, d, dtype=dtype), _cuda(n, d, dtype=dtype), _cuda()
    bias_t = _cuda() if bias else None
    rg = cg = None if groups is None else _cuda(n, dtype=groups)
    pl = _cuda(n) if override else None
    kw = dict(row_groups=rg, col_groups=cg, positive_logits=pl)
    stats = triton_pair.pair_forward(a, b, scale, bias_t, pair, **kw)
    coefs = Coefs(**{k: _cuda() if k == "total" else _cuda(n) for k in given})
    triton_pair.pair_backward(a, b, scale, bias_t, pair, stats, coefs, **kw)


def _pair_variants(flags: bool) -> list[tuple[str, bool, Any, bool]]:
    """(objective, bias, groups, override) of the pair engine's calls: each objective's
    plainest, or with ``flags`` its optional arguments (CLIP bias and groups, SigLIP
    without bias and negatives only, Symile "n"'s positive logits, the multi-view
    losses' groups)."""
    if not flags:
        return [("clip", False, None, False), ("siglip", True, None, False),
                ("infonce", False, None, False), ("mv-infonce", False, None, False),
                ("mv-dhel", False, None, False)]  # fmt: skip
    return [("clip", True, None, False), ("clip", False, torch.int64, False),
            ("clip", True, torch.int32, False), ("siglip", False, None, False),
            ("siglip-negatives", True, None, False), ("infonce", False, None, True),
            ("mv-infonce", False, torch.int64, False), ("mv-infonce", False, torch.int32, False),
            ("mv-dhel", False, torch.int64, False)]  # fmt: skip


_GROUPS = {None: "", torch.int64: " groups=i64", torch.int32: " groups=i32"}
# The panel path's cases, one per epilogue (softmax, sigmoid, rows with the exclusions).
_PANEL_KINDS = ("clip", "siglip", "mv-infonce")


def _cases_at(n: int, d: int, dname: str, flags: bool) -> list[Case]:
    """Every kernel module's cases at N = n, D = d, dtype ``dname``: the plainest call of
    each (the pair engine as each objective calls it, GRAM K = 3, Symile "n_squared"), and
    with ``flags`` the other variants of the optional arguments (the pair engine's:
    :func:`_pair_variants`; GRAM K = 2) instead."""
    dtype, size = _DTYPES[dname], f"{dname} N={n} D={d}"
    cases: list[Case] = []

    def add(objective: str, label: str, fn: Callable, *args: Any) -> None:
        cases.append(Case(objective, f"{objective} {size}{label}", lambda: fn(*args)))

    add("gram", f" K={2 if flags else 3}", _gram_case, 2 if flags else 3, n, d, dtype)
    if flags:
        add("gram", " K=2 rectangular", _gram_case, 2, n, d, dtype, True)
    if not flags:
        add("symile", "", _symile_case, n, d, dtype)
    for kind, bias, groups, override in _pair_variants(flags):
        label = f" {kind}{' bias' if bias else ''}{_GROUPS[groups]}"
        add("pair", label + (" override" if override else ""), _pair_case, n, d, dtype, kind,
            bias, groups, override, "fused")  # fmt: skip
    # the panel path's epilogues (X_IN_MEMORY): one plain call per epilogue
    for kind in _PANEL_KINDS:
        add("pair", f" {kind} panel", _pair_case, n, d, dtype, kind, kind == "siglip", None,
            False, "panel")  # fmt: skip
    return cases


PRESETS = ("full", "smoke")
_FLAGGED = ("gram", "pair")  # objectives the smoke preset compiles with their flags


def preset_cases(preset: str) -> list[tuple[str, Case]]:
    """(dtype name, case) pairs of a preset.

    The pair engine's calls run on the fused path, and one plain call per epilogue on the
    panel path too (its kernels with X_IN_MEMORY: ``_PANEL_KINDS``).

    ``full``, for each of fp32 (IEEE), tf32, fp16 and bf16: the plain calls at N in {97,
    4096, 65536} x D in {64, 100, 512, 1024}; the optional-argument variants at N = 4096
    with every D and at N = 97, D = 100; the plain calls at N = 2^21, D = 1024 (element
    offsets beyond int32: the INDEX_64 path). ``smoke`` (what the test suite compiles, in
    about a minute on two cores): the plain calls in bf16 at N = 4096, D = 512 (D in
    chunks, the largest tiles, 16-bit tensor-core products) of Symile "n_squared", GRAM at
    K = 2 (K = 3 takes ptxas twice as long), the pair engine's optional-argument variants
    (each objective's constexprs with bias, groups and positive logits: a superset of the
    plain calls' branches): every kernel, and each constexpr branch of it, once per arch.
    """
    out: list[tuple[str, Case]] = []
    if preset == "full":
        for dname in _DTYPES:
            grid = [(n, d, False) for n in (97, 4096, 65536) for d in (64, 100, 512, 1024)]
            grid += [(4096, d, True) for d in (64, 100, 512, 1024)] + [(97, 100, True)]
            grid += [(1 << 21, 1024, False)]
            for n, d, flags in grid:
                out += [(dname, c) for c in _cases_at(n, d, dname, flags)]
    elif preset == "smoke":
        plain = [c for c in _cases_at(4096, 512, "bf16", False) if c.objective not in _FLAGGED]
        flagged = [c for c in _cases_at(4096, 512, "bf16", True) if c.objective in _FLAGGED]
        out += [("bf16", c) for c in plain + flagged]
    else:
        raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")
    return out


# ----------------------------------------------------------------------------- jobs


@dataclasses.dataclass
class Job:
    """One compilation: a recorded launch, specialised for one arch and variant."""

    kernel: JITFunction
    arch: Arch
    variant: str  # "spec" (as a GPU launch specialises) or "generic" (nothing specialised)
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any  # the backend's options dataclass
    cases: list[str]

    def key(self) -> tuple:
        return (
            self.kernel.fn.__module__,
            self.kernel.fn.__qualname__,
            self.arch.capability,
            repr(self.signature),
            repr(sorted(self.constexprs.items(), key=lambda kv: kv[0])),
            repr(sorted(self.attrs.items(), key=lambda kv: kv[0])),
            repr(self.options),
        )

    def named_constexprs(self) -> dict:
        """{parameter name: value} of the constexprs (dtypes as their names)."""
        names = self.kernel.arg_names
        out = {}
        for path, value in self.constexprs.items():
            name = ".".join([names[path[0]], *map(str, path[1:])])
            if isinstance(value, tl.constexpr):
                value = value.value
            out[name] = str(value) if isinstance(value, tl.dtype) else value
        return out


def _params(kernel: JITFunction, variant: str) -> list:
    if variant == "spec":
        return kernel.params
    # do_not_specialize and do_not_specialize_on_alignment for every parameter
    return [KernelParam(p.num, p._param, True, True) for p in kernel.params]


def _specialize(launch: Launch, arch: Arch, variant: str) -> Job:
    """The (signature, constexprs, attrs, options) Triton's run() would compile for this
    launch on ``arch``: its own binder and argument packing, as in JITFunction.run."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch.capability, 32))
    binder = create_function_from_signature(kernel.signature, _params(kernel, variant), backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return Job(kernel, arch, variant, signature, constexprs, attrs, options, [launch.case])


_GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid dimensions x, y, z


def _grid_problem(grid: Any) -> Optional[str]:
    """Why CUDA would refuse to launch this grid, or None (callable grids: not checked)."""
    if callable(grid):
        return None
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3:
        return f"grid {grid} must have 1 to 3 dimensions"
    for size, limit, axis in zip(grid, _GRID_LIMITS, "xyz"):
        if not 1 <= int(size) <= limit:
            return f"grid {grid}: {axis} = {size} outside [1, {limit}]"
    return None


def entry_kernels(modules: Sequence[ModuleType]) -> dict[str, JITFunction]:
    """{qualified name: kernel} of the jit functions no other jit function calls."""
    jits = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                jits[name] = value
    sources = {name: jf.src if isinstance(jf.src, str) else "" for name, jf in jits.items()}
    called = {
        name
        for name in jits
        for other, src in sources.items()
        if other != name and re.search(rf"\b{re.escape(name)}\s*\(", src)
    }
    return {f"{jf.fn.__module__}.{name}": jf for name, jf in jits.items() if name not in called}


def _failure(kind: str, error, arch, case: str, kernel: Optional[str] = None) -> dict:
    """One failure record: ``error`` an exception (named by its type) or a sentence."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    record = dict(kind=kind, arch=arch.capability, case=case, error=text)
    return record if kernel is None else {**record, "kernel": kernel}


def collect_jobs(
    archs: Sequence[Arch],
    preset: str = "full",
    objectives: Sequence[str] = OBJECTIVES,
    variants: Sequence[str] = ("spec", "generic"),
) -> tuple[list[Job], list[dict]]:
    """(unique compile jobs, failures) for the cases of ``preset`` on ``archs``.

    Failures here are cases whose launchers raised under the simulated GPU, launches on a
    grid CUDA would refuse (a dimension of 0, y or z beyond 65535) and entry kernels that
    no case launched.
    """
    failures: list[dict] = []
    jobs: dict[tuple, Job] = {}
    launched: set[str] = set()
    cases = [(dn, c) for dn, c in preset_cases(preset) if c.objective in objectives]
    for arch in archs:
        with simulated_gpu(arch) as recorder:
            for dname, case in cases:
                recorder.case = case.label
                try:
                    with _precision(dname):
                        case.call()
                except Exception as exc:
                    failures.append(_failure("record", exc, arch, case.label))
        for launch in recorder.launches:
            launched.add(f"{launch.kernel.fn.__module__}.{launch.kernel.fn.__name__}")
            problem = _grid_problem(launch.grid)
            if problem is not None:
                failures.append(
                    _failure("grid", problem, arch, launch.case, launch.kernel.fn.__name__)
                )
            for variant in variants:
                try:
                    job = _specialize(launch, arch, variant)
                except Exception as exc:
                    failures.append(
                        _failure("specialize", exc, arch, launch.case, launch.kernel.fn.__name__)
                    )
                    continue
                seen = jobs.setdefault(job.key(), job)
                if seen is not job:
                    seen.cases.append(launch.case)
    # _common's kernel (the LSE combine) is launched by GRAM.
    common = ["_common"] if "gram" in objectives else []
    modules = _kernel_modules(common + [m for m in OBJECTIVES if m in objectives])
    for name in sorted(set(entry_kernels(modules)) - launched):
        failures.append(dict(kind="coverage", kernel=name, error="no case launches this kernel"))
    return list(jobs.values()), failures


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Result:
    """Outcome of one compile job."""

    kernel: str
    arch: int
    variant: str
    ok: bool
    constexprs: dict
    signature: dict
    num_warps: int
    num_stages: int
    cases: list
    shared: Optional[int] = None
    max_shared: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    mma: Optional[str] = None  # the PTX's tensor-core instructions: wgmma, mma.sync, both, none
    atomics: Optional[int] = None  # global atomic / reduction instructions in the PTX
    hopper: Optional[str] = None  # sm_90: why the kernel breaks the Hopper rule (None: it doesn't)
    seconds: float = 0.0
    error: Optional[str] = None


def _tensor_core_ops(ptx: str) -> str:
    """Which matrix instructions a kernel's PTX holds: "tcgen05" (Blackwell's), "wgmma"
    (Hopper's asynchronous warpgroup MMA), "mma.sync" (the Ampere-style warp MMA), "both"
    (wgmma and mma.sync) or "none"."""
    if "tcgen05.mma" in ptx:  # Blackwell's tensor-memory MMA (sm_100a)
        return "tcgen05"
    wgmma, sync = "wgmma.mma_async" in ptx, re.search(r"\bmma\.sync\b", ptx) is not None
    return "both" if wgmma and sync else "wgmma" if wgmma else "mma.sync" if sync else "none"


_SIXTEEN_BIT = ("fp16", "bf16", "tl.float16", "tl.bfloat16", "float16", "bfloat16")


def wgmma_problem(result: Result) -> Optional[str]:
    """Why a compiled sm_90 kernel breaks the Hopper rule, or None: its 16-bit products
    (DOT_DTYPE 16-bit) must all be wgmma (an mma.sync among them runs at a fraction of the
    rate), and it must not spill."""
    if result.arch != 90 or not result.ok:
        return None
    dot = str(result.constexprs.get("DOT_DTYPE", "")).split(".")[-1]
    if any(dot == t.split(".")[-1] for t in _SIXTEEN_BIT) and result.mma in ("mma.sync", "both"):
        return f"16-bit products as {result.mma}, not wgmma only"
    if result.spill_stores:
        return f"{result.spill_stores} bytes of spill stores"
    return None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def _parse_ptxas(log: str) -> dict:
    """Registers, spills and stack frame from ptxas -v output (the last entry function)."""
    out: dict = {}
    regs = _PTXAS_REGS.findall(log)
    frames = _PTXAS_FRAME.findall(log)
    if regs:
        out["registers"] = int(regs[-1])
    if frames:
        frame, stores, loads = map(int, frames[-1])
        out.update(stack_frame=frame, spill_stores=stores, spill_loads=loads)
    return out


def _metadata(compiled: Any, name: str, default: Any = None) -> Any:
    meta = compiled.metadata
    if isinstance(meta, dict):  # older Triton
        return meta.get(name, default)
    return getattr(meta, name, default)


def _empty_result(job: Job) -> Result:
    return Result(
        kernel=f"{job.kernel.fn.__module__}.{job.kernel.fn.__name__}",
        arch=job.arch.capability,
        variant=job.variant,
        ok=False,
        constexprs=job.named_constexprs(),
        signature={k: v for k, v in job.signature.items() if v != "constexpr"},
        num_warps=job.options.num_warps,
        num_stages=job.options.num_stages,
        cases=sorted(set(job.cases)),
        max_shared=job.arch.max_shared,
    )


def _crashed(job: Job, exc: BaseException) -> Result:
    result = _empty_result(job)
    result.error = f"the compiling process failed: {type(exc).__name__}: {exc}"
    return result


def compile_job(job: Job) -> Result:
    """Compile one job to a cubin and check its shared memory against the arch."""
    result = _empty_result(job)
    target = GPUTarget("cuda", job.arch.capability, 32)
    src = ASTSource(job.kernel, job.signature, job.constexprs, job.attrs)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            compiled = triton.compile(src, target=target, options=job.options.__dict__)
    except Exception as exc:
        result.seconds = time.perf_counter() - start
        message = f"{type(exc).__name__}: {exc}"
        result.error = message if len(message) < 4000 else message[:4000] + " ..."
        return result
    result.seconds = time.perf_counter() - start
    result.__dict__.update(_parse_ptxas(log.getvalue()))
    result.shared = int(_metadata(compiled, "shared", 0))
    ptx = compiled.asm.get("ptx", "")
    result.mma = _tensor_core_ops(ptx)
    result.atomics = len(re.findall(r"\b(?:atom|red)\.global\.", ptx))
    result.num_warps = int(_metadata(compiled, "num_warps", result.num_warps))
    if result.shared > job.arch.max_shared:
        result.error = (
            f"needs {result.shared} bytes of shared memory, sm_{job.arch.capability} "
            f"allows {job.arch.max_shared}"
        )
        return result
    result.ok = True
    result.hopper = wgmma_problem(result)
    return result


_JOBS: list[Job] = []  # read by forked workers (jobs hold kernels, which do not pickle)


def _compile_index(index: int) -> Result:
    return compile_job(_JOBS[index])


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pool(jobs: int) -> Optional[concurrent.futures.Executor]:
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("fork")
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)


def run_check(
    archs: Sequence[Arch],
    preset: str = "full",
    objectives: Sequence[str] = OBJECTIVES,
    variants: Sequence[str] = ("spec", "generic"),
    jobs: int = 1,
    progress: Optional[Callable[[Result], None]] = None,
) -> tuple[list[Result], list[dict]]:
    """Record, specialise and compile; (compile results, other failures)."""
    job_list, failures = collect_jobs(archs, preset, objectives, variants)
    _JOBS[:] = job_list
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        # A fresh Triton cache, so that ptxas (and its -v log, which Triton prints when
        # TRITON_DUMP_PTXAS_LOG is set) runs for every kernel; forked workers inherit it.
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="flashcontrast-aot-"))
        stack.enter_context(_environ(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1"))
        pool = _pool(min(jobs, len(job_list)))
        if pool is None:
            for index in range(len(job_list)):
                results.append(_compile_index(index))
                if progress:
                    progress(results[-1])
        else:
            futures = {pool.submit(_compile_index, i): i for i in range(len(job_list))}
            for future in concurrent.futures.as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as exc:  # a worker died (the compiler crashed, ...)
                    results.append(_crashed(job_list[futures[future]], exc))
                if progress:
                    progress(results[-1])
            pool.shutdown()
    _JOBS.clear()
    results.sort(key=lambda r: (r.kernel, r.arch, r.variant, json.dumps(r.constexprs, default=str)))
    return results, failures


# ----------------------------------------------------------------------------- reporting


_SHOWN_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK", "K", "ONE_CHUNK")
# The pair kernels' boolean constexprs that name no HAS_ / BY_ / INDEX_ flag.
_SHOWN_FLAGS = (
    "POSITIVES", "EXCLUDE_SELF", "PERIOD", "OVERRIDE", "NORMALIZE", "TWO", "X_IN_MEMORY",
)  # fmt: skip


def _describe(result: Result) -> str:
    c = result.constexprs
    parts = [f"{k}={c[k]}" for k in _SHOWN_CONSTEXPRS if k in c]
    if "EPILOGUE" in c:
        parts.append(str(c["EPILOGUE"]))
    flags = [
        k
        for k, v in c.items()
        if k.isupper() and (k.startswith(("HAS_", "BY_", "INDEX_")) or k in _SHOWN_FLAGS)
    ]
    parts += [k for k in flags if c[k] is True]
    if "WHICH" in c:
        parts.append(f"WHICH={c['WHICH']}")
    ptrs = sorted({v for v in result.signature.values() if v.startswith("*")} - {"*fp32"})
    dot = c.get("DOT_DTYPE", "")
    prec = c.get("DOT_PRECISION", "")
    parts.append(f"dot={dot}/{prec}" if dot else "")
    parts.append(",".join(ptrs))
    return " ".join(p for p in parts if p)


def format_table(results: Sequence[Result]) -> str:
    """A text table, one line per result."""
    head = f"{'kernel':28} {'sm':>3} {'var':7} {'warps/st':>8} {'smem':>7} {'regs':>4} {'spill':>9}"
    head += f" {'mma':>8}"
    lines = [head + "  config", "-" * (len(head) + 40)]
    for r in results:
        spill = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = "" if r.ok else "  FAILED: " + (r.error or "").splitlines()[0][:200]
        if r.ok and r.spill_stores:
            status = "  (spills)"
        lines.append(
            f"{r.kernel.rsplit('.', 1)[-1]:28} {r.arch:>3} {r.variant:7} "
            f"{f'{r.num_warps}/{r.num_stages}':>8} {r.shared if r.shared is not None else '-':>7} "
            f"{r.registers if r.registers is not None else '-':>4} {spill:>9} {r.mma or '-':>8}  "
            f"{_describe(r)}{status}"
        )
    return "\n".join(lines)


def _versions() -> dict:
    return dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0])


def _check_compiling() -> Optional[str]:
    """Why the kernels cannot be compiled here (they were defined interpreted), or None."""
    from flashcontrast.backends.triton import pair

    if not isinstance(pair._pair_fwd_kernel, JITFunction):
        return (
            "the Triton kernels were defined for the interpreter (TRITON_INTERPRET=1 was "
            "set when they were imported): run this module in a fresh process without it"
        )
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python tools/triton_aot_check.py",
        description="Compile every Triton kernel of flashcontrast for real GPUs, offline.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    parser.add_argument("--preset", choices=PRESETS, default="full")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument(
        "--variants", nargs="+", choices=("spec", "generic"), default=["spec", "generic"]
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    parser.add_argument(
        "--max-spill",
        type=int,
        default=None,
        metavar="BYTES",
        help="also fail kernels whose ptxas spill stores exceed BYTES (default: report only)",
    )
    parser.add_argument(
        "--require-wgmma",
        action="store_true",
        help="also fail sm_90 kernels whose 16-bit products are not all wgmma, or that spill",
    )
    parser.add_argument("--list", action="store_true", help="print the jobs, compile nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    args = parser.parse_args(argv)

    reason = _check_compiling()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    archs = [ARCHS[a] for a in args.arch]
    if args.list:
        jobs, failures = collect_jobs(archs, args.preset, args.objectives, args.variants)
        for job in jobs:
            name = job.kernel.fn.__name__
            print(f"{name} sm_{job.arch.capability} {job.variant} {job.named_constexprs()}")
        print(f"{len(jobs)} jobs, {len(failures)} failures before compiling")
        return 1 if failures else 0

    start = time.perf_counter()
    done = [0]

    def progress(result: Result) -> None:
        done[0] += 1
        if not args.quiet or not result.ok:
            state = "ok" if result.ok else "FAILED"
            print(
                f"[{done[0]}] {state} {result.kernel.rsplit('.', 1)[-1]} sm_{result.arch} "
                f"{result.variant} {result.seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    results, failures = run_check(
        archs, args.preset, args.objectives, args.variants, args.jobs, progress
    )
    elapsed = time.perf_counter() - start
    if args.max_spill is not None:
        for r in results:
            if r.ok and (r.spill_stores or 0) > args.max_spill:
                r.ok = False
                r.error = f"{r.spill_stores} bytes of spill stores (more than --max-spill)"
    if args.require_wgmma:
        for r in results:
            if r.hopper is not None:
                r.ok, r.error = False, f"Hopper rule (--require-wgmma): {r.hopper}"
    bad = [r for r in results if not r.ok]
    if not args.quiet:
        print(format_table(results))
    for r in bad:
        print(f"\nFAILED {r.kernel} sm_{r.arch} {r.variant} {r.constexprs}\n  cases: {r.cases[:3]}")
        print("  " + (r.error or "").replace("\n", "\n  "))
    for f in failures:
        print(f"\nFAILED ({f['kind']}) {json.dumps(f, default=str)}")
    summary = dict(
        versions=_versions(),
        archs=args.arch,
        preset=args.preset,
        objectives=args.objectives,
        compiled=len(results),
        failed=len(bad) + len(failures),
        seconds=round(elapsed, 1),
    )
    print(
        f"\n{len(results)} compilations for sm_{'/sm_'.join(map(str, args.arch))} with triton "
        f"{triton.__version__}: {len(results) - len(bad)} ok, {len(bad)} failed, "
        f"{len(failures)} other failures, {elapsed:.0f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(summary=summary, results=[dataclasses.asdict(r) for r in results],
                     failures=failures),
                f,
                indent=1,
                default=str,
            )  # fmt: skip
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
