"""Resumable training checkpoints as a folder: `state.safetensors` (tensors: model state, optimizer
moments, random generator states, ...) and `progress.json` (configuration, counters, history).
Written atomically (the whole folder is replaced); read back without unpickling anything. Used by
`recover` (tensorslim.train.distill) and the LC algorithm (tensorslim.lc)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorSlimError, WeightFileError

STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
MAX_PROGRESS_BYTES = 64 << 20


def damaged(path: Path, what: str, label: str = "") -> WeightFileError:
    """The error for a checkpoint folder whose content is unusable."""
    return WeightFileError(f"{label + ' ' if label else ''}checkpoint {str(path)!r} is damaged: {what}")


def write_folder(path: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
    """Replace the folder `path` with `tensors` (copied to the CPU) and `progress` (JSON)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from tensorslim.io import atomic_write_dir

    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = json.dumps(progress, indent=1, allow_nan=False)

    def fill(tmp: Path) -> None:
        try:
            save_file(plain, str(tmp / STATE_FILE))
        except SafetensorError as exc:
            raise WeightFileError(f"cannot write checkpoint {str(path)!r}: {exc}") from exc
        (tmp / PROGRESS_FILE).write_text(text)

    atomic_write_dir(path, fill)


def read_folder(
    path: Path, label: str, fmt: int, kind: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(progress, tensors) of the checkpoint folder `path`; None if it does not exist or is empty.
    WeightFileError if it is something else, damaged, or not of format `fmt` (and `kind`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    prog, state = path / PROGRESS_FILE, path / STATE_FILE
    if not (path.is_dir() and prog.is_file() and state.is_file()):
        raise WeightFileError(
            f"{str(path)!r} is not {label} checkpoint (no {PROGRESS_FILE} and {STATE_FILE}); "
            "name a new or empty folder for checkpoint="
        )
    try:
        if prog.stat().st_size > MAX_PROGRESS_BYTES:
            raise ValueError("file too large")
        progress = json.loads(prog.read_text())
        tensors = load_file(str(state))
    except (OSError, ValueError, SafetensorError) as exc:
        raise WeightFileError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(progress, dict) or (kind is not None and progress.get("kind") != kind):
        raise WeightFileError(f"{str(prog)!r} is not {label} checkpoint")
    if progress.get("format") != fmt:
        raise WeightFileError(f"{str(prog)!r}: unknown checkpoint format {progress.get('format')!r}")
    return progress, tensors


def check_same_run(path: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """TensorSlimError naming what differs if the checkpoint was made by another configuration."""
    old = saved.get("config")
    if old == config:
        return
    if not isinstance(old, dict):
        raise damaged(path, "no config")
    differ = [k for k in config if old.get(k) != config[k]]
    raise TensorSlimError(
        f"checkpoint {str(path)!r} was written by a different run ({', '.join(differ)} differ: "
        + "; ".join(f"{k}: {old.get(k)!r:.60} then, {config[k]!r:.60} now" for k in differ[:3])
        + "); pass the same arguments to resume, or another checkpoint folder to start over"
    )


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under keys "model/<name>"."""
    return {f"model/{k}": v for k, v in model.state_dict().items()}


def load_model_state(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Load the "model/..." tensors into `model` (strict)."""
    state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise damaged(path, " ".join(str(exc).split())) from exc


def cuda_indices(model: nn.Module) -> list[int]:
    """The CUDA devices holding any of the model's parameters or buffers."""
    found = {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda}
    return sorted(found)


def rng_tensors(cuda: list[int]) -> dict[str, torch.Tensor]:
    """The CPU and the given CUDA devices' random generator states."""
    out = {"rng/cpu": torch.get_rng_state()}
    for i in cuda:
        out[f"rng/cuda/{i}"] = torch.cuda.get_rng_state(i)
    return out


def restore_rng(path: Path, tensors: dict[str, torch.Tensor], cuda: list[int]) -> None:
    """Set the random generator states saved by rng_tensors (each of `cuda` must be there)."""
    cpu = tensors.get("rng/cpu")
    if cpu is None or cpu.dtype != torch.uint8:
        raise damaged(path, "no CPU random generator state")
    try:
        torch.set_rng_state(cpu)
        for i in cuda:
            saved = tensors.get(f"rng/cuda/{i}")
            if saved is None:
                raise damaged(path, f"no random generator state for cuda:{i}")
            torch.cuda.set_rng_state(saved, i)
    except (RuntimeError, ValueError) as exc:
        raise damaged(path, f"random generator state: {exc}") from exc
