"""A small, seeded supervised training loop (Adam, cross-entropy by default) and accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.core.modes import eval_mode


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    lr_decay: float = 1.0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    penalty: Callable[[int], Callable[[], torch.Tensor] | None] | None = None,
    progress: bool = False,
    description: str = "Training",
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    lr_steps: Sequence[int] = (),
) -> list[float]:
    """Train `model` in place on (x, y) for `epochs` with Adam (learning rate x `lr_decay` after
    every epoch); returns the mean task loss per epoch. The one training loop of the package.

    forward(model, xb) defaults to model(xb), loss_fn to cross-entropy. penalty(epoch) (counted
    from 0) may return a function whose scalar is added to every batch's loss during that epoch
    (a regulariser; the returned losses stay the task's). Shuffling uses its own generator seeded
    by `seed`, so runs are reproducible. `on_epoch(epoch, model)` (epoch counted from 1) is called
    after each epoch, e.g. to record a recovery curve or take a projection step; the model is back
    in training mode afterwards. optimizer="sgd": SGD with `momentum` instead of Adam; lr_steps:
    epochs (counted from 1) after which the learning rate is multiplied by 0.1 (step decay).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = forward or (lambda m, xb: m(xb))
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(lr_steps), gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for epoch in track(range(epochs), description, progress, total=epochs):
        extra = penalty(epoch) if penalty is not None else None
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            task = loss_fn(forward(model, x[idx]), y[idx])
            loss = task if extra is None else task + extra()
            loss.backward()
            opt.step()
            total += float(task.detach()) * len(idx)
            count += len(idx)
        sched.step()
        steps.step()
        history.append(total / max(1, count))
        if on_epoch is not None:
            on_epoch(len(history), model)
            model.train()
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of samples whose arg-max prediction equals the label (model in eval mode)."""
    correct = 0
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            pred = model(x[start : start + batch_size]).argmax(dim=-1)
            correct += int((pred == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))
