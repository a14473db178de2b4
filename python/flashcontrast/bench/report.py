"""The benchmark's output: the printed table, and the CSV and Markdown files it writes.

Every file is headed by what makes a number reproducible: the date, the versions of
flashcontrast, torch, triton and CUDA, the device, and the command that produced it.
"""

from __future__ import annotations

import csv
import datetime
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from .._cuda_ext import runtime_info
from .measure import Row

_COLUMNS = (
    f"{'implementation':>18} {'N':>7} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
    f"{'p20-p80 ms':>19} {'peak MiB':>10}"
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or the CPU model, with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_name()}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or broken: the header says so
        return "not installed"


@dataclass
class Report:
    """Rows and notes of one benchmark run, printed as they come and written at the end."""

    device: torch.device
    command: str
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    started: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )

    def versions(self) -> str:
        info = runtime_info()
        cuda = info.get("cuda_runtime", "no _C") if info.get("has_c") else "no _C"
        return (
            f"flashcontrast {__version__}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), triton {_triton_version()}, _C CUDA runtime {cuda}, "
            f"python {platform.python_version()}"
        )

    def header(self) -> list[str]:
        return [
            f"date: {self.started}",
            f"device: {self.device} ({device_name(self.device)})",
            f"versions: {self.versions()}",
            f"command: {self.command}",
        ]

    def print_header(self) -> None:
        for line in self.header():
            print(line, flush=True)

    def section(self, title: str) -> None:
        self.lines += [
            "",
            title,
            _COLUMNS + (f" {'TFLOP/s':>8} {'x matmul':>8}" if self.device.type == "cuda" else ""),
        ]
        for line in self.lines[-3:]:
            print(line, flush=True)

    def note(self, text: str) -> None:
        self.lines.append(f"  ({text})")
        print(self.lines[-1], flush=True)

    def _matmul_tflops(self, row: Row) -> Optional[float]:
        for r in self.rows:
            if r.backend == "matmul-bf16" and (r.n, r.d) == (row.n, row.d):
                return r.tflops
        return None

    def add(self, row: Optional[Row]) -> None:
        if row is None:
            return
        self.rows.append(row)
        bwd = "-" if row.bwd_ms_median is None else f"{row.bwd_ms_median:.2f}"
        line = (
            f"{row.backend:>18} {row.n:>7} {row.fwd_ms_median:>9.2f} {bwd:>9} "
            f"{row.ms_median:>9.2f} {row.ms_p20:>9.2f}-{row.ms_p80:<9.2f} {row.peak_mib:>10.1f}"
        )
        if self.device.type == "cuda" and row.tflops is not None:
            ref = self._matmul_tflops(row)
            ratio = f"{row.tflops / ref:>8.2f}" if ref else f"{'-':>8}"
            line += f" {row.tflops:>8.1f} {ratio}"
        self.lines.append(line)
        print(line, flush=True)

    def write(self, folder: Path) -> list[Path]:
        """Write <folder>/bench-<date>T<hhmm>.csv and .md; return their paths (CSV first)."""
        folder.mkdir(parents=True, exist_ok=True)
        stamp = self.started[:16].replace(":", "")  # 2026-11-25T1805: one file per run
        stem = folder / f"bench-{stamp}"
        csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*(x.name for x in fields(Row)), "tflops", "versions", "timestamp"])
            versions = self.versions()
            for row in self.rows:
                tflops = "" if row.tflops is None else f"{row.tflops:.4g}"  # CPU rates are tiny
                values = ["" if v is None else v for v in asdict(row).values()]
                writer.writerow([*values, tflops, versions, self.started])
        text = ["# flashcontrast benchmark", "", *[f"- {h}" for h in self.header()]]
        text += [
            "- time: forward, backward (.backward() of that loss) and their total, median "
            "(total also p20-p80) over the repeats; peak: memory "
            "allocated beyond the inputs; TFLOP/s (CLIP) counts 8 N^2 D per forward+backward; "
            "'x matmul': that rate over a plain bf16 torch matmul of the same N and D",
            "",
            "```",
            *self.lines,
            "```",
            "",
        ]
        md_path.write_text("\n".join(text))
        return [csv_path, md_path]
