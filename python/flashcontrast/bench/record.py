"""``python -m flashcontrast.bench.record FILE...``: add GPU reports to the records.

Each FILE is written by ``python -m flashcontrast.bench --gpu-report``:

* ``verification-<date>.json``: the device class, device, date, versions, and the
  (objective, backend, dtype) triples whose every smoke case passed. They are merged into
  ``flashcontrast/verified_gpu.json`` (in a checkout: the file to commit), which
  ``backend="auto"`` reads (``flashcontrast._verified``). A triple that a later report
  fails is removed from that device class's passes: the newest evidence wins.
* ``paths-<date>.json`` (``"kind": "paths"``): shapes timed on both Triton pair paths,
  merged into ``flashcontrast/measured_paths.json``, which the Triton backend's ``auto``
  reads (``flashcontrast._measured``) instead of the cost model. A later report's row for
  the same (device class, objective, N, D, dtype) replaces the earlier one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .._measured import RECORD as PATHS_RECORD
from .._verified import RECORD


def merge(report: dict, record: dict) -> dict:
    """``record`` with ``report``'s passes added and its failures removed, for its class."""
    cls = report["device_class"]
    records = [r for r in record.get("records", [])]
    failed = {tuple(x) for x in report.get("failed", [])}
    for r in records:
        if r["device_class"] == cls:
            r["passed"] = [p for p in r["passed"] if tuple(p) not in failed]
    entry = {
        k: report[k]
        for k in ("device_class", "device", "date", "versions", "command")
        if k in report
    }
    entry["passed"] = sorted(report.get("passed", []))
    if entry["passed"]:
        records.append(entry)
    records = [r for r in records if r["passed"]]
    return {**record, "records": records}


def merge_paths(report: dict, record: dict) -> dict:
    """``record`` (measured_paths.json) with ``report``'s timings: one record per device
    class, a shape measured again replaced by the newer row."""
    cls = report["device_class"]
    key = ("objective", "n", "d", "dtype")
    records = [dict(r) for r in record.get("records", [])]
    mine = next((r for r in records if r["device_class"] == cls), None)
    if mine is None:
        mine = {"device_class": cls, "timings": []}
        records.append(mine)
    mine.update({k: report[k] for k in ("device", "date", "versions", "command") if k in report})
    new = {tuple(t[k] for k in key): t for t in report.get("timings", [])}
    kept = [t for t in mine.get("timings", []) if tuple(t[k] for k in key) not in new]
    mine["timings"] = sorted(kept + list(new.values()), key=lambda t: tuple(t[k] for k in key))
    return {**record, "records": records}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashcontrast.bench.record", description=__doc__)
    p.add_argument("reports", type=Path, nargs="+", help="verification-<date>.json files")
    p.add_argument("--record", type=Path, default=RECORD, help=f"default: {RECORD.name}")
    p.add_argument(
        "--paths-record", type=Path, default=PATHS_RECORD, help=f"default: {PATHS_RECORD.name}"
    )
    args = p.parse_args(argv)
    records = {}
    for path in args.reports:
        report = json.loads(path.read_text())
        paths = report.get("kind") == "paths"
        target = args.paths_record if paths else args.record
        if target not in records:
            records[target] = json.loads(target.read_text()) if target.exists() else {"records": []}
        if paths:
            records[target] = merge_paths(report, records[target])
            print(f"{path}: {len(report['timings'])} shapes on both Triton paths, "
                  f"{report['device_class']}")  # fmt: skip
        else:
            records[target] = merge(report, records[target])
            print(
                f"{path}: {len(report.get('passed', []))} passed, "
                f"{len(report.get('failed', []))} failed on {report['device_class']}"
            )
    for target, record in records.items():
        target.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
