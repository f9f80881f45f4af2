"""Matplotlib figures written to PNG files (Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it as PNG to `path` (creating the folder) and close it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_keep(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    dense_accuracy: float | None = None,
    title: str = "Accuracy vs keep",
    ylabel: str = "test accuracy",
) -> Path:
    """One line per series of (keep, accuracy) points; a dashed line at the dense accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("keep (fraction of compressible parameters remaining)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Normalized singular values (s_i / s_1) per layer on a log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        if len(s) and s[0] > 0:
            ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1")
    ax.set_title("Singular value spectra")
    ax.grid(alpha=0.3)
    if len(spectra) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
