"""The built-in demo: compress a digits CNN at several budgets with both allocators and measure.

Speed is measured on the whole model: the dense model as trained, the dense model with the
inference levers (speed.levers: channels_last, BatchNorm folding, merged 1x1 stages, each kept
only where it measures faster) and the compressed model with its own levers, timed alternately
in one run. Both ratios are printed, so the part of the speedup the layout alone would give the
dense model is not credited to the compression."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import tensorslim.zoo as zoo
from tensorslim.api import compress
from tensorslim.core.discover import count_params
from tensorslim.io import atomic_write_file
from tensorslim.plan.render import human
from tensorslim.report import plot_accuracy_vs_keep
from tensorslim.search.timing import compare_models
from tensorslim.train import accuracy, fit


@dataclass
class DemoRow:
    allocator: str
    keep: float
    achieved_keep: float
    params: int
    flops: int
    accuracy: float
    accuracy_finetuned: float | None
    latency_ms: float
    speedup: float
    # dense-with-levers ms / this row's ms (the compression's own share of the speedup)
    speedup_vs_levered_dense: float | None = None
    levers: list[str] = field(default_factory=list)


def run_demo(
    out_dir: str | Path = "tensorslim-demo",
    keeps: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1),
    finetune_epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    latency_batch: int = 256,
    cost: str = "flops",
    levers: bool = True,
) -> tuple[list[DemoRow], Path]:
    """Train (cached) `digits-cnn`, compress it at each keep (of its `cost`: "flops" by default,
    so the budget goes where the time is, the convolutions) with the uniform and global
    allocators, evaluate test accuracy (before / after a short fine-tune) and whole-model CPU
    latency on a batch of `latency_batch` (dense, dense with levers and compressed with levers
    timed alternately); write results.json and accuracy_vs_keep.png to `out_dir`."""
    torch.manual_seed(seed)
    entry = zoo.get("digits-cnn")
    dense = entry.pretrained(seed=seed, progress=progress)
    data = entry.data()
    x_lat = data.x_test[:latency_batch]
    _, dense_plan = compress(dense, 1.0, example_input=data.x_test[:1])
    dense_fast, dense_levers = _with_levers(dense, x_lat, levers)
    rows = [
        DemoRow(
            "dense",
            1.0,
            1.0,
            count_params(dense),
            dense_plan.model_flops_before,
            accuracy(dense, data.x_test, data.y_test),
            None,
            0.0,  # filled in below from the side-by-side timings
            1.0,
        )
    ]
    jobs = [(a, k) for k in keeps for a in ("uniform", "global")]
    dense_lats: list[float] = []
    levered_lats: list[float] = []
    from tensorslim._progress import track

    for allocator, keep in track(jobs, "Compressing", progress, total=len(jobs)):
        small, plan = compress(
            dense, keep, cost=cost, allocator=allocator, example_input=data.x_test[:1]
        )
        acc = accuracy(small, data.x_test, data.y_test)
        fast, kept = _with_levers(small, x_lat, levers)
        # dense, dense with levers and compressed timed alternately: load affects all alike
        dense_lat, levered_lat, lat = (
            t.median_ms for t in compare_models([dense, dense_fast, fast], x_lat)
        )
        dense_lats.append(dense_lat)
        levered_lats.append(levered_lat)
        acc_ft = None
        if finetune_epochs > 0:
            tuned = copy.deepcopy(small)
            fit(tuned, data.x_train, data.y_train, epochs=finetune_epochs, lr=1e-3, seed=seed)
            acc_ft = accuracy(tuned, data.x_test, data.y_test)
        rows.append(
            DemoRow(
                allocator,
                keep,
                plan.achieved_keep,
                plan.model_params_after,
                plan.model_flops_after,
                acc,
                acc_ft,
                lat,
                dense_lat / lat,
                levered_lat / lat,
                kept,
            )
        )
    rows[0].latency_ms = (
        min(dense_lats) if dense_lats else compare_models([dense], x_lat)[0].median_ms
    )
    if levers and levered_lats:
        levered = min(levered_lats)
        rows.insert(1, DemoRow(
            "dense+levers", 1.0, 1.0, rows[0].params, rows[0].flops,
            accuracy(dense_fast, data.x_test, data.y_test), None,
            levered, rows[0].latency_ms / levered, 1.0, dense_levers,
        ))  # fmt: skip
    out = Path(out_dir)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.allocator not in ("uniform", "global"):
            continue
        series.setdefault(f"{r.allocator} (no fine-tune)", []).append((r.keep, r.accuracy))
        if r.accuracy_finetuned is not None:
            series.setdefault(f"{r.allocator} + {finetune_epochs}-epoch fine-tune", []).append(
                (r.keep, r.accuracy_finetuned)
            )
    plot = plot_accuracy_vs_keep(
        series,
        out / "accuracy_vs_keep.png",
        dense_accuracy=rows[0].accuracy,
        title="digits-cnn: test accuracy vs keep (SVD)",
    )
    meta: dict[str, Any] = {
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cost": cost,
        "latency_batch": list(x_lat.shape),
        "timing": "whole model, median of blocked runs, best of 3 rounds; dense, dense with "
        "levers and compressed with levers timed alternately",
    }
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    atomic_write_file(out / "results.json", lambda p: p.write_text(json.dumps(payload, indent=2)))
    return rows, plot


def _with_levers(model: torch.nn.Module, x: torch.Tensor, on: bool) -> tuple[Any, list[str]]:
    """`model` with the inference levers that measure faster on `x` (names of those kept)."""
    if not on:
        return model, []
    from tensorslim.speed.levers import apply_levers

    fast, decisions = apply_levers(model, x, check_dense=False)
    return fast, [d.name for d in decisions if d.kept]


def rows_for_display(rows: list[DemoRow]) -> list[dict[str, Any]]:
    """Rows with human units, for the printed table."""
    dense = rows[0]
    out = []
    for r in rows:
        out.append(
            {
                "allocator": r.allocator,
                "keep": f"{r.keep:.2f}",
                "achieved": f"{r.achieved_keep:.3f}",
                "params": human(r.params),
                "ratio": f"{dense.params / r.params:.2f}×",
                "FLOPs": human(r.flops),
                "accuracy": f"{100 * r.accuracy:.2f}%",
                "acc +ft": "-"
                if r.accuracy_finetuned is None
                else f"{100 * r.accuracy_finetuned:.2f}%",
                "latency ms": f"{r.latency_ms:.2f}",
                "speedup": f"{r.speedup:.2f}×",
                "vs dense+levers": "-"
                if r.speedup_vs_levered_dense is None
                else f"{r.speedup_vs_levered_dense:.2f}×",
                "levers": ", ".join(r.levers) or "-",
            }
        )
    return out
