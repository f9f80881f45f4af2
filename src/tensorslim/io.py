"""Save and load compressed models (plan.json + model.safetensors), read user weights, ONNX export.

Nothing here unpickles a file unless the caller passes `trust_pickle=True`. Every output is written
under a temporary name in the destination's folder and renamed into place, so an error never leaves
a half-written output or damages an existing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import ExampleInputError, TensorSlimError, WeightFileError
from tensorslim.plan import Plan
from tensorslim.plan.apply import apply_plan

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
# Files a tensorslim output folder may hold; a folder with anything else is never replaced.
MANAGED_FILES = {PLAN_FILE, WEIGHTS_FILE, "model.onnx"}
# Files of a Hugging Face model folder written by tensorslim.hf.save_pretrained (config + tokenizer).
MANAGED_FILES |= {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
}


def atomic_write_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` and move tmp_dir to `out`, replacing an earlier tensorslim output."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise TensorSlimError(f"output {str(out)!r} exists and is not a folder")
        foreign = sorted(set(os.listdir(out)) - MANAGED_FILES)
        if foreign:
            raise TensorSlimError(
                f"refusing to replace folder {str(out)!r}: it holds files tensorslim did not write "
                f"({', '.join(foreign[:3])}); choose an empty or new output folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def save(model: nn.Module, plan: Plan, out_dir: str | Path) -> Path:
    """Write `out_dir/plan.json` and `out_dir/model.safetensors` atomically; returns the folder."""
    from safetensors.torch import save_model

    def write(tmp: Path) -> None:
        plan.to_json(tmp / PLAN_FILE)
        save_model(model, str(tmp / WEIGHTS_FILE))

    return atomic_write_dir(out_dir, write)


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a saved compressed model: `model` is a fresh instance of the original architecture
    (its weights do not matter); the plan in `path` gives the structure, the safetensors file the
    weights. Returns a new module; `model` is not modified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_dir():
        raise WeightFileError(f"no saved model folder at {str(path)!r}")
    plan = Plan.from_json(path / PLAN_FILE)
    restored = apply_plan(model, plan, weights="empty")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightFileError(f"missing weight file {str(weights)!r}")
    try:
        load_model(restored, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightFileError(f"cannot read weights from {str(weights)!r}: {exc}") from exc
    except RuntimeError as exc:  # strict key/shape mismatch
        raise WeightFileError(
            f"weights in {str(weights)!r} do not fit the model rebuilt from the plan: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return restored


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a state_dict .pt/.pth/.bin read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise WeightFileError(f"cannot read weights from {str(path)!r}: {exc}") from exc
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise WeightFileError(
            f"{str(path)!r} is not a plain state_dict (refused to unpickle it: "
            f"{type(exc).__name__}); save weights with safetensors or model.state_dict()"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{str(path)!r} does not hold a mapping of names to tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weight file into `model` in place (strict); WeightFileError naming bad keys."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise WeightFileError(f"weights in {str(path)!r} do not fit the model: {detail}") from exc
    return model


def load_pickled_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """A whole pickled nn.Module. Unpickling runs arbitrary code, so it needs `trust_pickle=True`."""
    path = Path(path)
    if not trust_pickle:
        raise TensorSlimError(
            f"{str(path)!r} would have to be unpickled, which can run arbitrary code; pass "
            "--trust-pickle (trust_pickle=True) only for files you trust, or give --model "
            "package.module:factory with --weights"
        )
    if not path.is_file():
        raise WeightFileError(f"model file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightFileError(f"cannot unpickle {str(path)!r}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise WeightFileError(f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def export_onnx(
    model: nn.Module, example_input: Any, path: str | Path, opset: int | None = None
) -> Path:
    """Write `model` as ONNX to `path` atomically (traced on `example_input`, batch axis dynamic)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
        if opset is not None:
            kwargs["opset_version"] = opset
        try:  # the TorchScript exporter is fast and needs no extra packages
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model,
                    args,
                    str(tmp),
                    dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                    **kwargs,
                )
        except TypeError:  # a torch without the legacy exporter
            torch.onnx.export(model, args, str(tmp), dynamo=True, **kwargs)

    try:
        return atomic_write_file(path, write)
    except TensorSlimError:
        raise
    except Exception as exc:
        raise ExampleInputError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
