"""Built-in models and offline data used by the demo, the tests and the benchmarks.

Each zoo entry builds its architecture, and its trained weights are trained once (seeded) and
cached under $TENSORSLIM_CACHE (default ~/.cache/tensorslim).
Text data and language models: `zoo.text` (fortunes sentences, VADER lexicon), `zoo.minilm`
(all-MiniLM-L6-v2), `zoo.austen` (Jane Austen's novels, a BPE tokenizer and a small GPT-2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import ModelSpecError
from tensorslim.zoo.digits import DigitsCNN, DigitsMLP, Split, load_digits_split
from tensorslim.zoo.fashion_models import (
    GARIPOV_SGD_EPOCHS,
    GARIPOV_SGD_LR,
    GARIPOV_SGD_RECIPE,
    GaripovNet,
    LeNet300,
    VanillaCNN4,
    fashion_full_split,
    fashion_subset_split,
)

CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where trained zoo weights are cached."""
    return Path(os.environ.get("TENSORSLIM_CACHE", Path.home() / ".cache" / "tensorslim"))


@dataclass(frozen=True)
class ZooModel:
    """A built-in model: its architecture, training recipe, data and an example input."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], Split]
    epochs: int
    lr: float
    description: str
    fit_options: tuple[tuple[str, Any], ...] = ()  # extra keywords of train.fit (optimizer, ...)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.data().x_test[:batch].clone()

    def pretrained(self, seed: int = 0, progress: bool = False) -> nn.Module:
        """The trained model, from the cache or trained now (seeded) and cached atomically."""
        from safetensors.torch import load_file, save_file

        from tensorslim.io import atomic_write_file
        from tensorslim.train import fit

        path = cache_dir() / f"{self.name}-seed{seed}-v{CACHE_VERSION}.safetensors"
        model = self.build()
        if path.is_file():
            try:
                model.load_state_dict(load_file(str(path)))
                return model.eval()
            except Exception:  # a corrupt or stale cache entry is simply retrained
                pass
        torch.manual_seed(seed)
        model = self.build()
        data = self.data()
        fit(
            model,
            data.x_train,
            data.y_train,
            epochs=self.epochs,
            lr=self.lr,
            seed=seed,
            progress=progress,
            description=f"Training {self.name}",
            **dict(self.fit_options),
        )
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write_file(path, lambda tmp: save_file(state, str(tmp)))
        return model.eval()


ZOO: dict[str, ZooModel] = {
    "digits-cnn": ZooModel(
        "digits-cnn",
        DigitsCNN,
        load_digits_split,
        40,
        2e-3,
        "3 convs + 2 Linear layers on sklearn digits (226k params)",
    ),
    "digits-mlp": ZooModel(
        "digits-mlp",
        DigitsMLP,
        load_digits_split,
        40,
        1e-3,
        "64-512-256-10 perceptron on sklearn digits (166k params)",
    ),
    "garipov-fashion": ZooModel(
        "garipov-fashion",
        GaripovNet,
        fashion_subset_split,
        2,
        1e-3,
        "GaripovNet (6 convs 64-64-128-128-128-128, BatchNorm) on Fashion-MNIST, trained on "
        "15k images (566k params; needs dataset-fashion-mnist)",
    ),
    "cnn4-fashion": ZooModel(
        "cnn4-fashion",
        VanillaCNN4,
        fashion_subset_split,
        3,
        1e-3,
        "vanilla 4-conv CNN (32-32-64-64) on Fashion-MNIST, trained on 15k images (96k params; "
        "needs dataset-fashion-mnist)",
    ),
    "garipov-sgd": ZooModel(
        "garipov-sgd",
        GaripovNet,
        fashion_full_split,
        GARIPOV_SGD_EPOCHS,
        GARIPOV_SGD_LR,
        "GaripovNet on Fashion-MNIST with Schuurmans et al.'s recipe (SGD momentum 0.9, lr 0.1 "
        "with step decay, batch 128) on the full 55k training split, 14 epochs (566k params; "
        "needs dataset-fashion-mnist; 93.2 % test accuracy; about 1 h of training on 2 idle "
        "CPU cores)",
        GARIPOV_SGD_RECIPE,
    ),
    "lenet300-fashion": ZooModel(
        "lenet300-fashion",
        LeNet300,
        fashion_full_split,
        30,
        1e-3,
        "LeNet300-100 (784-300-100-10) on Fashion-MNIST, trained on the full 55k training split "
        "(266k params; needs dataset-fashion-mnist; about 2 min of training on 2 CPU cores)",
        (("batch_size", 128), ("lr_decay", 0.9)),
    ),
}


def get(name: str) -> ZooModel:
    """The zoo entry called `name`; ModelSpecError listing the known names otherwise."""
    if name not in ZOO:
        raise ModelSpecError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]


__all__ = [
    "ZOO",
    "DigitsCNN",
    "DigitsMLP",
    "GaripovNet",
    "VanillaCNN4",
    "Split",
    "ZooModel",
    "cache_dir",
    "get",
    "load_digits_split",
]
