"""Run calibration batches through a model and collect per-layer statistics, streaming.

For each requested layer (and each of its matrix parts, see adapters.py) this accumulates

- gram:   X^T X in float64 over every input row seen (n x n), and `rows`, the number of rows;
- fisher: the empirical Fisher diagonal of the part's weight, I = mean over batches of (dL/dW)^2,
          as an (m x n) float64 matrix (needs a `loss(model, batch)` returning a scalar);
- inputs / outputs: the first `max_samples` samples (batch elements) of the layer's input and output,
          for feature errors with that layer replaced (calibrate/features.py).

Memory is bounded by the statistics themselves (n^2 + m n numbers per part) plus `max_samples`
samples per layer; activations of a batch are folded into the sums and dropped before the next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.calibrate.adapters import adapter_for
from tensorslim.errors import ExampleInputError, TensorSlimError


@dataclass
class LayerStats:
    """Calibration statistics of one weight matrix (see module docstring).

    For a layer with several matrices (nn.MultiheadAttention), the layer's stats hold one LayerStats
    per part in `parts`, and its own gram / fisher stay None.
    """

    gram: torch.Tensor | None = None
    rows: int = 0
    fisher: torch.Tensor | None = None
    fisher_batches: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, LayerStats] = field(default_factory=dict)
    # Factorizations computed from these statistics during one compress call, reused between the
    # option listing and the final factorization (keyed by the factorizer, see model/data_aware.py).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def part(self, name: str) -> LayerStats:
        """The stats of matrix part `name` ("" is the layer itself)."""
        return self if name == "" else self.parts[name]

    @property
    def covariance(self) -> torch.Tensor | None:
        """X^T X / rows: the inputs' second-moment matrix."""
        return None if self.gram is None or self.rows == 0 else self.gram / self.rows

    def _add_rows(self, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)
        g = x64.T @ x64
        self.gram = g if self.gram is None else self.gram.add_(g)
        self.rows += x64.shape[0]

    def _add_grad(self, g: torch.Tensor) -> None:
        g2 = g.detach().to(torch.float64).square()
        self.fisher = g2 if self.fisher is None else self.fisher.add_(g2)
        self.fisher_batches += 1


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(batch), model(*batch) or model(**batch) for a tensor, tuple/list or dict batch."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for b in batch:
            if isinstance(b, torch.Tensor) and b.ndim:
                return b.shape[0]
    return None


def calibrate(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    gram: bool = True,
    max_samples: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Statistics of `layers` (name -> module inside `model`) over `batches`.

    batches: an iterable of model inputs (a tensor, a tuple of positional inputs or a dict of keyword
    inputs), consumed once. loss: `loss(model, batch) -> scalar tensor`; if given, each batch's
    gradient of it with respect to the layers' weights is squared and averaged (the empirical
    Fisher diagonal). The model's mode (train/eval) is left as the caller set it; the forward passes
    for the Gram matrices run without gradients, and parameter `.grad` fields are not touched.
    gram: collect X^T X. max_samples: keep that many input/output samples per layer.
    """
    stats: dict[str, LayerStats] = {}
    adapters = {}
    for name, module in layers.items():
        adapter = adapter_for(module)
        if adapter is None:
            raise TensorSlimError(
                f"calibration does not know layer {name!r} ({type(module).__name__}); register an "
                "adapter with tensorslim.calibrate.register_adapter"
            )
        adapters[name] = adapter
        parts = adapter.parts(module)
        st = LayerStats()
        for p in parts:
            if p:
                st.parts[p] = LayerStats()
        stats[name] = st

    def make_hook(name: str, module: nn.Module):
        st, adapter = stats[name], adapters[name]

        def hook(_mod, args, kwargs, output):
            if gram:
                for part, x in adapter.rows(module, args, kwargs, output).items():
                    st.part(part)._add_rows(x)
            if max_samples and len(st.inputs) < max_samples:
                x = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
                    for i in range(min(x.shape[0], max_samples - len(st.inputs))):
                        st.inputs.append(x[i : i + 1].detach().clone())
                        st.outputs.append(output[i : i + 1].detach().clone())

        return hook

    params: list[tuple[str, str, torch.Tensor]] = []
    if loss is not None:
        for name, module in layers.items():
            for part, p in adapters[name].parts(module).items():
                params.append((name, part, p))

    mode = model.training  # a loss may switch modes (e.g. dropout on); each Gram pass restores it
    n = 0
    for batch in track(batches, "Calibrating", progress):
        if max_batches is not None and n >= max_batches:
            break
        n += 1
        if gram or max_samples:
            hooks = [
                m.register_forward_hook(make_hook(name, m), with_kwargs=True)
                for name, m in layers.items()
            ]
            model.train(mode)
            try:
                with torch.no_grad():
                    call_model(model, batch)
            except TensorSlimError:
                raise
            except Exception as exc:
                raise ExampleInputError(
                    f"the model rejected calibration batch {n} ({type(exc).__name__}: {exc}); "
                    "calibration batches must be model inputs: a tensor, a tuple of positional "
                    "inputs or a dict of keyword inputs"
                ) from exc
            finally:
                for h in hooks:
                    h.remove()
        if loss is not None:
            _fisher_step(model, batch, loss, params, stats, adapters, layers)
    model.train(mode)
    if n == 0:
        raise TensorSlimError("calibration data is empty: give at least one batch")
    for st in stats.values():
        for part_st in [st, *st.parts.values()]:
            if part_st.fisher is not None:
                part_st.fisher.div_(part_st.fisher_batches)
    return stats


def _fisher_step(model, batch, loss, params, stats, adapters, layers) -> None:
    saved = [p.requires_grad for _, _, p in params]
    for _, _, p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            value = loss(model, batch)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TensorSlimError(
                    f"loss(model, batch) must return a scalar tensor, got {type(value).__name__}"
                    + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
                )
            if not value.requires_grad:
                raise TensorSlimError(
                    "loss(model, batch) does not depend on the layers' weights (no gradient); "
                    "compute it from the model's output"
                )
            grads = torch.autograd.grad(
                value.reshape(()), [p for _, _, p in params], allow_unused=True
            )
    finally:
        for (_, _, p), req in zip(params, saved):
            p.requires_grad_(req)
    for (name, part, p), g in zip(params, grads):
        if g is None:
            g = torch.zeros_like(p)
        stats[name].part(part)._add_grad(adapters[name].grad_matrix(layers[name], part, g))
