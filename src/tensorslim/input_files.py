"""Model inputs the command line reads: tensors along dim 0 from a .safetensors file or a .npy
array, or a built-in data set by name. One reader for `compress --calibration`, `recover --data`
and `lc --data`; never unpickles, and reads only the samples asked for (a .safetensors header
first, then slices of the chosen tensors; a .npy array memory-mapped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tensorslim.errors import TensorSlimError

# Built-in data sets by name (besides every zoo model's name): the zoo entry whose data they are.
DATA_SETS = {"digits": "digits-cnn", "fashion": "cnn4-fashion"}

Inputs = torch.Tensor | dict[str, torch.Tensor]


def data_set_names() -> list[str]:
    """The names `read_inputs` accepts besides files."""
    from tensorslim import zoo

    return sorted(set(DATA_SETS) | set(zoo.ZOO))


def data_set(text: str) -> Any | None:
    """The zoo Split (x_train, y_train, x_test, y_test) called `text`, or None for another name."""
    from tensorslim import zoo

    if text not in DATA_SETS and text not in zoo.ZOO:
        return None
    return zoo.get(DATA_SETS.get(text, text)).data()


def read_inputs(
    text: str,
    *,
    flag: str,
    key: str | None = None,
    samples: int | None = None,
    several: bool = True,
) -> tuple[Inputs, str]:
    """The first `samples` (all when None) inputs of the file or data set `text`, and how
    messages name them. A .safetensors file with one tensor gives it; with several, `key` picks
    one, else (several=True) all of them as keyword inputs (a dict). A data set name gives its
    unlabeled training inputs. `flag` is the command-line option named in errors."""
    path = Path(text)
    shown = repr(str(text))
    if path.is_file():
        if key is not None and path.suffix != ".safetensors":
            raise TensorSlimError(f"{flag}-key names a tensor of a .safetensors file")
        if path.suffix == ".safetensors":
            return _read_safetensors(path, shown, flag, key, samples, several)
        if path.suffix == ".npy":
            return _read_npy(path, shown, samples), shown
        raise TensorSlimError(
            f"{flag} {shown}: give a .safetensors file (model inputs along dim 0"
            + ("; several tensors are keyword inputs" if several else "")
            + "), a .npy array, or a data set name ("
            + ", ".join(data_set_names())
            + ")"
        )
    split = data_set(text)
    if split is not None:
        if key is not None:
            raise TensorSlimError(f"{flag}-key names a tensor of a .safetensors file")
        return split.x_train[:samples], f"data set {text!r}"
    raise TensorSlimError(
        f"{flag} {shown} does not exist: it is neither a file nor a data set name ("
        + ", ".join(data_set_names())
        + ")"
    )


def _read_safetensors(
    path: Path, shown: str, flag: str, key: str | None, samples: int | None, several: bool
) -> tuple[Inputs, str]:
    from safetensors import SafetensorError, safe_open

    from tensorslim.io import safetensors_entries

    try:
        entries = safetensors_entries(path)
    except TensorSlimError as exc:
        raise TensorSlimError(f"cannot read inputs from {shown}: {exc.__cause__ or exc}") from exc
    names = ", ".join(map(repr, entries)) or "none"
    if not entries:
        raise TensorSlimError(f"{flag} {shown} holds no tensors")
    if key is not None:
        if key not in entries:
            raise TensorSlimError(f"{flag}-key {key!r} is not a tensor of {shown}; it holds {names}")
        chosen = [key]
    elif len(entries) == 1 or several:
        chosen = list(entries)
    else:
        raise TensorSlimError(
            f"{flag} {shown} holds {len(entries)} tensors ({names}); name the one holding the "
            f"model inputs with {flag}-key"
        )
    for name in chosen:
        if not entries[name][0]:
            raise TensorSlimError(
                f"tensor {name!r} of {shown} is a single number (shape ()); give samples along "
                "dim 0"
            )
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # opened once
            for name in chosen:
                out[name] = f.get_slice(name)[:samples]
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        what = ", ".join(map(repr, chosen))
        raise TensorSlimError(f"cannot read tensor {what} of {shown}: {exc}") from exc
    if len(out) == 1:
        name = next(iter(out))
        return out[name], f"tensor {name!r} of {shown}"
    counts = {t.shape[0] for t in out.values()}
    if len(counts) > 1:
        raise TensorSlimError(
            f"the tensors of {shown} ({names}) hold different numbers of samples along dim 0 "
            f"({', '.join(str(t.shape[0]) for t in out.values())}); keyword inputs need the same"
        )
    return out, f"tensors {names} of {shown}"


def _read_npy(path: Path, shown: str, samples: int | None) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"dtype {array.dtype} is not numeric")
        if array.ndim == 0:
            raise ValueError("a single number (shape ()); give samples along dim 0")
        return torch.from_numpy(np.array(array[:samples]))  # a writable copy
    except (OSError, ValueError, TypeError) as exc:
        raise TensorSlimError(
            f"cannot read inputs from {shown} (a plain numeric .npy array, read with "
            f"allow_pickle=False): {exc}"
        ) from exc


def checked_inputs(data: Inputs, name: str, dtype: torch.dtype) -> Inputs:
    """`data` with floating-point tensors cast to `dtype`, after checking that every tensor
    holds samples (dim 0 not empty), finite values and no complex numbers."""
    if not isinstance(data, dict):
        return _checked(data, name, dtype)
    return {k: _checked(t, f"tensor {k!r} of {name}", dtype) for k, t in data.items()}


def _checked(t: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    if t.shape[0] == 0:
        raise TensorSlimError(f"{what} holds no samples (shape {tuple(t.shape)})")
    if t.is_complex():
        raise TensorSlimError(f"{what} is complex ({t.dtype}); give real model inputs")
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            first = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
            raise TensorSlimError(
                f"{what} holds {nan} NaN and {inf} Inf values (first in sample {first}); "
                "model inputs must be finite"
            )
        t = t.to(dtype)
    return t
