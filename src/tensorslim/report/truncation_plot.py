"""Plot of a truncation study: accuracy vs kernel-norm loss, per layer and cut, and recovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorslim.report.plots import _pyplot, save_figure


def plot_truncation(study: Any, path: str | Path, title: str = "Truncation along cuts") -> Path:
    """Left: accuracy vs norm loss 1 - ||K~||/||K||, one colour per layer ("all" in black), one
    marker per cut. Right (if the study has a recovery curve): accuracy per retraining epoch."""
    plt = _pyplot()
    has_recovery = bool(study.recovery)
    fig, axes = plt.subplots(1, 2 if has_recovery else 1, figsize=(11 if has_recovery else 7, 4.5))
    ax = axes[0] if has_recovery else axes
    layers = list(dict.fromkeys(r.layer for r in study.rows))
    cuts = list(dict.fromkeys(r.cut for r in study.rows))
    markers = "os^vD<>Px*"
    cmap = plt.get_cmap("tab10")
    for li, layer in enumerate(layers):
        for ci, cut in enumerate(cuts):
            pts = [r for r in study.rows if r.layer == layer and r.cut == cut]
            if not pts:
                continue
            ax.scatter(
                [r.norm_loss for r in pts],
                [r.accuracy for r in pts],
                color="black" if layer == "all" else cmap(li % 10),
                marker=markers[ci % len(markers)],
                s=22,
                alpha=0.8,
                label=None,
            )
    for li, layer in enumerate(layers):
        ax.scatter([], [], color="black" if layer == "all" else cmap(li % 10), label=layer)
    for ci, cut in enumerate(cuts):
        ax.scatter([], [], color="gray", marker=markers[ci % len(markers)], label=cut)
    ax.axhline(study.dense_accuracy, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("kernel norm loss 1 - ||K~|| / ||K||")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    if has_recovery:
        rx = axes[1]
        rec = study.recovery
        rx.plot([r["epoch"] for r in rec], [r["accuracy"] for r in rec], marker="o")
        rx.axhline(study.dense_accuracy, color="gray", linestyle="--", linewidth=1, label="dense")
        rx.set_xlabel("retraining epoch")
        rx.set_ylabel("test accuracy")
        rx.set_title(f"Recovery: all layers, {rec[0]['cut']} {rec[0]['level']}")
        rx.grid(alpha=0.3)
        rx.legend(fontsize=7)
    return save_figure(fig, path)
