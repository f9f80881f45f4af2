"""JapaneseVowels (UEA/UCR archive, bundled in the `aeon` package): 640 utterances of /ae/ by nine
male speakers, 12 LPC cepstrum coefficients per frame, 7 to 29 frames; the task is the speaker.

The official split is 270 training and 370 test series; the test series are split (seeded) into a
validation half (for Rank-Tuning and model selection) and a test half. Sequences are zero-padded at
the end to a common length and carry a 13th channel, 1 on real frames and 0 on padding, so a model
can recover the lengths (and pack the sequences) from one tensor. Features are standardized with the
training set's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tensorslim.errors import TensorSlimError

INSTALL_HINT = "pip install aeon   (or: pip install -e '.[bench]')"
N_CLASSES = 9
N_FEATURES = 12


@dataclass(frozen=True)
class JapaneseVowels:
    """x_*: (N, T, 13) float32 (12 standardized coefficients + validity flag), y_*: int64 in 0..8."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _load_split(split: str) -> tuple[list[np.ndarray], np.ndarray]:
    try:
        from aeon.datasets import load_classification
    except ImportError as exc:
        raise TensorSlimError(f"JapaneseVowels needs the aeon package: {INSTALL_HINT}") from exc
    x, y = load_classification("JapaneseVowels", split=split)
    return [np.asarray(s, dtype=np.float32) for s in x], np.asarray(y)


def _pad(series: list[np.ndarray], length: int, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    out = np.zeros((len(series), length, N_FEATURES + 1), dtype=np.float32)
    for i, s in enumerate(series):  # s: (channels, time)
        t = s.shape[1]
        out[i, :t, :N_FEATURES] = ((s.T - mean) / std).astype(np.float32)
        out[i, :t, N_FEATURES] = 1.0
    return torch.from_numpy(out)


def load_japanese_vowels(seed: int = 0) -> JapaneseVowels:
    """Train / validation / test tensors (see the module docstring)."""
    xtr, ytr = _load_split("train")
    xte, yte = _load_split("test")
    frames = np.concatenate([s.T for s in xtr])
    mean, std = frames.mean(0), frames.std(0) + 1e-6
    length = max(s.shape[1] for s in xtr + xte)
    classes = sorted(set(ytr.tolist()), key=lambda c: int(c) if str(c).isdigit() else c)
    index = {c: i for i, c in enumerate(classes)}

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.tensor([index[c] for c in y.tolist()], dtype=torch.int64)

    x_test, y_test = _pad(xte, length, mean, std), labels(yte)
    perm = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))
    val, test = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    return JapaneseVowels(
        _pad(xtr, length, mean, std),
        labels(ytr),
        x_test[val],
        y_test[val],
        x_test[test],
        y_test[test],
    )
