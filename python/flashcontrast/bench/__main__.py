"""``python -m flashcontrast.bench``: CLIP InfoNCE forward+backward, reference vs backends.

On a GPU: every available backend at N from 4096 up; on the CPU: small N, the reference
and the torch backend (the Triton interpreter is a test tool, not a contender). Prints a
table of median time (with p20-p80) and peak memory beyond the inputs.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from .. import __version__
from .._dispatch import backend_for
from .clip import measure

GPU_SIZES = [4096, 8192, 16384, 32768, 65536]
CPU_SIZES = [256, 1024, 4096]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_backends(device: torch.device) -> list[str]:
    names = ["reference"]
    for name in ("torch", "triton", "cuda"):
        if device.type == "cpu" and name == "triton":
            continue
        try:
            backend_for("clip", device, name)
        except RuntimeError:
            continue
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashcontrast.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes N")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension D")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--backends", nargs="+", help="subset of backends to run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the smallest sizes only")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    if args.quick:
        sizes = sizes[:2]
    d = args.dim or (512 if on_gpu else 256)
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    backends = args.backends or _available_backends(device)
    name = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    print(
        f"flashcontrast {__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}, device {device} ({name}), "
        f"{torch.get_num_threads()} threads"
    )
    print(f"CLIP InfoNCE forward+backward, D={d}, {dtype}, median of {args.repeats}")
    header = f"{'backend':>10} {'N':>7} {'ms':>10} {'p20-p80 ms':>17} {'peak MiB':>10}"
    if on_gpu:
        header += f" {'TFLOP/s':>8}"
    print(header)
    for n in sizes:
        for backend in backends:
            row = measure(backend, n, d, dtype, device, args.repeats)
            if row is None:
                print(f"{backend:>10} {n:>7} {'out of memory':>10}")
                continue
            line = (
                f"{backend:>10} {n:>7} {row.ms_median:>10.2f} "
                f"{row.ms_p20:>8.2f}-{row.ms_p80:<8.2f} {row.peak_mib:>10.1f}"
            )
            if on_gpu:
                line += f" {row.tflops:>8.1f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
