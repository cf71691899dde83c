"""What every benchmark leaves behind: its tables on stdout and one results file, NAME.json, holding the command as
run, the machine, the torch version, the UTC date and time, and the numbers.

Results go to bench/results/NAME.json unless `--out` names a file (`*.json`) or a folder (NAME.json inside it,
e.g. `--out "$OUT"` on a GPU machine). A file is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_KEYS = ("benchmark", "command", "machine", "torch", "date")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """The `--out PATH` option every benchmark takes (`--json` is the same option)."""
    parser.add_argument(
        "--out",
        "--json",
        dest="out",
        default=None,
        metavar="PATH",
        help="results file (*.json) or folder for NAME.json (default: bench/results/)",
    )


def results_path(name: str, out: str | Path | None = None) -> Path:
    """Where NAME's results go: `out` itself if it names a .json file, NAME.json inside `out` if it names a folder
    (existing or not), bench/results/NAME.json without `out`."""
    if out is None:
        return RESULTS_DIR / f"{name}.json"
    path = Path(out)
    if path.suffix == ".json" and not path.is_dir():
        return path
    return path / f"{name}.json"


def machine() -> dict[str, Any]:
    """The machine a result was measured on: platform, processor, CPU count, load, torch threads, GPUs if any."""
    import torch  # imported here: spawned preprocessing workers re-import the benchmark modules, cheaply

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "gpu_count": 0,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def write_results(name: str, numbers: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write NAME's results (see the module docstring) and say where; returns the path. `numbers` are the
    benchmark's own keys, stored next to the record's (which they must not reuse)."""
    import torch

    clash = sorted(set(numbers) & set(RECORD_KEYS))
    if clash:
        raise ValueError(f"{name}: result keys {clash} are reserved for the record itself")
    record = {
        "benchmark": name,
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **numbers,
    }
    path = results_path(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed over it: an interrupted run never leaves half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)
    print(f"results: {path}")
    return path


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A titled markdown table on stdout, followed by a blank line."""
    print(f"{title}\n\n{markdown_table(headers, rows)}\n", flush=True)
