"""Build script: setuptools drives CMake (+ ninja) to build ``flashcontrast._C`` from csrc/.

It never imports torch. Environment variables:
  FLASHCONTRAST_SKIP_CUDA_BUILD=1  install the pure-Python package, without ``_C``.
  FLASHCONTRAST_CUDA_ARCHS="80;90" compute capabilities to build; default 80;86;89;90, plus
                                   100 and 120 where nvcc supports them. Machine code for
                                   each, PTX for the newest. Entries with a suffix
                                   ("90a-real") are passed to CMake unchanged.
  MAX_JOBS=N                       parallel build jobs (default: all cores).
  CUDACXX, CUDA_HOME, CUDA_PATH    where nvcc is looked for, in that order, then PATH and
                                   /usr/local/cuda/bin.
  CMAKE_ARGS                       extra arguments for the CMake configure step.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = ["80", "86", "89", "90"]
NEWER_ARCHS = ["100", "120"]  # added when the installed nvcc knows them


def say(msg: str) -> None:
    print(f"flashcontrast setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    """Path of nvcc: CUDACXX, CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda; else None."""
    candidates = [os.environ.get("CUDACXX")]
    candidates += [
        os.path.join(os.environ[v], "bin", "nvcc")
        for v in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(v)
    ]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_archs(nvcc: str) -> str:
    """CMAKE_CUDA_ARCHITECTURES: "80-real;...;90-real;120" (SASS for each, PTX for the newest)."""
    requested = os.environ.get("FLASHCONTRAST_CUDA_ARCHS", "").replace(",", ";")
    archs = [a.strip() for a in requested.split(";") if a.strip()]
    if any("-" in a for a in archs):
        return ";".join(archs)  # explicit CMake syntax: trust the user
    if not archs:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
        known = set(re.findall(r"compute_(\d+)", out))
        archs = DEFAULT_ARCHS + [a for a in NEWER_ARCHS if a in known]
    archs = sorted(set(archs), key=lambda a: int(re.match(r"\d+", a).group()))
    return ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])


class CMakeExtension(Extension):
    def __init__(self, name: str, nvcc: str):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement; imported here so `setup.py --version` works

        out = Path(self.get_ext_fullpath(ext.name)).resolve()  # editable: python/flashcontrast/
        archs = cuda_archs(ext.nvcc)
        cmake = shutil.which("cmake") or "cmake"
        config = [
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_CUDA_RUNTIME_LIBRARY=Static",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        if shutil.which("ninja"):
            config.insert(0, "-GNinja")
        # A cache made in another (isolated, since deleted) build environment points at
        # tools that no longer exist: start from an empty directory whenever anything differs.
        build_dir = Path(self.build_temp).resolve() / "cmake"
        key = hashlib.sha256("\n".join([cmake, str(ROOT), *config]).encode()).hexdigest()
        stamp = build_dir / "flashcontrast-config.sha256"
        if not stamp.is_file() or stamp.read_text() != key:
            shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        say(f"building flashcontrast._C with {ext.nvcc} for CUDA archs {archs}, {jobs} jobs")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *config], check=True)
        stamp.write_text(key)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        if not out.is_file():
            raise RuntimeError(f"CMake did not produce {out}")


def extensions():
    if os.environ.get("FLASHCONTRAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        why = "FLASHCONTRAST_SKIP_CUDA_BUILD is set"
    elif (nvcc := find_nvcc()) is None:
        why = "no nvcc in $CUDACXX, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH or /usr/local/cuda/bin"
    else:
        return [CMakeExtension("flashcontrast._C", nvcc)]
    say(f"NOT building the CUDA extension flashcontrast._C: {why}; pure-Python install")
    return []


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
