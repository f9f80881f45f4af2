"""Memory layout for inference: conv weights and 4-D inputs in `torch.channels_last` (NHWC).

oneDNN, PyTorch's CPU conv backend, runs NHWC convs without reordering each layer's input and
output; chains of small convs (factorized layers) spend much of their time in those reorders.
Whether it pays depends on the model and the machine, so `apply_levers` keeps it only where the
whole model measures faster.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

_MARK = "_tensorslim_channels_last"


def _to_cl(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _inputs_channels_last(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: 4-D floating-point tensor arguments to channels_last."""
    return tuple(_to_cl(a) for a in args), {k: _to_cl(v) for k, v in kwargs.items()}


def _output_contiguous(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """Forward hook: a 4-D tensor output back to the default (NCHW-contiguous) layout, so that
    callers that `.view` it see the layout they expect."""
    if isinstance(out, torch.Tensor) and out.ndim == 4:
        return out.contiguous()
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(
            o.contiguous() if isinstance(o, torch.Tensor) and o.ndim == 4 else o for o in out
        )
    return out


def to_channels_last(model: nn.Module, example_input: Any = None) -> tuple[nn.Module, int]:
    """A copy of `model` with its 4-D parameters and buffers in channels_last, 4-D inputs turned
    to channels_last by a forward pre-hook and a 4-D output turned back to contiguous by a forward
    hook; and the number of Conv2d layers it holds (0 where it has none or was converted already:
    the copy is returned unchanged).
    `example_input` is unused (kept for the lever signature)."""
    del example_input
    model = copy.deepcopy(model)
    n = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    if n == 0 or getattr(model, _MARK, False):  # nothing to convert, or converted already
        return model, 0
    model = model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_inputs_channels_last, with_kwargs=True)
    model.register_forward_hook(_output_contiguous, with_kwargs=True)
    setattr(model, _MARK, True)
    return model, n
