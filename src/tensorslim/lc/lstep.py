"""The L step: minimise L(w) + mu/2 ||w - Delta(Theta) - lambda/mu||^2 over the network's weights
with SGD (Nesterov momentum) or Adam for a few epochs (Carreira-Perpinan 2017, Eq. 6); with mu = 0
it is plain training (the fine-tuning of the baselines)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorSlimError
from tensorslim.lc.data import LabeledData, call_model, to_device
from tensorslim.lc.schedule import Schedule
from tensorslim.lc.units import Unit

# Pass keys of LC step k are k * _PASSES + j (j: the pass within the step).
_PASSES = 1 << 16

Loss = Callable[[Any, Any], torch.Tensor]


def make_optimizer(params: list[nn.Parameter], schedule: Schedule, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer for one L step, as in the LC toolkit's examples."""
    if schedule.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(
        params, lr=lr, momentum=schedule.momentum, nesterov=schedule.momentum > 0
    )


def _device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    return None


def l_step(
    model: nn.Module,
    data: LabeledData,
    loss_fn: Loss,
    schedule: Schedule,
    step: int,
    *,
    units: Sequence[Unit] = (),
    targets: Sequence[torch.Tensor] = (),
    mu: float = 0.0,
    update: Callable[..., None] = lambda advance=1, **values: None,
) -> dict[str, float]:
    """Train every trainable parameter of `model` (in train mode) for one L step of `schedule`
    at LC step `step`; the penalty mu/2 * sum ||unit.matrix() - target||^2 is added when mu > 0.
    Returns the mean task loss, the mean penalty term and the number of optimizer steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TensorSlimError("the model has no trainable parameters (requires_grad)")
    opt = make_optimizer(params, schedule, schedule.lr_at(step))
    device = _device(model)
    model.train()
    total_loss = total_pen = 0.0
    count = 0
    passes = 0
    while True:
        if schedule.epochs is not None and passes >= schedule.epochs:
            break
        seen = 0
        for b, (inputs, y) in data.batches(step * _PASSES + passes):
            seen += 1
            where = f"LC step {step + 1}, pass {passes + 1}, batch {b + 1}"
            opt.zero_grad(set_to_none=True)
            out = call_model(model, to_device(inputs, device))
            task = loss_fn(out, to_device(y, device))
            if not isinstance(task, torch.Tensor) or task.numel() != 1:
                raise TensorSlimError(
                    f"loss must return a scalar tensor; got {type(task).__name__} at {where}"
                )
            loss = task
            pen_value = 0.0
            if mu > 0 and units:
                pen = sum(((u.matrix() - t) ** 2).sum() for u, t in zip(units, targets))
                pen = 0.5 * mu * pen
                loss = loss + pen
                pen_value = float(pen.detach())
            value = float(task.detach())
            if not (math.isfinite(value) and math.isfinite(pen_value)):
                raise TensorSlimError(
                    f"the loss is NaN/Inf at {where} (task loss {value:.4g}, penalty "
                    f"{pen_value:.4g}); lower the learning rate or mu"
                )
            loss.backward()
            opt.step()
            total_loss += value
            total_pen += pen_value
            count += 1
            update(1, loss=value, penalty=pen_value, mu=mu)
            if schedule.batches is not None and count >= schedule.batches:
                break
        if seen == 0:
            raise TensorSlimError(f"the data yielded no batches (LC step {step + 1})")
        passes += 1
        if schedule.batches is not None and count >= schedule.batches:
            break
    return {
        "loss": total_loss / max(1, count),
        "penalty": total_pen / max(1, count),
        "batches": count,
    }


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: LabeledData, batches: int) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of `model` (reset, then the
    plain average over `batches` training batches run in train mode without gradients): the
    statistics collected during training belong to the uncompressed weights, the compressed model
    computes with Delta(Theta). Returns the number of batches run (0 without BatchNorm)."""
    norms = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    device = _device(model)
    count = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        while count < batches:
            seen = 0
            for _, (inputs, _y) in data.batches(-1 - count):
                call_model(model, to_device(inputs, device))
                seen += 1
                count += 1
                if count >= batches:
                    break
            if seen == 0:
                raise TensorSlimError("the data yielded no batches to recalibrate BatchNorm with")
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return count
