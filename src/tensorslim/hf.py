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
from pathlib import Path
from typing import Any

from torch import nn

from tensorslim.errors import TensorSlimError, WeightFileError
from tensorslim.io import PLAN_FILE, WEIGHTS_FILE, atomic_write_dir, load
from tensorslim.plan import Plan

CONFIG_FILE = "config.json"
CLASS_KEY = "transformers_class"


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
    from safetensors.torch import save_model

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
        save_model(model, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_write_dir(out_dir, write)


def load_pretrained(path: str | Path, model_class: Any = None) -> nn.Module:
    """The compressed transformers model saved by `save_pretrained`, in eval mode.

    model_class: the transformers class to build (default: the one recorded in the plan, e.g.
    BertModel). Nothing is downloaded: the config is read from `path` only."""
    transformers = _transformers()
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise WeightFileError(f"no {CONFIG_FILE} in {str(path)!r}: not a saved transformers model")
    plan = Plan.from_json(path / PLAN_FILE)
    if model_class is None:
        name = plan.meta.get(CLASS_KEY)
        model_class = getattr(transformers, name, None) if name else None
        if model_class is None:
            raise WeightFileError(
                f"the plan in {str(path)!r} does not name a transformers class ({CLASS_KEY}); "
                "pass model_class="
            )
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    skeleton = model_class(config)
    return load(skeleton, path).eval()
