"""Run calibration batches through a model and collect per-layer statistics, streaming.

For each requested layer (and each of its matrix parts, as its handler names them: "" for a layer
with one matrix, see tensorslim.core.handler) this accumulates

- gram:   X^T X in float64 over every input row seen (n x n), and `rows`, the number of rows;
- fisher: the empirical Fisher diagonal of the part's weight, I = mean over batches of (dL/dW)^2,
          as an (m x n) float64 matrix (needs a `loss(model, batch)` returning a scalar);
- inputs / outputs: the first `max_samples` samples (batch elements) of the layer's input and output,
          for feature errors with that layer replaced (calibrate/features.py).

Input rows come from the handler's `rows` (a layer whose handler gives a `calibration_reason` is
refused when Gram matrices are requested); the Fisher diagonal needs only `weight_parameters` and
`grad_matrix`, so it works for every handled layer.

Memory is bounded by the statistics themselves (n^2 + m n numbers per part) plus `max_samples`
samples per layer; activations of a batch are folded into the sums and dropped before the next batch.

Every contribution is checked for NaN / Inf as it is added (one pass over an n x n or m x n matrix
per batch), so a bad batch is reported by its index and layer instead of silently poisoning the
statistics (a NaN Gram or Fisher makes every later error estimate NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import tensorslim.handlers  # noqa: F401  (registers the built-in handlers)
from tensorslim._nested import tensors_in
from tensorslim._progress import track
from tensorslim.core.discover import run_model
from tensorslim.core.handler import Handler, handler_for
from tensorslim.errors import ExampleInputError, TensorSlimError

BATCH_KINDS = "a tensor, a tuple of positional inputs or a dict of keyword inputs"


@dataclass
class LayerStats:
    """Calibration statistics of one weight matrix (see module docstring).

    For a layer with several matrices (nn.MultiheadAttention, GRU/LSTM), the layer's stats hold one
    LayerStats per part in `parts`, and its own gram / fisher stay None.
    """

    gram: torch.Tensor | None = None
    rows: int = 0
    fisher: torch.Tensor | None = None
    fisher_batches: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, LayerStats] = field(default_factory=dict)
    # Sequential calibration (calibrate/sequential.py): `gram` is then X~^T X~ of the inputs X~
    # the partly compressed model gives this matrix, `cross` X^T X~ with the inputs X the original
    # model gives it on the same rows, and `source_gram` X^T X (all n x n, float64).
    cross: torch.Tensor | None = None
    source_gram: torch.Tensor | None = None
    # Factorizations computed from these statistics during one compress call, reused between the
    # proposals and the final build (keyed by the compressor).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def part(self, name: str) -> LayerStats:
        """The stats of matrix part `name` ("" is the layer itself)."""
        return self if name == "" else self.parts[name]

    @property
    def covariance(self) -> torch.Tensor | None:
        """X^T X / rows: the inputs' second-moment matrix."""
        return None if self.gram is None or self.rows == 0 else self.gram / self.rows

    def _add_gram(self, g: torch.Tensor, rows: int) -> None:
        self.gram = g if self.gram is None else self.gram.add_(g)
        self.rows += rows

    def _add_grad(self, g: torch.Tensor) -> None:
        g2 = g.detach().to(torch.float64).square()
        self.fisher = g2 if self.fisher is None else self.fisher.add_(g2)
        self.fisher_batches += 1


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


def batch_name(index: int) -> str:
    """How messages name a calibration batch: its position in the iterable, counting from 0."""
    return f"calibration batch {index} (counting from 0)"


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in `t`. They propagate into a sum, so one reduction (~15x cheaper than
    isfinite().all()) decides; the full test runs only when the sum of finite values overflows."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _count_nonfinite(t: torch.Tensor) -> str:
    """'3 NaN and 1 Inf values' (of a floating tensor)."""
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return (
        " and ".join(f"{k} {what}" for k, what in ((nan, "NaN"), (inf, "Inf")) if k)
        + f" values (of {t.numel()})"
    )


