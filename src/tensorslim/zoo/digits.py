"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes) and small models trained on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tensorslim.errors import TensorSlimError


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels (N,), for train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """A stratified, seeded train/test split of sklearn's digits."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise TensorSlimError(
            "the digits data needs scikit-learn: pip install scikit-learn"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=data.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return Split(x[tr], y[tr], x[te], y[te])


class DigitsCNN(nn.Module):
    """Three 3x3 convs (32, 64, 128 channels) with two max-pools, then two Linear layers.

    Input (N, 1, 8, 8) -> logits (N, 10); about 226k parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 2 * 2, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """64 -> 512 -> 256 -> 10 perceptron on flattened digits; input (N, 1, 8, 8) or (N, 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
