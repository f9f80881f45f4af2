"""Fashion-MNIST (70,000 28x28 grey images, 10 classes) from Debian's `dataset-fashion-mnist`.

The files are IDX format, gzip-compressed, under /usr/share/datasets/fashion-mnist (override with
$TENSORSLIM_FASHION_MNIST). Split as in Schuurmans et al. (ICLR 2023): 55k train / 5k validation from
the official 60k training set (seeded), and the official 10k test set.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tensorslim.errors import TensorSlimError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def fashion_dir() -> Path:
    return Path(os.environ.get("TENSORSLIM_FASHION_MNIST", DEFAULT_DIR))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000 TT DD, DD big-endian int32 sizes, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise TensorSlimError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise TensorSlimError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise TensorSlimError(f"{str(path)!r}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TensorSlimError(
            f"{str(path)!r} is truncated: expected {dims}, got {data.size} values"
        )
    return data.reshape(dims)


@dataclass(frozen=True)
class FashionMNIST:
    """Images (N, 1, 28, 28) float32 in [0, 1] and int64 labels (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_fashion_mnist(seed: int = 0, n_val: int = 5000) -> FashionMNIST:
    """Load Fashion-MNIST; TensorSlimError naming the install command if the files are missing."""
    root = fashion_dir()
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise TensorSlimError(
            f"Fashion-MNIST files not found in {str(root)!r} (missing {', '.join(missing)}); "
            f"install them with: {INSTALL_HINT}"
        )

    def images(key: str) -> torch.Tensor:
        arr = read_idx(root / FILES[key]).astype(np.float32) / 255.0
        return torch.from_numpy(arr).unsqueeze(1)

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(root / FILES[key]).astype(np.int64))

    x, y = images("train_images"), labels("train_labels")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return FashionMNIST(
        x[train], y[train], x[val], y[val], images("test_images"), labels("test_labels")
    )
