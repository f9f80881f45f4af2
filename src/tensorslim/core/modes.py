"""Train/eval mode of a model, switched for a block and restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the train/eval flag of every submodule on exit, also on error (restoring only the
    root's flag would turn submodules that were in eval mode, e.g. frozen BatchNorm, to training)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block; every submodule's flag is restored on exit (kept_modes)."""
    with kept_modes(model):
        model.eval()
        yield model
