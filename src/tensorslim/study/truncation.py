"""Truncation along kernel cuts: how much kernel norm a CNN loses and what that costs in accuracy
(Singh, Jahromi & Orús 2024, arXiv 2403.14379).

For each conv layer (4-D kernel, groups == 1), each cut (decompose.cuts.all_cuts) and each level (a
norm-retention target ||K~|| / ||K|| >= retain, or a bond χ), the kernel is replaced by its truncation
(same shape: this is an analysis, not a compression) and the model's accuracy measured with only that
layer truncated; then with every conv layer truncated along the same cut at the same level. Sequential
truncation along the index order (out, in, kh, kw), i.e. an MPS with bonds set to a fraction of the
full bonds, is included as cut "mps". Optionally the most damaged all-layer model is retrained for a
few epochs and its accuracy recorded after each epoch (the recovery curve).

A truncation along one cut is the "lowrank" compressor's projection (exact truncated SVD,
Eckart-Young) of the kernel matricized with the cut's two sides as rows and columns; for the cut
"out|in,kh,kw" that matrix is the conv handler's. The MPS truncation is TT-SVD along the index
order (decompose.cuts.truncate_mps); no compressor orders a kernel's train that way (kind "tt"
orders it (in, kh, kw, out)).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.core.compressor import get_compressor
from tensorslim.decompose import singular_values
from tensorslim.decompose.cuts import (
    Cut,
    Truncation,
    all_cuts,
    cut_by_name,
    norm_loss,
    truncate_mps,
)
from tensorslim.train import accuracy, fit


@dataclass
class TruncationRow:
    """One measurement. `layer` is a layer name or "all"; `level` is "retain=0.9", "chi=4" or
    "mps=0.5" (bond fraction); norm losses are averaged over layers for "all"."""

    layer: str
    cut: str
    level: str
    bond: str
    norm_loss: float
    norm_loss_sq: float
    accuracy: float
    drop: float  # dense accuracy - accuracy, in points (x100)


@dataclass
class TruncationStudy:
    dense_accuracy: float
    rows: list[TruncationRow]
    recovery: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every nn.Conv2d with groups == 1 (4-D kernels the cuts apply to), in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.ndim == 4
    ]


def _truncate(w: torch.Tensor, cut: str, level: tuple[str, float]) -> Truncation:
    kind, value = level
    if cut == "mps":
        full = tuple(
            min(math.prod(w.shape[: j + 1]), math.prod(w.shape[j + 1 :])) for j in range(3)
        )
        bonds = tuple(max(1, math.ceil(value * f)) for f in full)
        return truncate_mps(w, bonds)
    if kind == "retain":
        return truncate_along(w, cut, retain=value)
    return truncate_along(w, cut, chi=int(value))


def truncate_along(
    kernel: torch.Tensor, cut: Cut | str, *, chi: int | None = None, retain: float | None = None
) -> Truncation:
    """`kernel` truncated along `cut` to bond `chi`, or to the smallest bond keeping at least
    `retain` of its norm (||K~|| / ||K||; exactly one of the two): the matricization's projection
    by the "lowrank" compressor, reshaped back (as decompose.cuts.truncate_cut computes it)."""
    if (chi is None) == (retain is None):
        raise ValueError("give exactly one of chi and retain")
    cut = cut_by_name(cut) if isinstance(cut, str) else cut
    k = kernel.detach().to(torch.float64)
    if k.ndim != 4:
        raise ValueError(f"expected a 4-D kernel (out, in, kh, kw), got shape {tuple(k.shape)}")
    perm = cut.left + cut.right
    m = k.permute(perm).reshape(math.prod(k.shape[i] for i in cut.left), -1)
    full = min(m.shape)
    if chi is None:
        chi = _bond_for(m, retain)
    if chi < 1:
        raise ValueError(f"chi must be >= 1, got {chi}")
    chi = min(chi, full)
    # the exact truncated SVD ("auto" may pick the randomized one on large matricizations)
    approx = get_compressor("lowrank", {"svd": "full"}).project(m, {"rank": chi})
    inv = [perm.index(i) for i in range(4)]
    shaped = approx.reshape([k.shape[i] for i in perm]).permute(inv).contiguous()
    loss, loss_sq = norm_loss(k, shaped)
    return Truncation(shaped.to(kernel.dtype), chi, full, loss, loss_sq)


def _bond_for(m: torch.Tensor, retain: float) -> int:
    """The smallest rank whose truncation of `m` keeps ||M~|| / ||M|| >= retain (1 for M = 0)."""
    if not 0.0 < retain <= 1.0:
        raise ValueError(f"retain must be in (0, 1], got {retain}")
    s = singular_values(m)
    if float(s.sum()) <= 0:
        return 1
    kept = torch.cumsum(s**2, 0) / (s**2).sum()  # ||M~||^2 / ||M||^2 for each rank
    return int((kept >= retain**2 - 1e-12).nonzero()[0]) + 1


def _level_name(level: tuple[str, float]) -> str:
    kind, value = level
    return f"{kind}={value:g}"


def truncated_copy(
    model: nn.Module, names: Sequence[str], cut: str, level: tuple[str, float]
) -> tuple[nn.Module, list[Any]]:
    """A copy of `model` with the named convs' kernels truncated; and each truncation's facts."""
    out = copy.deepcopy(model)
    facts = []
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name in names:
            conv = modules[name]
            t = _truncate(conv.weight.detach(), cut, level)
            conv.weight.copy_(t.kernel)
            facts.append(t)
    return out, facts


def truncation_study(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    cuts: Sequence[str | Cut] | None = None,
    retains: Sequence[float] = (0.9, 0.7, 0.5),
    chis: Sequence[int] = (),
    mps_fractions: Sequence[float] = (0.5, 0.25),
    layers: Sequence[str] | None = None,
    all_layers: bool = True,
    retrain_epochs: int = 0,
    x_train: torch.Tensor | None = None,
    y_train: torch.Tensor | None = None,
    retrain_lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> TruncationStudy:
    """Accuracy vs kernel-norm loss for every (layer, cut, level), then for all layers at once.

    cuts: cut names ("out|in,kh,kw", ...) or Cut objects; default all 7. Levels: each value of
    `retains` (norm retained), each bond of `chis`, and each MPS bond fraction of `mps_fractions`.
    retrain_epochs > 0 (needs x_train, y_train): retrain the all-layer truncation with the lowest
    accuracy for that many epochs (Adam, `retrain_lr`) and record the accuracy after each epoch.
    """
    model = model.eval()
    cut_names = [
        c.name if isinstance(c, Cut) else cut_by_name(c).name for c in (cuts or all_cuts())
    ]
    names = [n for n, _ in conv_layers(model)]
    if layers is not None:
        names = [n for n in names if n in set(layers)]
    if not names:
        raise ValueError("the model has no 2-D convolution (groups=1) to truncate")
    dense = accuracy(model, x_test, y_test)
    levels = [("retain", float(r)) for r in retains] + [("chi", float(c)) for c in chis]
    settings = [(c, lv) for c in cut_names for lv in levels]
    settings += [("mps", ("mps", float(f))) for f in mps_fractions]

    def row(layer: str, cut: str, level, facts, acc: float) -> TruncationRow:
        bonds = [str(t.bond) for t in facts]
        return TruncationRow(
            layer=layer,
            cut=cut,
            level=_level_name(level),
            bond=bonds[0] if len(bonds) == 1 else ";".join(bonds),
            norm_loss=sum(t.norm_loss for t in facts) / len(facts),
            norm_loss_sq=sum(t.norm_loss_sq for t in facts) / len(facts),
            accuracy=acc,
            drop=100 * (dense - acc),
        )

    rows = []
    jobs = [(name, s) for name in names for s in settings]
    for name, (cut, level) in track(jobs, "Truncating layers", progress):
        truncated, facts = truncated_copy(model, [name], cut, level)
        rows.append(row(name, cut, level, facts, accuracy(truncated, x_test, y_test)))
    worst = None
    if all_layers:
        for cut, level in track(settings, "Truncating all layers", progress):
            truncated, facts = truncated_copy(model, names, cut, level)
            r = row("all", cut, level, facts, accuracy(truncated, x_test, y_test))
            rows.append(r)
            if worst is None or r.accuracy < worst[0].accuracy:
                worst = (r, truncated)
    recovery = []
    if retrain_epochs > 0 and worst is not None:
        if x_train is None or y_train is None:
            raise ValueError("retraining needs x_train and y_train")
        r, net = worst
        recovery.append({"epoch": 0, "cut": r.cut, "level": r.level, "accuracy": r.accuracy})

        def record(epoch: int, m: nn.Module) -> None:
            acc = accuracy(m, x_test, y_test)
            recovery.append({"epoch": epoch, "cut": r.cut, "level": r.level, "accuracy": acc})

        fit(net, x_train, y_train, epochs=retrain_epochs, lr=retrain_lr, seed=seed, on_epoch=record)
    return TruncationStudy(dense, rows, recovery)
