"""Resumable LC checkpoints: a folder with `state.safetensors` (the network's state, per compressed
matrix its multipliers lambda and its components Delta_k, the random generator state) and
`progress.json` (the run's configuration, the next LC step, the history, the parameters each
component was built with). Written atomically after every LC step; nothing is pickled. The folder
format is tensorslim._checkpoint's, shared with `recover`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tensorslim._checkpoint import (
    check_same_run,
    cuda_indices,
    load_model_state,
    model_tensors,
    read_folder,
    restore_rng,
    rng_tensors,
    write_folder,
)
from tensorslim._checkpoint import damaged as _damaged
from tensorslim.errors import WeightFileError

__all__ = [
    "check_same_run", "cuda_indices", "damaged", "load_model_state", "model_tensors", "read",
    "restore_rng", "rng_tensors", "tensor", "write",
]

FORMAT = 1
KIND = "tensorslim-lc"


def write(path: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
    """Replace the checkpoint folder `path` with `tensors` and `progress` (atomically)."""
    write_folder(path, tensors, {"format": FORMAT, "kind": KIND, **progress})


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(progress, tensors) of the checkpoint folder `path`; None if it does not exist or is
    empty; WeightFileError if it is something else or damaged."""
    return read_folder(path, "an LC", FORMAT, KIND)


def damaged(path: Path, what: str) -> WeightFileError:
    return _damaged(path, what, "LC")


def tensor(path: Path, tensors: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """tensors[key] checked against the shape and dtype of `like`, on its device."""
    t = tensors.get(key)
    if t is None:
        raise damaged(path, f"no tensor {key!r}")
    if tuple(t.shape) != tuple(like.shape) or t.dtype != like.dtype:
        raise damaged(
            path, f"{key!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(like.shape)} {like.dtype}"
        )
    return t.to(like.device)
