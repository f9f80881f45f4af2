"""Training adaptations that prepare a network for low-rank compression (Maison, du Mas des Bourboux,
Courtat 2023, "Compression of recurrent neural networks using matrix factorization", arXiv
2310.12688, Sec. 3.2):

- nuclear-norm regularization: loss + lam * c(e) * sum_W ||W||_*, with the ramp c(e) = 0 before
  epoch a, (e - a) / (b - a) between a and b, and 1 after b (the paper uses a, b = 5, 25 or 10, 120
  and lam = 1e-3 or 1e-4). The nuclear norm is the convex surrogate of the rank: it pushes the small
  singular values to zero so that truncation later costs little.
- hard low-rank approximation: every N epochs overwrite each matrix with its rank-R truncated SVD
  (the paper: N = 20, R = 20 or 40); training continues from the truncated weights.

The matrices are the stacked-gate weight_ih / weight_hh of every nn.GRU / nn.LSTM by default (as in
the paper), optionally nn.Linear weights too. `fit_lowrank` is the training loop with both
adaptations (Adam, learning rate x `lr_decay` per epoch as in the paper's experiments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.errors import TensorSlimError
from tensorslim.layers.lowrank_rnn import rnn_matrices


def ramp(epoch: float, a: float, b: float) -> float:
    """c(e): 0 for e < a, rising linearly to 1 at e = b, then 1 (a == b is a step at a)."""
    if epoch < a:
        return 0.0
    if epoch >= b:
        return 1.0
    return (epoch - a) / (b - a)


def lowrank_matrices(
    model: nn.Module, kinds: Sequence[type[nn.Module]] = (nn.GRU, nn.LSTM)
) -> dict[str, nn.Parameter]:
    """{dotted parameter name: parameter} of the matrices the adaptations act on: every weight
    matrix of the GRU/LSTM modules (and of nn.Linear if it is among `kinds`)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, tuple(kinds)):
            continue
        if isinstance(module, (nn.GRU, nn.LSTM)):
            params = rnn_matrices(module)
        elif isinstance(module, nn.Linear):
            params = ["weight"]
        else:
            continue
        for p in params:
            out[f"{name}.{p}" if name else p] = getattr(module, p)
    return out


def nuclear_norm(matrices: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the nuclear norms (sums of singular values) of the matrices; differentiable."""
    mats = list(matrices.values()) if isinstance(matrices, dict) else list(matrices)
    if not mats:
        raise TensorSlimError("nuclear_norm needs at least one matrix")
    # svdvals: the same value and (sub)gradient U V^T as matrix_norm(ord="nuc"), ~2x cheaper on CPU.
    return sum(torch.linalg.svdvals(w).sum() for w in mats)


@torch.no_grad()
def hard_lowrank_(matrices: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    """Overwrite each matrix in place with its rank-`rank` truncated SVD (matrices whose smaller
    side is <= rank are left alone). Returns each truncated matrix's relative Frobenius error."""
    if rank < 1:
        raise TensorSlimError(f"hard low-rank rank must be >= 1; got {rank}")
    errors = {}
    for name, w in matrices.items():
        if min(w.shape) <= rank:
            continue
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        w_r = (u[:, :rank] * s[:rank]) @ vh[:rank]
        errors[name] = float(s[rank:].norm() / s.norm()) if s.norm() > 0 else 0.0
        w.copy_(w_r.to(w.dtype))
    return errors


@dataclass
class Adaptations:
    """Which training adaptations to use (None disables one).

    nuclear: (lam, a, b) for loss + lam * c(e) * sum ||W||_*; hard: (every N epochs, rank R).
    """

    nuclear: tuple[float, float, float] | None = None
    hard: tuple[int, int] | None = None
    kinds: tuple[type[nn.Module], ...] = (nn.GRU, nn.LSTM)


def fit_lowrank(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    adaptations: Adaptations | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    lr_decay: float = 0.96,
    batch_size: int = 256,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    description: str = "Training",
) -> list[dict[str, float]]:
    """Train `model` in place with Adam (lr x lr_decay after every epoch, seeded shuffling) and the
    given adaptations. Returns per-epoch records: mean task loss, c(e), nuclear norm, and the
    truncation errors when a hard low-rank step ran at the end of that epoch.

    forward(model, xb) defaults to model(xb); loss_fn defaults to cross-entropy.
    """
    ad = adaptations or Adaptations()
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = forward or (lambda m, xb: m(xb))
    mats = lowrank_matrices(model, ad.kinds)
    if (ad.nuclear or ad.hard) and not mats:
        raise TensorSlimError("the adaptations need GRU/LSTM (or Linear) matrices; found none")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in track(range(epochs), description, progress, total=epochs):
        c = ramp(epoch, ad.nuclear[1], ad.nuclear[2]) if ad.nuclear else 0.0
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            task = loss_fn(forward(model, x[idx]), y[idx])
            loss = task
            if ad.nuclear and c > 0:
                loss = loss + ad.nuclear[0] * c * nuclear_norm(mats)
            loss.backward()
            opt.step()
            total += float(task.detach()) * len(idx)
            count += len(idx)
        sched.step()
        rec = {"epoch": epoch + 1, "loss": total / max(1, count), "c": c}
        if ad.nuclear:
            with torch.no_grad():
                rec["nuclear_norm"] = float(nuclear_norm(mats))
        if ad.hard and (epoch + 1) % ad.hard[0] == 0:
            errs = hard_lowrank_(mats, ad.hard[1])
            rec["hard_rel_error"] = max(errs.values()) if errs else 0.0
        history.append(rec)
    model.eval()
    return history
