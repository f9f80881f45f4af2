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


# -- configuration sweeps (tensorslim.study.sweep) ------------------------------------------------
def add_sweep_args(ap: Any, *, what: str = "configurations") -> None:
    """--workers / --ray / --ray-address / --fresh / --resume on an argparse parser.

    Workers default to 1 (trials run in this process, one after another): these benchmarks time
    things, and parallel trials on a shared 2-core machine would inflate every timing column."""
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help=f"{what} measured at once (default 1, in this process: timing columns stay "
        "comparable); N > 1 runs them in N spawned processes",
    )
    ap.add_argument("--ray", action="store_true", help="run the trials as Ray tasks (local Ray)")
    ap.add_argument("--ray-address", default=None, help="address of a running Ray cluster")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="forget the trials already measured (of the selected configurations) and measure "
        "them again; by default a rerun resumes where the last run stopped",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="accepted for compatibility: every run resumes from its trials file (see --fresh)",
    )


def trials_path(name: str) -> Path:
    """The resumable JSON Lines trials file of benchmark `name` (in the zoo cache, not results/:
    the committed .md/.json stay the deliverable)."""
    from tensorslim.zoo import cache_dir

    return cache_dir() / "benchmark_trials" / f"{name}.trials.jsonl"


def forget_trials(path: Path, trials: Sequence[dict[str, Any]] | None = None) -> int:
    """Drop the records of `trials` (all records if None) from the trials file `path` (atomic
    rewrite; not while a sweep writes it); the number dropped."""
    from tensorslim.study.sweep import read_results, trial_key

    if not path.exists():
        return 0
    found = read_results(path)
    drop = set(found.records) if trials is None else {trial_key(t) for t in trials}
    keep = [r for k, r in found.records.items() if k not in drop]
    atomic_write_file(path, lambda p: p.write_bytes(b"".join(r.line() for r in keep)))
    return len(found.records) - len(keep)


def run_trials(
    fn: Any,
    trials: Sequence[dict[str, Any]],
    path: Path,
    args: Any,
    *,
    threads: int = 1,
    description: str = "Trials",
) -> Any:
    """tensorslim.study.sweep.run_sweep(fn, trials, path) with the executor the command line asked
    for: `--ray` / `--ray-address` (Ray tasks), `--workers N > 1` (spawned processes), else serial
    in this process (so the benchmark's per-process caches are shared with its main()).

    fn is a module-level function of the benchmark script; Ray gets it as "script:function"
    with benchmarks/ and src/ on the workers' PYTHONPATH (a remote cluster needs both there)."""
    from tensorslim.study.sweep import run_sweep

    if not trials:
        return run_sweep(fn, [], path, executor="serial", workers=1)
    if args.ray or args.ray_address:
        executor = "ray"
        module = sys.modules[fn.__module__]
        fn = f"{Path(module.__file__).stem}:{fn.__name__}"
        here = Path(__file__).resolve().parent
        extra = [str(here), str(here.parent / "src")]
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(extra + ([old] if old else []))
    else:
        executor = "process" if args.workers > 1 else "serial"
    return run_sweep(
        fn,
        list(trials),
        path,
        executor=executor,
        workers=args.workers,
        threads=threads,
        ray_address=args.ray_address,
        progress=sys.stderr.isatty(),
        description=description,
    )


def sweep_note(path: Path, ran: int, reused: int, args: Any) -> str:
    """A sentence for the results notes: where the trials are and how many this run reused."""
    how = (
        "Ray tasks" if (args.ray or args.ray_address)
        else f"{args.workers} worker processes" if args.workers > 1 else "one process, serially"
    )
    return (
        f"Trials ({how}) are kept in {path.name} in the trials cache; {ran} measured in this run, "
        f"{reused} reused from an earlier (interrupted) run of the same configuration (their "
        "timings are from that run; `--fresh` measures everything again). "
    )


def garipov_name(choice: str | None, seed: int = 0) -> str:
    """The zoo GaripovNet a benchmark compresses: `choice` if given, else `garipov-sgd` (the
    paper's SGD recipe on the 55k split) when its weights for `seed` are cached, else
    `garipov-fashion` (2 epochs on 15k images). Never trains garipov-sgd by itself."""
    from tensorslim import zoo

    if choice:
        return choice
    cached = zoo.cache_dir() / f"garipov-sgd-seed{seed}-v{zoo.CACHE_VERSION}.safetensors"
    return "garipov-sgd" if "garipov-sgd" in zoo.ZOO and cached.is_file() else "garipov-fashion"
