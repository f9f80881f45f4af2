"""Hugging Face Transformers models: save a compressed model as a folder that loads again without any
forked modeling code.

The folder holds the model's own `config.json` (written by transformers), `model.safetensors` (the
compressed weights), tensorslim's `plan.json` (which layers are factorized, at which rank) and,
optionally, the tokenizer's files. Loading builds the stock architecture from the config with
transformers, rebuilds the factorized structure from the plan and reads the weights (strictly), so
the compressed model is the same transformers class and works with its tokenizer.
Needs `pip install transformers` (the project's `transformers` extra).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorSlimError, WeightFileError, is_int
from tensorslim.io import (
    PLAN_FILE,
    WEIGHTS_FILE,
    atomic_write_dir,
    load,
    safetensors_entries,
    save_weights,
)
from tensorslim.plan import Plan

CONFIG_FILE = "config.json"
CLASS_KEY = "transformers_class"
# A dense skeleton may hold at most this many times the parameters stored in the folder.
MAX_SKELETON_RATIO = 64
# No size or count in a config may exceed this (vocabularies and widths are far smaller).
MAX_CONFIG_INT = 2**31 - 1
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*", re.ASCII)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TensorSlimError(
            "Hugging Face support needs transformers: pip install 'tensorslim[transformers]' "
            "(or pip install transformers)"
        ) from exc
    return transformers


def save_pretrained(
    model: nn.Module, plan: Plan, out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Write config.json, model.safetensors, plan.json (and the tokenizer's files) atomically."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        raise TensorSlimError(
            f"{type(model).__name__} has no Hugging Face `config`; use tensorslim.save instead"
        )
    plan = copy.deepcopy(plan)
    plan.meta[CLASS_KEY] = type(model).__name__

    def write(tmp: Path) -> None:
        config.to_json_file(str(tmp / CONFIG_FILE))
        plan.to_json(tmp / PLAN_FILE)
        save_weights(model, tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_write_dir(out_dir, write)


def model_class_named(name: Any, where: str = "the plan") -> type:
    """The transformers model class called `name`, from an allow-list: public attributes of
    `transformers` that are subclasses of transformers.PreTrainedModel. Nothing else is looked up,
    so a saved folder cannot name a function, a module or an arbitrary object to call."""
    transformers = _transformers()
    accepted = (
        "accepted: the name of a transformers model class (a subclass of "
        "transformers.PreTrainedModel, e.g. 'BertModel'), or pass model_class="
    )
    if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
        raise WeightFileError(f"{CLASS_KEY} in {where} is {name!r}; {accepted}")
    try:
        found = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - transformers' lazy import of an optional backend failed
        found = None
    base = transformers.PreTrainedModel
    if not (isinstance(found, type) and issubclass(found, base) and found is not base):
        raise WeightFileError(
            f"{CLASS_KEY} {name!r} in {where} is not a transformers model class; {accepted}"
        )
    return found


def _config_for(model_class: Any, path: Path) -> Any:
    """The model's config read from path/config.json only (no download, no remote code)."""
    transformers = _transformers()
    config_class = getattr(model_class, "config_class", None)
    if not (
        isinstance(config_class, type)
        and issubclass(config_class, transformers.PretrainedConfig)
        and config_class is not transformers.PretrainedConfig
    ):
        config_class = transformers.AutoConfig
    try:
        return config_class.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError, ...
        raise WeightFileError(
            f"cannot read {str(path / CONFIG_FILE)!r} as a {getattr(config_class, '__name__', '')}"
            f": {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_pretrained(path: str | Path, model_class: Any = None) -> nn.Module:
    """The compressed transformers model saved by `save_pretrained`, in eval mode.

    model_class: the transformers class to build (default: the one recorded in the plan, e.g.
    BertModel, which must be a transformers.PreTrainedModel subclass: see model_class_named).
    Nothing is downloaded and no code from the folder runs: the config is read from `path` only."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise WeightFileError(f"no {CONFIG_FILE} in {str(path)!r}: not a saved transformers model")
    plan = Plan.from_json(path / PLAN_FILE)
    if model_class is None:
        name = plan.meta.get(CLASS_KEY) if isinstance(plan.meta, dict) else None
        if name is None:
            raise WeightFileError(
                f"the plan in {str(path)!r} does not name a transformers class ({CLASS_KEY}); "
                "pass model_class="
            )
        model_class = model_class_named(name, repr(str(path / PLAN_FILE)))
    config = _config_for(model_class, path)
    weights = path / WEIGHTS_FILE
    entries = safetensors_entries(weights) if weights.is_file() else {}
    _check_config_counts(config, path, entries)
    _check_size(_build(model_class, config, config_file, meta=True), path, entries)
    return load(_build(model_class, config, config_file), path).eval()


def _build(model_class: Any, config: Any, config_file: Path, meta: bool = False) -> nn.Module:
    """model_class(config), on PyTorch's meta device (no memory) when `meta`."""
    try:
        if meta:
            with torch.device("meta"):
                return model_class(config)
        return model_class(config)
    except Exception as exc:  # a hand-edited config: bad sizes or types
        raise WeightFileError(
            f"cannot build {getattr(model_class, '__name__', model_class)!s} from "
            f"{str(config_file)!r}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def _check_config_counts(config: Any, path: Path, entries: dict[str, Any]) -> None:
    """Refuse layer counts that the stored weights cannot hold before building anything: even on
    the meta device, a config asking for 10^6 layers would build 10^6 Python modules. The stored
    keys number repeated blocks (encoder.layer.11.…), so no count may exceed their largest index."""
    indices = [int(p) for k in entries for p in k.split(".") if p.isdigit() and len(p) < 10]
    most = max(indices, default=0) + 1
    for key, value in config.to_dict().items():
        if not is_int(value):
            continue
        if value > MAX_CONFIG_INT or ("layer" in key.lower() and value > most):
            raise WeightFileError(
                f"{str(path / CONFIG_FILE)!r} sets {key}={value}, which the weights in "
                f"{WEIGHTS_FILE} cannot hold (at most {most} repeated blocks are stored): the "
                "config does not belong to these weights"
            )


def _check_size(skeleton: nn.Module, path: Path, entries: dict[str, Any]) -> None:
    """Refuse a config whose dense model is far larger than the saved weights (a tampered
    config.json, e.g. hidden_size 10^9, must not allocate terabytes before the plan is checked)."""
    stored = sum(math.prod(shape) for shape, _ in entries.values())
    dense = sum(p.numel() for p in skeleton.parameters())
    allowed = max(MAX_SKELETON_RATIO * stored, 1 << 20)
    if dense > allowed:
        raise WeightFileError(
            f"{str(path / CONFIG_FILE)!r} describes a model of {dense:,} parameters, more than "
            f"{MAX_SKELETON_RATIO}x the {stored:,} stored in {WEIGHTS_FILE}: the config does not "
            "belong to these weights"
        )
