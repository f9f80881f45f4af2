"""Outputs of the error-proxy study (study.errors): the τ table as Markdown, scatter plots of each
proxy against the accuracy drop, and atomic JSON / text writes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROXY_NAMES = {
    "weights_relative": "relative weights",
    "features_relative": "relative features",
    "weights_scaled": "scaled weights",
    "features_scaled": "scaled features",
    "weights_absolute": "absolute weights",
    "features_absolute": "absolute features",
    "fisher_weighted": "Fisher-weighted weights (extra)",
    "output_calibration": "relative output, calibration (extra)",
    "svd_risk": "SVD risk at same keep (extra)",
}
GROUPING_NAMES = {"all": "all trials", "layers": "across layers", "methods": "across methods"}


def write_json(path: Path, value: Any) -> Path:
    """`value` as indented JSON at `path`, written atomically."""
    from tensorslim.io import atomic_write_file

    text = json.dumps(value, indent=1, sort_keys=False)
    return atomic_write_file(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def write_text(path: Path, text: str) -> Path:
    from tensorslim.io import atomic_write_file

    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fmt(stat: Mapping[str, Any] | None) -> str:
    """"0.78 ± 0.03" (mean ± std over runs), "-" when undefined."""
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def tau_rows(
    taus: Mapping[str, Any], paper: Mapping[str, tuple[float, float]] | None = None
) -> list[dict[str, str]]:
    """One row per proxy: τ before → after fine-tuning in every grouping (and the paper's "all"
    values beside ours when `paper` is given)."""
    rows = []
    for proxy, by_group in taus.items():
        row = {"proxy": PROXY_NAMES.get(proxy, proxy)}
        if paper is not None:
            p = paper.get(proxy)
            row["paper (all)"] = f"{p[0]:.2f} → {p[1]:.2f}" if p else "-"
        for grouping, name in GROUPING_NAMES.items():
            g = by_group.get(grouping, {})
            row[f"{name}"] = f"{fmt(g.get('before'))} → {fmt(g.get('after'))}"
        rows.append(row)
    return rows


def tau_markdown(
    taus: Mapping[str, Any],
    title: str = "",
    paper: Mapping[str, tuple[float, float]] | None = None,
) -> str:
    """The τ table as Markdown: Kendall τ (scipy, τ-b) between each proxy and the test error,
    before → after fine-tuning, mean ± std over runs."""
    from tensorslim.report.tables import markdown_table

    head = f"### Kendall τ: {title}\n\n" if title else ""
    note = (
        "Kendall τ (scipy.stats.kendalltau) between each error and the test error, before → after "
        "fine-tuning, mean ± std over runs (std with ddof 0). Groupings as in Schuurmans et al. "
        "(2023): all trials of a run together; across layers (method and keep fixed, averaged over "
        "those groups); across methods (layer and keep fixed, averaged).\n\n"
    )
    return head + note + markdown_table(tau_rows(taus, paper))


def plot_scatter(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    proxies: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """One panel per proxy: the proxy (log scale when positive) against the accuracy drop in
    points, before fine-tuning (filled) and after (hollow), one colour per method."""
    from tensorslim.io import atomic_write_file
    from tensorslim.report.plots import _pyplot

    plt = _pyplot()
    proxies = list(proxies or PROXY_NAMES)
    cols = 3
    nrows = -(-len(proxies) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for ax, proxy in zip(axes.flat, proxies):
        vals = [r[proxy] for r in rows if r.get(proxy) is not None]
        for mi, method in enumerate(methods):
            pts = [r for r in rows if r["method"] == method and r.get(proxy) is not None]
            x = [r[proxy] for r in pts]
            ax.scatter(x, [r["drop_before"] for r in pts], s=14, color=cmap(mi % 10),
                       label=f"{method} before FT")
            ax.scatter(x, [r["drop_after"] for r in pts], s=14, facecolors="none",
                       edgecolors=cmap(mi % 10), label=f"{method} after FT")
        if vals and min(vals) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(PROXY_NAMES.get(proxy, proxy))
        ax.set_ylabel("accuracy drop (points)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(proxies) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
