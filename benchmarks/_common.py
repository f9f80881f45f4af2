"""Shared helpers for benchmarks: machine/version info and writing results/<name>.md and .json.

Every benchmark is one script run as `.venv/bin/python benchmarks/<name>.py`; it compares against
baselines measured in the same run and calls `write_results` once at the end.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import contextlib

import torch  # noqa: E402

from tensorslim.io import atomic_write_file  # noqa: E402
from tensorslim.report.tables import markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, OS and versions of the packages that matter for timings."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("tensorslim", "torch", "numpy", "tensorly", "onnxruntime", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def write_results(
    name: str,
    tables: dict[str, Sequence[dict[str, Any]]],
    *,
    command: str,
    seeds: dict[str, Any] | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write results/<name>.md (Markdown tables) and results/<name>.json (rows + metadata)."""
    info = machine_info()
    payload = {
        "name": name,
        "command": command,
        "machine": info,
        "seeds": seeds or {},
        "tables": {k: list(v) for k, v in tables.items()},
        **(extra or {}),
    }
    md = [f"# Benchmark `{name}`\n", f"Command: `{command}`\n"]
    md.append(
        f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"{info['platform']}, Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; run {info['date_utc']} UTC. Seeds: {json.dumps(seeds or {})}\n"
    )
    if notes:
        md.append(notes.strip() + "\n")
    for title, rows in tables.items():
        md.append(f"## {title}\n")
        md.append(markdown_table(list(rows)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    md_path = atomic_write_file(RESULTS / f"{name}.md", lambda p: p.write_text("\n".join(md)))
    json_path = atomic_write_file(
        RESULTS / f"{name}.json", lambda p: p.write_text(json.dumps(payload, indent=2, default=str))
    )
    return md_path, json_path
