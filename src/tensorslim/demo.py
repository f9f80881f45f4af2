"""The built-in demo: compress a digits CNN at several budgets with both allocators and measure."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
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


def run_demo(
    out_dir: str | Path = "tensorslim-demo",
    keeps: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1),
    finetune_epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    latency_batch: int = 256,
) -> tuple[list[DemoRow], Path]:
    """Train (cached) `digits-cnn`, compress it at each keep with the uniform and global allocators,
    evaluate test accuracy (before / after a short fine-tune) and CPU latency on a batch of
    `latency_batch`; write results.json and accuracy_vs_keep.png to `out_dir`."""
    torch.manual_seed(seed)
    entry = zoo.get("digits-cnn")
    dense = entry.pretrained(seed=seed, progress=progress)
    data = entry.data()
    x_lat = data.x_test[:latency_batch]
    _, dense_plan = compress(dense, 1.0, example_input=data.x_test[:1])
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
    from tensorslim._progress import track

    for allocator, keep in track(jobs, "Compressing", progress, total=len(jobs)):
        small, plan = compress(dense, keep, allocator=allocator, example_input=data.x_test[:1])
        acc = accuracy(small, data.x_test, data.y_test)
        # dense and compressed timed alternately, so background load affects both alike
        dense_lat, lat = (t.median_ms for t in compare_models([dense, small], x_lat))
        dense_lats.append(dense_lat)
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
            )
        )
    rows[0].latency_ms = (
        min(dense_lats) if dense_lats else compare_models([dense], x_lat)[0].median_ms
    )
    out = Path(out_dir)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows[1:]:
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
    }
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    atomic_write_file(out / "results.json", lambda p: p.write_text(json.dumps(payload, indent=2)))
    return rows, plot


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
            }
        )
    return out
