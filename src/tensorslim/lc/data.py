"""Labeled training data for the L step: batches of (inputs, targets), read as numbered passes.

Two forms: a pair of tensors (x, y) with the same length along dim 0, split into batches of
`batch_size` rows in a new seeded order on every pass (so a resumed run reads what an
uninterrupted one would); or a re-iterable of (inputs, targets) batches (a list, a DataLoader),
read from the start on every pass. inputs: a tensor, a tuple of positional inputs or a dict of
keyword inputs; targets: whatever the loss takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tensorslim._nested import tensors_in
from tensorslim.calibrate.collect import numbered
from tensorslim.errors import TensorSlimError, is_int, short_repr

DEFAULT_BATCH_SIZE = 64
_KINDS = (
    "a pair of tensors (inputs, targets) of equal length along dim 0, or a list / DataLoader of "
    "(inputs, targets) batches"
)


def _pass_seed(seed: int, key: int) -> int:
    return (seed * 1_000_003 + key) % (2**63)


class LabeledData:
    """The data as passes: `batches(key)` yields (index, (inputs, targets)) of pass `key` (any
    integer; a tensor pair is shuffled by a generator seeded with (seed, key))."""

    def __init__(self, data: Any, batch_size: int | None, seed: int) -> None:
        self.seed = seed
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length: int | None = None
        if isinstance(data, (str, bytes, Mapping)) or data is None:
            raise TensorSlimError(f"data must be {_KINDS}; got {type(data).__name__}")
        if (
            isinstance(data, tuple)
            and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
        ):
            self._init_table(data, batch_size)
        else:
            if batch_size is not None:
                raise TensorSlimError(
                    "batch_size is for data given as a pair of tensors (x, y); the batches of an "
                    "iterable are used as they come"
                )
            try:
                it = iter(data)
            except TypeError:
                raise TensorSlimError(f"data must be {_KINDS}; got {type(data).__name__}") from None
            if it is data:
                raise TensorSlimError(
                    f"data is a one-shot iterator ({type(data).__name__}); the LC algorithm reads "
                    "the data many times: give a list or a DataLoader of batches, or (x, y) tensors"
                )
            self.data = data
            with contextlib.suppress(TypeError):
                self.length = len(data)
        self.first = self._first()

    def _init_table(self, data: tuple[torch.Tensor, torch.Tensor], batch_size: Any) -> None:
        size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        if not is_int(size) or size < 1:
            raise TensorSlimError(f"batch_size must be an integer >= 1; got {short_repr(size)}")
        x, y = data
        if x.ndim == 0 or y.ndim == 0:
            raise TensorSlimError("data tensors need a batch dimension (dim 0); got a 0-d tensor")
        if x.shape[0] != y.shape[0]:
            raise TensorSlimError(
                f"data inputs and targets must have the same length along dim 0; got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            raise TensorSlimError("data is empty: the tensors have 0 rows")
        self.table = (x, y)
        self.rows, self.batch_size = int(x.shape[0]), size
        self.length = -(-self.rows // size)

    def _first(self) -> tuple[Any, Any]:
        for _, batch in self.batches(0):
            return batch
        raise TensorSlimError("data is empty: give at least one (inputs, targets) batch")

    def batches(self, key: int) -> Iterator[tuple[int, tuple[Any, Any]]]:
        if self.table is not None:
            x, y = self.table
            gen = torch.Generator().manual_seed(_pass_seed(self.seed, key))
            perm = torch.randperm(self.rows, generator=gen)
            for b in range(self.length or 0):
                idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                yield b, (x[idx], y[idx])
            return
        where = lambda i: f"batch {i} of the data (pass {key})"  # noqa: E731
        for i, batch in numbered(self.data, where):
            yield i, check_batch(batch, i)

    def fingerprint(self) -> list[Any]:
        """Shapes, dtypes and sums of the first batch's tensors (a resumed run must see them)."""
        out = []
        for t in tensors_in(list(self.first)):
            t = t.detach()
            total = repr(float(t.double().sum())) if not t.is_complex() else ""
            out.append([list(t.shape), str(t.dtype).removeprefix("torch."), total])
        if self.table is not None:
            out.append(["rows", self.rows, "batch_size", self.batch_size])
        return out

    def example_input(self) -> Any:
        """The first sample's inputs (the whole first batch's if they are not one tensor), for
        tracing the layers' shapes."""
        inputs = self.first[0]
        if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1:
            return inputs[:1]
        return inputs


def check_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """`batch` as (inputs, targets); TensorSlimError naming the batch otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TensorSlimError(
            f"batch {index} of the data is not an (inputs, targets) pair; got "
            f"{type(batch).__name__} {short_repr(batch, 40)}"
        )
    return batch[0], batch[1]


def to_device(obj: Any, device: torch.device | None) -> Any:
    """`obj` (tensors, tuples, lists, dicts of them) on `device`."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """model(inputs), model(*inputs) or model(**inputs)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
