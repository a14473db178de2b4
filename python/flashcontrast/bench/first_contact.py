"""``python -m flashcontrast.bench --gpu-report``: the budgeted first-contact GPU report.

A GPU may be at hand for minutes only, so the report runs under ``--budget-s`` (default
420) and takes its steps in order of value, each writing its rows the moment they exist
(``budget.py``): a run killed at its limit leaves everything measured so far.

    (a) environment: GPU, SMs, driver, versions; the bf16 GEMM rate at 8192^3 and the
        device-to-device copy rate, the roofline every later row is divided by
    (b) build flashcontrast._C for this device's arch only (sm_90a on Hopper), all cores,
        if the installed one lacks it; then the report restarts itself to load it
    (c) correctness smoke (``smoke.py``): every objective x backend x dtype at odd N,
        D % 16 != 0 and N^2 > 2^31, against the float64 oracle by the rule; worker
        processes so that Triton compiles in parallel; the passes become the
        verification record that ``backend="auto"`` reads (``record.py``)
    (d) CLIP and SigLIP forward + backward, bf16, N = 65,536 and 16,384, D = 1024 and 512:
        the GEMM baseline, every backend, OpenCLIP's loss and Inf-CL where installed,
        TFLOP/s (8 N^2 D) and the fraction of the measured GEMM rate
    (e) the other objectives at one size each
    (f) the suite's GPU tests, in what is left of the budget

``--dry-run`` prints this plan with each step's estimated seconds and what the estimate
rests on (measurements named in ``ESTIMATES`` and ``flashcontrast.costmodel``), and runs
nothing; it needs no GPU (an H200 is assumed). Files, under ``--out`` (default
benchmarks/results/<device>/), stamped with the start time: report-<stamp>.log,
env-<stamp>.json, smoke-<stamp>.csv, verification-<stamp>.json, bench-<stamp>.csv,
tests-<stamp>.log.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch

from .. import __version__, costmodel
from .._cuda_ext import runtime_info
from ..backends import _paths
from .baselines import INF_CL, OPENCLIP, baseline_call, inf_cl_unavailable, openclip_unavailable
from .budget import Budget, Log, RowWriter, Step, format_plan
from .measure import Row, measure, measure_matmul
from .report import device_slug
from .smoke import BACKENDS, CUDA_PANEL, TRITON_PANEL, VERIFIED_AS, groups

# What the estimates rest on: measured here, each with where and when.
ESTIMATES = {
    "env_s": (
        15.0,
        "CUDA context + cuBLAS start (5-10 s cold) + 13 GEMMs of 8192^3 (1.4 ms "
        "each at 780 TFLOP/s) + 13 copies of 8.6 GB (2 ms each at 4.3 TB/s)",
    ),
    # nvcc 13.0, -gencode sm_90a, one file per core, on the CI machine (2-core AMD EPYC,
    # 2026-12-02): the pair engine's per-dtype units pair_bfloat16.cu 14.3 s,
    # pair_float16.cu 14.2, pair_float32.cu 13.6, pair.cu 2.4 (load average 1.5; in one
    # file they took ~90 s under load, hence the split), symile.cu 10.5 s, gram.cu 8.4,
    # runtime_info.cu 2.5; bindings.cpp (g++, pybind11) 13 s.
    "build_s": (
        55.0,
        "per-file compile times for sm_90a measured on the CI machine (2-core "
        "AMD EPYC, 2026-12-02): the longest file 14 s, all files in parallel on 16 "
        "cores, + CMake configure ~10 s + link, x2 margin",
    ),
    # Triton 3.9 AOT compile of every kernel for sm_90 on the CI machine (2026-12-02,
    # python tools/triton_aot_check.py --arch 90 --preset smoke):
    # 0.25-3.5 s per kernel, mean 1.3 s; the JIT adds its Python side: 1.5 s each.
    "triton_compile_s": (
        1.5,
        "Triton AOT compiles for sm_90 on the CI machine: 0.25-3.5 s "
        "per kernel, mean 1.3 s (2026-12-02)",
    ),
    "compiles_per_group": (
        4.0,
        "a forward, a backward and (some groups) a combine kernel, per new shape class, and "
        "on the pair engine's objectives the panel path's X_IN_MEMORY forward and backward",
    ),
    "worker_start_s": (12.0, "import torch + flashcontrast and a CUDA context per worker"),
    "small_case_s": (0.15, "a small case: oracle share + fwd + bwd + the rule's host syncs"),
    "large_case_s": (
        1.5,
        "an N^2 > 2^31 case: float64 torch-backend oracle (fp64 GEMMs at "
        "~60 TFLOP/s, N^2 fp64 blocks) shared by the backends",
    ),
    "tests_s": (120.0, "the suite's gpu-marked tests (~400 small kernel tests) + pytest start"),
}
TIMING_REPEATS = 5
TIMING_SIZES = [65536, 16384]  # most valuable first: the target size
TIMING_DIMS = [1024, 512]
OTHER_CASES = [  # (objective, N, D): step (e), one size each
    ("mv-infonce-v4", 16384, 512),
    ("mv-dhel-v4", 16384, 512),
    ("gram-m4", 16384, 512),
    ("symile-n", 65536, 512),
    ("symile-n2", 2048, 64),
]
# The GEMM count each bench objective's forward + backward takes (costmodel's basis).
_OTHER_FLOPS = {
    "mv-infonce-v4": lambda n, d: 4 * 2.0 * (4 * n) ** 2 * d,
    "mv-dhel-v4": lambda n, d: 4 * 2.0 * 4 * n * n * d,
    "gram-m4": lambda n, d: 21 * 2.0 * n * n * d,
    "symile-n": lambda n, d: 3 * 4 * 2.0 * n * n * d,
    "symile-n2": lambda n, d: 3 * 4 * 2.0 * n**3 * d,
}
_COLUMNS = [
    *(f.name for f in fields(Row)),
    "tflops",
    "gemm_fraction",
    "note",
    "versions",
    "timestamp",
]
_SMOKE_COLUMNS = [
    "objective", "key", "backend", "dtype", "n", "d", "large", "oracle", "status",
    "worst_ratio", "detail", "seconds", "device",
]  # fmt: skip


def _e(key: str) -> float:
    return ESTIMATES[key][0]


class Context:
    """What the steps share: the device, the output files, the budget and the rates."""

    def __init__(self, args, device: torch.device, budget: Budget, stamp: str) -> None:
        self.args, self.device, self.budget, self.stamp = args, device, budget, stamp
        self.out = Path(args.out) if args.out else None
        self.log = Log(self.out / f"report-{stamp}.log" if self.out else None)
        self.gemm_flops: Optional[float] = None
        self.copy_bytes: Optional[float] = None
        self.passed: list = []
        self.path_times: list = []  # (objective, n, d, dtype, path, ms): the Triton paths

    def path(self, name: str) -> Optional[Path]:
        return self.out / f"{name}-{self.stamp}" if self.out else None


# ----------------------------------------------------------------------------- (a) env


def _driver_version() -> str:
    info = runtime_info()
    if info.get("cuda_driver"):
        return f"CUDA driver API {info['cuda_driver']}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"


def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gemm_rate(dev: torch.device, n: int, dtype: torch.dtype) -> float:
    """flop/s of an n^3 matmul on random data (median of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return 2.0 * n**3 / (_median_ms(lambda: torch.mm(a, b), dev, 3, 10) * 1e-3)


def _copy_rate(dev: torch.device, elems: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``elems`` fp32."""
    x = torch.empty(elems, device=dev, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    return 2.0 * elems * 4 / (_median_ms(lambda: y.copy_(x), dev, 3, 10) * 1e-3)


def step_env(ctx: Context) -> None:
    dev = ctx.device
    on_gpu = dev.type == "cuda"
    env = {
        "date": ctx.stamp,
        "flashcontrast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "c_extension": runtime_info(),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            device_class=f"sm_{props.major}{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(),
        )
    else:
        env.update(gpu=None, device_class="cpu", cpu=platform.processor() or platform.machine())
    n = 8192 if on_gpu else 512
    ctx.gemm_flops = _gemm_rate(dev, n, torch.bfloat16 if on_gpu else torch.float32)
    ctx.copy_bytes = _copy_rate(dev, (1 << 30) if on_gpu else (1 << 22))  # 4.3 GB on a GPU
    if on_gpu:
        torch.cuda.empty_cache()
    env.update(
        gemm=f"{'bf16' if on_gpu else 'fp32'} {n}^3",
        gemm_tflops=round(ctx.gemm_flops / 1e12, 1),
        copy_tb_s=round(ctx.copy_bytes / 1e12, 3),
    )
    if ctx.out:
        ctx.path("env").with_suffix(".json").write_text(json.dumps(env, indent=1) + "\n")
    for k, v in env.items():
        ctx.log(f"  {k}: {v}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "not installed"


# ----------------------------------------------------------------------------- (b) build


def _arch(device: torch.device) -> Optional[str]:
    """nvcc's arch for the device: "90a" on Hopper (wgmma, TMA), "100a" on Blackwell B200."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    cc = f"{major}{minor}"
    return cc + "a" if cc in ("90", "100") else cc


def needs_build(device: torch.device) -> Optional[str]:
    """Why _C must be built for this device (None: it is built, or no GPU)."""
    arch = _arch(device)
    if arch is None:
        return None
    info = runtime_info()
    if not info.get("has_c"):
        return f"_C is not built ({info.get('reason')})"
    have = info.get("compiled_archs", [])
    if int(arch.rstrip("a")) not in have:
        return f"_C has archs {have}, not {arch}"
    return None


def step_build(ctx: Context) -> bool:
    """Build _C in place for this device's arch; True if the report must restart."""
    why = needs_build(ctx.device)
    if why is None:
        ctx.log("  _C is built for this device: nothing to do")
        return False
    root = Path(__file__).resolve().parents[3]
    if not (root / "setup.py").is_file():
        ctx.log(f"  {why}; no checkout here to build from (setup.py): the CUDA backend is skipped")
        return False
    arch = _arch(ctx.device)
    env = {**os.environ, "FLASHCONTRAST_CUDA_ARCHS": arch, "MAX_JOBS": str(os.cpu_count() or 1)}
    ctx.log(f"  {why}: python setup.py build_ext --inplace, FLASHCONTRAST_CUDA_ARCHS={arch}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    for line in tail:
        ctx.log(f"    {line}")
    ctx.log(f"  build exit {proc.returncode} after {time.perf_counter() - t0:.1f} s")
    return proc.returncode == 0


# ----------------------------------------------------------------------------- (c) smoke


def _smoke_groups(ctx: Context) -> list:
    args = ctx.args
    asked = list(args.backends or BACKENDS)
    for base, panel in (("triton", TRITON_PANEL), ("cuda", CUDA_PANEL)):
        if base in asked and panel not in asked:  # both paths verify the backend
            asked.append(panel)
    backends = tuple(b for b in BACKENDS if b in asked)
    return groups(ctx.device, backends=backends, tiny=args.smoke_tiny)


def smoke_estimate(n_groups: int, n_large: int, n_backends: int, workers: int) -> float:
    compiles = n_groups * _e("compiles_per_group") * (1 if n_backends else 0)
    work = compiles * _e("triton_compile_s")
    work += (n_groups - n_large) * n_backends * _e("small_case_s") + n_large * _e("large_case_s")
    return _e("worker_start_s") + 1.3 * work / max(1, workers)


def _workers(ctx: Context) -> int:
    if ctx.args.smoke_workers:
        return ctx.args.smoke_workers
    return max(1, min(8, (os.cpu_count() or 2) // 2)) if ctx.device.type == "cuda" else 1


def step_smoke(ctx: Context, reserve_s: float) -> None:
    todo = _smoke_groups(ctx)
    workers = _workers(ctx)
    deadline = time.monotonic() + max(0.0, ctx.budget.remaining() - reserve_s)
    # The workers' group lists, result lines and stderr: scratch files outside --out (a
    # lent machine hands back a few files only); a dying worker's stderr tail goes to the log.
    scratch = Path(tempfile.mkdtemp(prefix=f"flashcontrast-smoke-{ctx.stamp}-"))
    writer = RowWriter(ctx.path("smoke").with_suffix(".csv"), _SMOKE_COLUMNS) if ctx.out else None
    results: list = []
    shards = [todo[i::workers] for i in range(workers)]
    procs: dict = {}
    restarts: dict = {}

    def start(k: int, shard: list) -> None:
        restarts[k] = restarts.get(k, -1) + 1
        spec = scratch / f"groups-{k}-{restarts[k]}.json"
        spec.write_text(json.dumps([asdict(g) for g in shard]))
        out = scratch / f"worker-{k}-{restarts[k]}.jsonl"
        env = {k2: v for k2, v in os.environ.items() if k2 != "TRITON_INTERPRET"}
        if ctx.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, "-m", "flashcontrast.bench.smoke", "--worker", "--groups",
               str(spec), "--out", str(out), "--device", str(ctx.device)]  # fmt: skip
        log = open(scratch / f"worker-{k}.err", "a")
        procs[k] = {"proc": subprocess.Popen(cmd, env=env, stderr=log, stdout=log), "log": log,
                    "out": out, "pos": 0, "shard": shard, "done": set(),
                    "last": time.monotonic()}  # fmt: skip

    def drain(k: int) -> None:
        w = procs[k]
        if not w["out"].exists():
            return
        with open(w["out"]) as f:
            f.seek(w["pos"])
            for line in f:
                if not line.endswith("\n"):
                    break
                w["pos"] += len(line)
                rec = json.loads(line)
                w["last"] = time.monotonic()
                if "done" in rec:
                    w["done"].add(json.dumps(rec["done"], sort_keys=True))
                elif "start" not in rec:
                    results.append(rec)
                    if writer:
                        writer.write(rec)
                    ctx.log(
                        f"  [{len(results)}] {rec['status']:>5} {rec['objective']} "
                        f"{rec['backend']} {rec['dtype']} N={rec['n']} D={rec['d']}: "
                        f"{rec.get('detail', '')}"
                    )

    for k, shard in enumerate(shards):
        if shard:
            start(k, shard)
    while procs:
        time.sleep(0.5)
        for k in list(procs):
            drain(k)
            w = procs[k]
            code = w["proc"].poll()
            stalled = time.monotonic() - w["last"] > ctx.args.smoke_case_timeout
            if code is None and time.monotonic() < deadline and not stalled:
                continue
            if code is None:
                w["proc"].kill()
                w["proc"].wait()
                drain(k)
            w["log"].close()
            if code not in (0, None):
                err = (scratch / f"worker-{k}.err").read_text().strip().splitlines()[-8:]
                for line in err:
                    ctx.log(f"    worker {k}: {line}")
            left = [g for g in w["shard"] if json.dumps(asdict(g), sort_keys=True) not in w["done"]]
            why = (
                None
                if code == 0
                else ("budget" if time.monotonic() >= deadline else f"worker exit {code}")
            )
            if stalled and code is None:
                why = f"no result for {ctx.args.smoke_case_timeout:.0f} s (hang?)"
            del procs[k]
            if left and why and why != "budget" and restarts[k] < 2 and time.monotonic() < deadline:
                ctx.log(f"  worker {k}: {why}; restarting it for {len(left) - 1} more groups")
                start(k, left[1:])  # the group in flight when it died is recorded below
                _record_not_run(ctx, writer, results, left[:1], why)
            elif left:
                _record_not_run(ctx, writer, results, left, why or "not run")
    if writer:
        writer.close()
    shutil.rmtree(scratch, ignore_errors=True)
    _write_verification(ctx, results)


def _record_not_run(ctx, writer, results, groups_left, why: str) -> None:
    seen = {(r["objective"], r["dtype"], r["n"], r["d"], r["backend"]) for r in results}
    for g in groups_left:
        for be in g.backends:
            if (g.objective, g.dtype, g.n, g.d, be) in seen:
                continue
            row = {**asdict(g), "backend": be, "status": "not run", "detail": why,
                   "device": str(ctx.device)}  # fmt: skip
            row.pop("backends")
            results.append(row)
            if writer:
                writer.write(row)


def _write_verification(ctx: Context, results: list) -> None:
    """(key, backend, dtype) passes only if every case of it passed (none missing)."""
    verdict: dict = {}
    for r in results:
        backend = VERIFIED_AS.get(r["backend"], r["backend"])  # both Triton paths: "triton"
        k = (r.get("key") or _key_of(r["objective"]), backend, r["dtype"])
        verdict[k] = verdict.get(k, True) and r["status"] == "pass"
    passed = sorted([list(k) for k, ok in verdict.items() if ok])
    failed = sorted([list(k) for k, ok in verdict.items() if not ok])
    ctx.passed = passed if ctx.device.type == "cuda" else []
    counts = {
        s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "error", "not run")
    }
    ctx.log(f"  smoke: {counts}; (objective, backend, dtype) verified: {len(passed)}, "
            f"not: {len(failed)}")  # fmt: skip
    if ctx.out and ctx.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(ctx.device)
        record = {
            "device_class": f"sm_{major}{minor}",
            "device": torch.cuda.get_device_name(ctx.device),
            "date": ctx.stamp,
            "versions": _versions(),
            "command": ctx.args.command,
            "passed": passed,
            "failed": failed,
        }
        ctx.path("verification").with_suffix(".json").write_text(
            json.dumps(record, indent=1) + "\n"
        )


def _key_of(objective: str) -> str:
    from .smoke import OBJECTIVES

    return OBJECTIVES[objective].key


def _versions() -> str:
    return (
        f"flashcontrast {__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_triton_version()}, python {platform.python_version()}"
    )


# ----------------------------------------------------------------------------- (d), (e)

_TIMED_BACKENDS = ("triton", "cuda", "torch")
#: The Triton backend with its pair path forced to the fused kernels: "triton" rows take
#: ``auto``'s choice (the panel path on CUDA at these sizes, by the cost model), these
#: rows the alternative, so one report measures the choice the model made.
TRITON_FUSED = "triton-fused"


def _timing_rows(ctx: Context) -> list:
    """(objective, implementation, N, D) of step (d), most valuable first."""
    sizes = ctx.args.sizes or TIMING_SIZES
    dims = ctx.args.dims or TIMING_DIMS
    backends = list(ctx.args.backends or _TIMED_BACKENDS)
    if "triton" in backends:
        backends.insert(backends.index("triton") + 1, TRITON_FUSED)
    impls = ["matmul", *backends, OPENCLIP, INF_CL]
    return [(obj, impl, n, d) for n in sizes for d in dims for obj in ("clip", "siglip")
            for impl in impls if not (impl == INF_CL and obj != "clip")]  # fmt: skip


def _predicted_call_s(objective: str, impl: str, n: int, d: int) -> float:
    path = {"openclip": "openclip", "inf-cl": "triton", "matmul": "matmul",
            TRITON_FUSED: "triton"}.get(impl, impl)  # fmt: skip
    if impl == "triton" and objective not in _OTHER_FLOPS:
        path = {"fused": "triton", "panel": "panel"}[costmodel.choose_pair_path(n, n, d, 2)]
    if objective in _OTHER_FLOPS:
        flops = _OTHER_FLOPS[objective](n, d)
        eff = costmodel.EFFICIENCY[path if path in costmodel.EFFICIENCY else "torch"][0]
        rate = costmodel.H200.fp32_flops if path == "torch" else costmodel.H200.bf16_flops
        return flops / (rate * eff)
    cost = costmodel.pair_cost("clip" if objective == "clip" else "siglip", path, n, d)
    return costmodel.predict_seconds(cost, path)


def _row_estimate(objective: str, impl: str, n: int, d: int) -> float:
    calls = 1 + TIMING_REPEATS + 1  # warm-up, timed, memory
    return 0.5 + calls * _predicted_call_s(objective, impl, n, d)


def _write_row(ctx: Context, writer: Optional[RowWriter], row: Row, note: str = "") -> None:
    frac = row.tflops * 1e12 / ctx.gemm_flops if (row.tflops and ctx.gemm_flops) else None
    values = {**asdict(row), "tflops": None if row.tflops is None else f"{row.tflops:.4g}",
              "gemm_fraction": None if frac is None else f"{frac:.3f}", "note": note,
              "versions": _versions(), "timestamp": ctx.stamp}  # fmt: skip
    if writer:
        writer.write(values)
    rate = "" if row.tflops is None else f" {row.tflops:8.1f} TFLOP/s"
    rate += "" if frac is None else f" = {frac:.2f} x GEMM"
    ctx.log(
        f"  {row.objective:>12} {row.backend:>10} N={row.n:<6} D={row.d:<5} "
        f"{row.ms_median:9.2f} ms (fwd {row.fwd_ms_median:.2f}){rate} peak {row.peak_mib:.0f} MiB"
    )


def _time_one(ctx, writer, objective: str, impl: str, n: int, d: int, budget_s: float) -> None:
    """One timing row within ``budget_s``: a first call (compile, warm-up) is timed, then
    as many repeats as fit (at most TIMING_REPEATS, at least 2, else skipped)."""
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    if impl == "matmul":
        row = measure_matmul(n, d, ctx.device, 10)
        if row is not None:
            _write_row(ctx, writer, row)
        return
    unavailable = {
        OPENCLIP: openclip_unavailable,
        INF_CL: lambda o: inf_cl_unavailable(o, ctx.device),
    }
    if impl in unavailable and (why := unavailable[impl](objective)) is not None:
        ctx.log(f"  {objective} {impl}: skipped ({why})")
        return
    with _paths.forced_as(impl) as backend:
        _time_call(ctx, writer, objective, impl, backend, n, d, budget_s, dtype)


def _time_call(ctx, writer, objective, impl, backend, n, d, budget_s, dtype) -> None:
    """:func:`_time_one`'s measurement of ``impl`` (run as ``backend``), in the
    environment the row runs in."""
    from .measure import backend_call, make_inputs

    fn = (
        baseline_call(impl, objective)
        if impl in (OPENCLIP, INF_CL)
        else backend_call(objective, backend)
    )
    note, path = "", None
    if backend == "triton" and ctx.device.type == "cuda" and objective in ("clip", "siglip"):
        path = _paths.chosen(_paths.TRITON_PATH)
        if path == "auto":
            from ..backends.triton.pair import auto_path

            path = auto_path(ctx.device, n, n, d, dtype)
        note = f"path {path}; "
    try:
        xs, scale = make_inputs(objective, n, d, dtype, ctx.device)
        t0 = time.perf_counter()
        fn(xs, scale).backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        first = time.perf_counter() - t0
        del xs, scale
        repeats = min(TIMING_REPEATS, int((budget_s - first) / max(first, 1e-3)) - 2)
        if repeats < 2:
            ctx.log(f"  {objective} {impl} N={n} D={d}: skipped (a call took {first:.2f} s; "
                    f"{budget_s:.0f} s left for the row)")  # fmt: skip
            return
        row = measure(objective, impl, n, d, dtype, ctx.device, repeats, 0, fn)
    except Exception as e:
        ctx.log(
            f"  {objective} {impl} N={n} D={d}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        return
    if row is None:
        ctx.log(f"  {objective} {impl} N={n} D={d}: out of memory")
        return
    _write_row(ctx, writer, row, note=f"{note}first call {first:.2f} s")
    if path is not None:
        ctx.path_times.append((objective, n, d, row.dtype, path, row.ms_median))


def write_path_timings(ctx: Context) -> Optional[Path]:
    """``paths-<date>.json``: the shapes timed on both Triton paths (``_measured.py``), for
    ``python -m flashcontrast.bench.record``; None when there is no such shape or no GPU."""
    if not ctx.out or ctx.device.type != "cuda":
        return None
    by_shape: dict = {}
    for objective, n, d, dtype, path, ms in ctx.path_times:
        by_shape.setdefault((objective, n, d, dtype), {})[path] = ms
    timings = [
        dict(objective=o, n=n, d=d, dtype=t, fused_ms=ms["fused"], panel_ms=ms["panel"])
        for (o, n, d, t), ms in by_shape.items()
        if {"fused", "panel"} <= set(ms)
    ]
    if not timings:
        return None
    major, minor = torch.cuda.get_device_capability(ctx.device)
    record = dict(kind="paths", device_class=f"sm_{major}{minor}",
                  device=torch.cuda.get_device_name(ctx.device), date=ctx.stamp,
                  versions=_versions(), command=ctx.args.command, timings=timings)  # fmt: skip
    path = ctx.path("paths").with_suffix(".json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def step_timings(ctx: Context, rows: list, reserve_s: float, writer) -> None:
    for objective, impl, n, d in rows:
        left = ctx.budget.remaining() - reserve_s
        est = _row_estimate(objective, impl, n, d)
        if left <= 1.0:
            ctx.log(f"  {objective} {impl} N={n} D={d}: not run (budget)")
            continue
        _time_one(ctx, writer, objective, impl, n, d, min(left, max(3 * est, 10.0)))


def _other_rows(ctx: Context) -> list:
    impls = ctx.args.backends or _TIMED_BACKENDS
    cases = OTHER_CASES if ctx.device.type == "cuda" else [
        (o, ctx.args.sizes[0] if ctx.args.sizes else 64, ctx.args.dims[0] if ctx.args.dims else 16)
        for o, _, _ in OTHER_CASES
    ]  # fmt: skip
    return [(o, impl, n, d) for o, n, d in cases for impl in impls]


# ----------------------------------------------------------------------------- (f) tests


def step_tests(ctx: Context, budget_s: float) -> None:
    root = Path(__file__).resolve().parents[3]
    if ctx.device.type != "cuda":
        ctx.log("  not run: the suite's GPU tests need a GPU (CI runs the rest)")
        return
    if not (root / "tests").is_dir():
        ctx.log("  not run: no tests/ folder (run from a checkout)")
        return
    if budget_s < 30:
        ctx.log(f"  not run: {budget_s:.0f} s left")
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FLASHCONTRAST_SKIP_EMULATOR"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", "-p", "no:cacheprovider",
           str(root / "tests")]  # fmt: skip
    log_path = ctx.path("tests").with_suffix(".log") if ctx.out else Path(os.devnull)
    with open(log_path, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root,
                                  timeout=budget_s - 5)  # fmt: skip
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    lines = log_path.read_text().strip().splitlines() if ctx.out else []
    ctx.log(f"  pytest -m gpu: exit {code}; {lines[-1] if lines else ''}")


# ----------------------------------------------------------------------------- the plan


def plan(ctx: Context) -> list:
    """The steps with their estimates (an H200 assumed for the GPU numbers)."""
    dry = ctx.args.dry_run
    on_gpu = ctx.device.type == "cuda"
    build_why = "assumed: a bare machine has no _C" if dry else needs_build(ctx.device)
    todo = _smoke_groups(ctx)
    backends = len(todo[0].backends) if todo else 0
    workers = _workers(ctx) if not dry else max(1, min(8, 16 // 2))
    smoke_s = smoke_estimate(len(todo), sum(g.large for g in todo), backends, workers)
    timing = _timing_rows(ctx)
    timing_s = sum(_row_estimate(*r) for r in timing) if on_gpu else 2.0 * len(timing)
    others = _other_rows(ctx)
    others_s = sum(_row_estimate(*r) for r in others) if on_gpu else 2.0 * len(others)
    steps = [
        Step(
            "env",
            "(a) environment, bf16 GEMM rate at 8192^3, copy rate",
            _e("env_s") if on_gpu else 2.0,
            ESTIMATES["env_s"][1] if on_gpu else "CPU: a small GEMM and copy",
        ),
        Step(
            "build",
            "(b) build _C for this device's arch only (sm_90a on Hopper)",
            (_e("build_s") if build_why else 0.0) if on_gpu else 0.0,
            ESTIMATES["build_s"][1] if (on_gpu and build_why) else "nothing to build",
            detail=[f"why: {build_why}"] if build_why else [],
        ),
        Step(
            "smoke",
            f"(c) correctness smoke: {len(todo)} groups x {backends} backends, "
            f"{workers} worker processes",
            smoke_s,
            f"{ESTIMATES['triton_compile_s'][1]}; {_e('compiles_per_group')} compiles per group, "
            f"{_e('small_case_s')} s per small case, {_e('large_case_s')} s per large group, "
            f"{_e('worker_start_s')} s worker start, x1.3 imbalance",
        ),
        Step(
            "timings",
            f"(d) CLIP and SigLIP timings: {len(timing)} rows",
            timing_s,
            "flashcontrast.costmodel on an H200 (each path's assumed efficiency: "
            + "; ".join(f"{k} {v[0]:.0%}" for k, v in costmodel.EFFICIENCY.items())
            + f"), {1 + TIMING_REPEATS + 1} calls per row + 0.5 s setup; rows cut to the budget",
        ),
        Step(
            "others",
            f"(e) other objectives, one size each: {len(others)} rows",
            others_s,
            "the same cost model with each objective's GEMM count",
        ),
        Step(
            "tests",
            "(f) the suite's GPU tests (pytest -m gpu), in what is left",
            _e("tests_s") if on_gpu else 0.0,
            ESTIMATES["tests_s"][1] if on_gpu else "CPU: not run",
        ),
    ]
    return steps


def run(args, device: torch.device) -> int:
    stamp = args.stamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    started = args.started if args.started is not None else time.time()
    budget = Budget(args.budget_s, start=time.monotonic() - (time.time() - started))
    if args.out is None and not args.dry_run:
        args.out = Path("benchmarks/results") / (
            device_slug(device) if device.type == "cuda" else "cpu"
        )
    if args.dry_run:
        args.out = None  # a dry run writes nothing
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = Context(args, device, budget, stamp)
    steps = plan(ctx)
    if args.dry_run:
        for line in ["gpu-report plan (dry run: nothing is run; an H200 is assumed for the "
                     "GPU estimates)", *format_plan(steps, args.budget_s)]:  # fmt: skip
            print(line)
        return 0
    resumed = args.stamp is not None
    if not resumed:
        ctx.log(f"flashcontrast GPU report {stamp}: {args.command}")
        ctx.log(f"versions: {_versions()}")
        for line in format_plan(steps, args.budget_s):
            ctx.log(line)
    est = {s.key: s.estimate_s for s in steps}
    after = {k: sum(est[j] for j in list(est)[i + 1 :]) for i, k in enumerate(est)}
    min_tail = 30.0 if device.type == "cuda" else 0.0  # keep room for the tests
    if not resumed:
        ctx.log(f"\n(a) environment [{budget.elapsed():.0f} s]")
        step_env(ctx)
        ctx.log(f"\n(b) build [{budget.elapsed():.0f} s]")
        if step_build(ctx):
            ctx.log("  restarting the report to load the new _C")
            ctx.log.close()
            argv = [*args.argv, "--stamp", stamp, "--started", str(started)]
            os.execv(sys.executable, [sys.executable, "-m", "flashcontrast.bench", *argv])
    else:
        env_path = ctx.path("env").with_suffix(".json") if ctx.out else None
        if env_path and env_path.exists():
            env = json.loads(env_path.read_text())
            ctx.gemm_flops = env["gemm_tflops"] * 1e12
            ctx.copy_bytes = env["copy_tb_s"] * 1e12
        ctx.log(f"  resumed after the build; _C: {runtime_info()}")
    ctx.log(f"\n(c) correctness smoke [{budget.elapsed():.0f} s]")
    step_smoke(ctx, reserve_s=min(after["smoke"], 0.5 * budget.remaining()))
    writer = RowWriter(ctx.path("bench").with_suffix(".csv"), _COLUMNS) if ctx.out else None
    ctx.log(f"\n(d) CLIP and SigLIP timings [{budget.elapsed():.0f} s]")
    step_timings(ctx, _timing_rows(ctx), reserve_s=est["others"] * 0.5 + min_tail, writer=writer)
    if (paths := write_path_timings(ctx)) is not None:
        ctx.log(f"  both Triton paths timed: python -m flashcontrast.bench.record {paths}")
    ctx.log(f"\n(e) other objectives [{budget.elapsed():.0f} s]")
    step_timings(ctx, _other_rows(ctx), reserve_s=min_tail, writer=writer)
    if writer:
        writer.close()
    ctx.log(f"\n(f) GPU tests [{budget.elapsed():.0f} s]")
    step_tests(ctx, budget.remaining())
    ctx.log(f"\ndone in {budget.elapsed():.0f} s of {args.budget_s:.0f}")
    if ctx.passed and ctx.out:
        ctx.log(f"add the passes to the record: python -m flashcontrast.bench.record "
                f"{ctx.path('verification').with_suffix('.json')}")  # fmt: skip
    ctx.log.close()
    return 0
