"""Build ``flashcontrast._C`` from csrc/ as a CPU emulation (tests only; see README.md here).

The csrc/ sources are copied with two mechanical rewrites (kernel launches and
``__shared__`` arrays, see fc_emu.h), compiled by the host C++ compiler against the CUDA
toolkit's headers (types and runtime declarations only: nothing links libcudart) with
fc_emu.h force-included, and linked with fc_emu.cpp and the unchanged bindings.cpp into a
module that keeps the real module's functions. :func:`load` returns it with
``EMULATES_ON_CPU = True``, which ``flashcontrast.backends.cuda`` needs before it lets CPU
tensors through.

The build is cached by a hash of every input under ``build/cuda_emulator/``.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"

# kernel<<<grid, block, smem, stream>>>(  ->  ::fc_emu::launch(kernel, grid, ...)(
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)
# extern __shared__ __align__(A) T name[];
_DYNAMIC = re.compile(r"extern\s+__shared__\s+__align__\((\d+)\)\s+([\w ]+?)\s+(\w+)\[\];")
# __shared__ [__align__(A)] T name[count];
_STATIC = re.compile(r"__shared__\s+(?:__align__\((\d+)\)\s+)?([\w ]+?)\s+(\w+)\[([^\]]+)\];")


def rewrite(source: str) -> str:
    """The two rewrites fc_emu.h documents; raises if a launch or __shared__ is left over."""
    source = _LAUNCH.sub(lambda m: f"::fc_emu::launch({m[1]}, {m[2]})(", source)
    source = _DYNAMIC.sub(
        lambda m: f"{m[2]}* {m[3]} = ::fc_emu::dynamic_array<{m[2]}>({m[1]});", source
    )
    source = _STATIC.sub(
        lambda m: f"{m[2]}* {m[3]} = ::fc_emu::shared_array<{m[2]}>({m[4]}, {m[1] or 16});",
        source,
    )
    for leftover in ("<<<", "__shared__"):
        if leftover in source:
            line = source[: source.index(leftover)].count("\n") + 1
            raise RuntimeError(f"cuda emulator: unrewritten {leftover!r} at line {line}")
    return source


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), from CUDA_HOME or nvcc."""
    candidates = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            top = re.search(r"#\$ TOP=(\S+)", out.stderr + out.stdout)
            if top:
                candidates.append(top[1])
        except (OSError, subprocess.SubprocessError):
            pass
    for root in filter(None, candidates):
        for sub in ("include", "targets/x86_64-linux/include"):
            inc = Path(root) / sub
            if (inc / "cuda_runtime.h").is_file():
                return inc.resolve()
    return None


def unavailable_reason() -> str | None:
    """None when this machine can build the emulator, else why not."""
    if not sys.platform.startswith("linux"):
        return "the CUDA emulator uses ucontext fibers: Linux only"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++ or $CXX) to build the CUDA emulator"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_runtime.h; set CUDA_HOME) for the CUDA emulator"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (needed to build the CUDA emulator)"
    return None


def _sanitize_flags() -> list[str]:
    """``FC_EMU_SANITIZE=address``: an AddressSanitizer build, which reports any kernel read
    or write outside the tensors torch allocated (run Python with the compiler's libasan in
    LD_PRELOAD and ASAN_OPTIONS=detect_leaks=0; see README.md here)."""
    kind = os.environ.get("FC_EMU_SANITIZE", "")
    if kind not in ("", "address"):
        raise ValueError(f"FC_EMU_SANITIZE must be empty or 'address', got {kind!r}")
    return ["-fsanitize=address", "-fno-omit-frame-pointer"] if kind else []


def _flags(cuda_inc: Path, gen: Path) -> list[str]:
    import pybind11

    return [*_sanitize_flags(),
        "-std=c++17", "-O2", "-fPIC", "-g0", "-Wno-unknown-pragmas", "-fvisibility=hidden",
        "-include", str(HERE / "fc_emu.h"),
        f"-I{CSRC / 'include'}", f"-I{gen}", f"-I{cuda_inc}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
    ]  # fmt: skip


def build(
    out_dir: Path | None = None,
    jobs: int | None = None,
    mutate: Callable[[str, str], str] | None = None,
) -> Path:
    """Compile (or reuse) the emulated module; returns the path of its shared object.

    ``mutate(file_name, source)``, if given, edits each kernel source before the rewrites:
    the emulator's own tests use it to show that a broken kernel fails.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    cuda_inc = cuda_include_dir()
    cxx = os.environ.get("CXX", "g++")
    kernels = {}  # the translation units, then the kernel headers they include (*.cuh)
    for cu in [*sorted((CSRC / "kernels").glob("*.cu")), *sorted((CSRC / "kernels").glob("*.cuh"))]:
        text = cu.read_text()
        kernels[cu] = rewrite(mutate(cu.name, text) if mutate else text)
    others = [*sorted((CSRC / "include").rglob("*.h*")), CSRC / "bindings.cpp"]
    others += [HERE / "fc_emu.h", HERE / "fc_emu.cpp"]
    digest = hashlib.sha256(f"{cxx} {cuda_inc} {sys.version} {_sanitize_flags()}".encode())
    for path, text in kernels.items():
        digest.update(path.name.encode() + text.encode())
    for path in others:
        digest.update(path.name.encode() + path.read_bytes())
    root = (out_dir or REPO / "build" / "cuda_emulator") / digest.hexdigest()[:16]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = root / f"_C{suffix}"
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # one builder at a time (pytest-xdist workers share the build directory): the others
    # wait on the lock, then find the module built
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        return _compile(root, target, suffix, cxx, cuda_inc, kernels, jobs)


def _compile(
    root: Path,
    target: Path,
    suffix: str,
    cxx: str,
    cuda_inc: Path,
    kernels: dict[Path, str],
    jobs: int | None,
) -> Path:
    """Compile the rewritten kernels and the bindings into ``target`` (under the lock)."""

    work = root / "work"
    gen = work / "generated"
    (gen / "flashcontrast").mkdir(parents=True, exist_ok=True)
    (gen / "flashcontrast" / "build_config.h").write_text(
        "#pragma once\n#define FLASHCONTRAST_COMPILED_ARCHS 0\n"  # 0: the emulator
    )
    units = []
    for cu, text in kernels.items():
        if cu.suffix == ".cuh":  # included by name from the units beside it
            (work / cu.name).write_text(f'#line 1 "{cu}"\n' + text)
            continue
        dst = work / (cu.stem + ".cpp")
        dst.write_text(f'#line 1 "{cu}"\n' + text)
        units.append(dst)
    units += [CSRC / "bindings.cpp", HERE / "fc_emu.cpp"]
    flags = _flags(cuda_inc, gen)

    def compile_one(src: Path) -> Path:
        obj = work / (src.stem + ".o")
        cmd = [cxx, *flags, "-c", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuda emulator: compiling {src.name} failed:\n{proc.stderr}")
        return obj

    jobs = jobs or max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_one, units))
    tmp = root / f"_C.tmp{suffix}"
    proc = subprocess.run(
        [cxx, "-shared", *_sanitize_flags(), "-o", str(tmp), *map(str, objects)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cuda emulator: linking failed:\n{proc.stderr}")
    tmp.replace(target)  # atomic: a concurrent build never sees a half-written module
    return target


def load(path: Path | None = None) -> ModuleType:
    """Import the emulated ``_C`` (building it first if needed)."""
    path = path or build()
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.EMULATES_ON_CPU = True
    return module


if __name__ == "__main__":
    print(build())
