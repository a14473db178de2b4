"""``python -m flashcontrast.bench.record FILE...``: add GPU reports' passes to the record.

Each FILE is a ``verification-<date>.json`` written by ``python -m flashcontrast.bench
--gpu-report``: the device class, device, date, versions, and the (objective, backend,
dtype) triples whose every smoke case passed. They are merged into
``flashcontrast/verified_gpu.json`` (in a checkout: the file to commit), which
``backend="auto"`` reads (``flashcontrast._verified``). A triple that a later report
fails is removed from that device class's passes: the newest evidence wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

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


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashcontrast.bench.record", description=__doc__)
    p.add_argument("reports", type=Path, nargs="+", help="verification-<date>.json files")
    p.add_argument("--record", type=Path, default=RECORD, help=f"default: {RECORD.name}")
    args = p.parse_args(argv)
    record = json.loads(args.record.read_text()) if args.record.exists() else {"records": []}
    for path in args.reports:
        report = json.loads(path.read_text())
        record = merge(report, record)
        print(
            f"{path}: {len(report.get('passed', []))} passed, "
            f"{len(report.get('failed', []))} failed on {report['device_class']}"
        )
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