def _batch_nonfinite(batch: Any) -> str | None:
    """A description of the NaN / Inf values in the batch's floating tensors, None if none."""
    found = [
        _count_nonfinite(t)
        for t in tensors_in(batch)
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    return "; ".join(found) or None


def _layer_label(name: str, part: str) -> str:
    return f"layer {name!r}" + (f" (matrix {part!r})" if part else "")


def _nonfinite_inputs_error(name: str, part: str, index: int, batch: Any, x: torch.Tensor):
    """The error for a layer whose inputs on one batch hold NaN / Inf (or overflow its Gram)."""
    x = x.detach()
    where = f"{batch_name(index)}: the inputs of {_layer_label(name, part)}"
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return TensorSlimError(
            f"{where} reach {float(x.abs().max()):g}, so X^T X overflows float64; "
            "scale the calibration data down"
        )
    in_batch = _batch_nonfinite(batch)
    cause = (
        f"the batch itself holds NaN/Inf ({in_batch})"
        if in_batch
        else "the batch is finite, so the model produces them before this layer"
    )
    return TensorSlimError(
        f"{where} hold {_count_nonfinite(x)}; {cause}. "
        "Calibration statistics must be finite: remove or clean that batch"
    )


def _numbered(batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """(index, batch) pairs; an error raised while reading the data names the batch."""
    try:
        it = iter(batches)
    except TypeError:
        raise TensorSlimError(
            f"calibration must be an iterable of batches, got {type(batches).__name__}"
        ) from None
    yield from numbered(it, lambda i: f"{batch_name(i)} from the calibration data")


def numbered(
    batches: Iterable[Any], where: Callable[[int], str]
) -> Iterator[tuple[int, Any]]:
    """(index, batch) pairs of `batches`; an exception raised while reading batch i becomes a
    TensorSlimError "reading {where(i)} raised ..." (a TensorSlimError passes as is)."""
    it = iter(batches)
    index = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except TensorSlimError:
            raise
        except Exception as exc:
            raise TensorSlimError(
                f"reading {where(index)} raised {type(exc).__name__}: {exc}"
            ) from exc
        yield index, batch
        index += 1


def _check_batch(batch: Any, index: int) -> None:
    """Refuse a batch without samples (the model decides about everything else)."""
    if _batch_size(batch) == 0:
        shapes = [tuple(t.shape) for t in tensors_in(batch)]
        raise ExampleInputError(
            f"{batch_name(index)} is empty (batch size 0, tensor shapes {shapes}); "
            "every calibration batch needs at least one sample"
        )


class _Collector:
    """The forward hooks of one calibrate() call; `index` / `batch` are the batch being run."""

    def __init__(
        self,
        stats: dict[str, LayerStats],
        handlers: dict[str, Handler],
        gram: bool,
        max_samples: int,
    ) -> None:
        self.stats, self.handlers = stats, handlers
        self.gram, self.max_samples = gram, max_samples
        self.index, self.batch = 0, None

    def hook(self, name: str, module: nn.Module):
        st, handler = self.stats[name], self.handlers[name]

        def hook(_mod, args, kwargs, output):
            if self.gram:
                for part, x in handler.rows(module, args, kwargs, output).items():
                    self._add(name, part, st.part(part), x)
            if self.max_samples and len(st.inputs) < self.max_samples:
                self._sample(st, args, kwargs, output)

        return hook

    def _add(self, name: str, part: str, st: LayerStats, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)
        g = x64.T @ x64
        if not _all_finite(g):
            raise _nonfinite_inputs_error(name, part, self.index, self.batch, x)
        st._add_gram(g, x64.shape[0])

    def _sample(self, st: LayerStats, args, kwargs, output) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
            for i in range(min(x.shape[0], self.max_samples - len(st.inputs))):
                st.inputs.append(x[i : i + 1].detach().clone())
                st.outputs.append(output[i : i + 1].detach().clone())


def _prepare(
    layers: Mapping[str, nn.Module], gram: bool
) -> tuple[dict[str, LayerStats], dict[str, Handler]]:
    """Empty stats and the handler of every layer; refuses a layer type without a handler, and,
    when Gram matrices are requested, a layer whose inputs cannot be collected."""
    stats: dict[str, LayerStats] = {}
    handlers: dict[str, Handler] = {}
    for name, module in layers.items():
        handler = handler_for(module)
        if handler is None:
            raise TensorSlimError(
                f"calibration does not know layer {name!r} ({type(module).__name__}); register a "
                "handler with tensorslim.register_handler"
            )
        why = handler.calibration_reason(module) if gram else None
        if why is not None:
            raise TensorSlimError(
                f"calibration cannot collect the inputs of layer {name!r} "
                f"({type(module).__name__}): {why}"
            )
        handlers[name] = handler
        st = LayerStats()
        for p in handler.weight_parameters(module):
            if p:
                st.parts[p] = LayerStats()
        stats[name] = st
    return stats, handlers


def _forward(model: nn.Module, layers, collector: _Collector, batch: Any, index: int) -> None:
    """One no-grad forward pass of `batch` with the collecting hooks attached."""
    collector.index, collector.batch = index, batch
    hooks = [
        m.register_forward_hook(collector.hook(name, m), with_kwargs=True)
        for name, m in layers.items()
    ]
    try:
        run_model(
            model,
            batch,
            batch_name(index),
            f"; calibration batches must be model inputs: {BATCH_KINDS}",
        )
    finally:
        collector.batch = None
        for h in hooks:
            h.remove()


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

    Raises TensorSlimError naming the layer for a layer type without a handler, or (gram) one whose
    handler cannot give its input rows (its calibration_reason); naming the batch (and layer) for an
    empty or unreadable batch, a batch the model rejects, NaN / Inf in a layer's inputs, and a loss that fails, is not a finite scalar
    tensor or has a NaN / Inf gradient.
    """
    if loss is not None and not callable(loss):
        raise TensorSlimError(
            f"loss must be a function loss(model, batch) -> scalar tensor, got {type(loss).__name__}"
        )
    stats, handlers = _prepare(layers, gram)
    collector = _Collector(stats, handlers, gram, max_samples)
    params: list[tuple[str, str, torch.Tensor]] = []
    if loss is not None:
        for name, module in layers.items():
            for part, p in handlers[name].weight_parameters(module).items():
                params.append((name, part, p))

    mode = model.training  # a loss may switch modes (e.g. dropout on); each Gram pass restores it
    n = 0
    try:
        for index, batch in track(_numbered(batches), "Calibrating", progress):
            if max_batches is not None and n >= max_batches:
                break
            n += 1
            _check_batch(batch, index)
            if gram or max_samples:
                model.train(mode)
                _forward(model, layers, collector, batch, index)
            if loss is not None:
                _fisher_step(model, batch, index, loss, params, stats, handlers, layers)
    finally:
        model.train(mode)
    if n == 0:
        raise TensorSlimError("calibration data is empty: give at least one batch")
    for st in stats.values():
        for part_st in [st, *st.parts.values()]:
            if part_st.fisher is not None:
                part_st.fisher.div_(part_st.fisher_batches)
    return stats


def _loss_value(model: nn.Module, batch: Any, index: int, loss) -> torch.Tensor:
    """loss(model, batch), checked: a finite scalar tensor that depends on the weights."""
    try:
        value = loss(model, batch)
    except TensorSlimError:
        raise
    except Exception as exc:
        raise ExampleInputError(
            f"loss(model, batch) raised {type(exc).__name__} on {batch_name(index)}: {exc}"
        ) from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TensorSlimError(
            f"loss(model, batch) must return a scalar tensor, got {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
            + f" on {batch_name(index)}"
        )
    if not value.requires_grad:
        raise TensorSlimError(
            f"loss(model, batch) on {batch_name(index)} does not depend on the layers' weights "
            "(no gradient); compute it from the model's output"
        )
    if not bool(torch.isfinite(value.detach()).all()):
        nonfinite = _batch_nonfinite(batch)
        raise TensorSlimError(
            f"loss(model, batch) returned {float(value.detach().reshape(())):g} on "
            f"{batch_name(index)}; the loss must be finite to estimate the Fisher information"
            + (f" (the batch holds NaN/Inf: {nonfinite})" if nonfinite else "")
        )
    return value


def _fisher_step(model, batch, index, loss, params, stats, handlers, layers) -> None:
    """Add one batch's squared loss gradient to every part's Fisher sum."""
    saved = [p.requires_grad for _, _, p in params]
    for _, _, p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            value = _loss_value(model, batch, index, loss)
            grads = torch.autograd.grad(
                value.reshape(()), [p for _, _, p in params], allow_unused=True
            )
    finally:
        for (_, _, p), req in zip(params, saved):
            p.requires_grad_(req)
    for (name, part, p), g in zip(params, grads):
        if g is None:
            g = torch.zeros_like(p)
        elif not _all_finite(g):
            raise TensorSlimError(
                f"{batch_name(index)}: the loss gradient of {_layer_label(name, part)} holds "
                f"{_count_nonfinite(g)} (the loss is {float(value.detach().reshape(())):g}); "
                "the Fisher estimate must be finite: check the loss and the model for overflow"
            )
        stats[name].part(part)._add_grad(handlers[name].grad_matrix(layers[name], part, g))
