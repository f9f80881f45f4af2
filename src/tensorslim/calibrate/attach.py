"""The calibration step of compress and apply_plan: run the calibration batches once and attach each
compressible layer's statistics and the data-aware settings to its LayerSite."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.calibrate.collect import calibrate
from tensorslim.core.discover import LayerInfo
from tensorslim.core.modes import kept_modes
from tensorslim.core.objective import OBJECTIVE_NEEDS, OBJECTIVES
from tensorslim.errors import TensorSlimError

_ITERABLE = "an iterable of batches (e.g. a list or a DataLoader of model inputs)"


def peek(calibration: Iterable[Any] | None, example_input: Any) -> tuple[Any, Any]:
    """(batches, example_input): the first calibration batch serves as example input if none."""
    if calibration is None:
        return None, example_input
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)):
        raise TensorSlimError(
            f"calibration must be {_ITERABLE}, not a single {type(calibration).__name__}; "
            "wrap it in a list"
        )
    try:
        it = iter(calibration)
    except TypeError:
        raise TensorSlimError(
            f"calibration must be {_ITERABLE}; got {type(calibration).__name__} {calibration!r:.60}"
        ) from None
    try:
        first = next(it)
    except StopIteration:
        raise TensorSlimError("calibration data is empty: give at least one batch") from None
    except TensorSlimError:
        raise
    except Exception as exc:
        raise TensorSlimError(
            f"reading calibration batch 0 raised {type(exc).__name__}: {exc}"
        ) from exc
    return itertools.chain([first], it), first if example_input is None else example_input


def check_objective(objective: Any) -> str | None:
    """`objective` if None or one of OBJECTIVES, else TensorSlimError saying what is accepted."""
    if objective is None or (isinstance(objective, str) and objective in OBJECTIVES):
        return objective
    raise TensorSlimError(
        f"objective must be one of {', '.join(map(repr, OBJECTIVES))} (or None for the method's "
        f"default); got {objective!r} ({type(objective).__name__})"
    )


@contextlib.contextmanager
def _model_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval mode and every buffer afterwards, even on error: a
    loss may switch the model to training mode and so update BatchNorm running statistics."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with kept_modes(model):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved) and b.shape == saved.shape:
                    b.copy_(saved)


def attach(
    model: nn.Module,
    layers: list[LayerInfo],
    method: str,
    batches: Iterable[Any] | None,
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None,
    objective: str,
    options: dict[str, Any],
    progress: bool,
    verb: str = "pass",
) -> dict[str, Any]:
    """Calibrate when the objective or a layer's compressor needs statistics, and set
    `site.stats` / `site.settings` of every compressible layer. `objective` is resolved (not
    None); `options` the compressor options recorded in the plan. Returns facts for the plan's
    meta (empty when nothing data-aware happens)."""
    if loss is not None and not callable(loss):
        raise TensorSlimError(
            f"loss must be a function loss(model, batch) -> scalar tensor; got {type(loss).__name__}"
        )
    compressible = [info for info in layers if info.compressible]
    obj = objective
    needs: set[str] = set(OBJECTIVE_NEEDS[obj])
    for info in compressible:
        needs |= set(getattr(info.compressor, "needs", frozenset()))
    if needs and batches is None:
        what = "Fisher estimate" if "fisher" in needs else "input statistics"
        raise TensorSlimError(
            f"method {method!r} with objective {obj!r} needs a {what}: {verb} calibration=batches"
            + (" and loss=fn (loss(model, batch) -> scalar)" if "fisher" in needs else "")
        )
    if "fisher" in needs and loss is None:
        raise TensorSlimError(
            f"method {method!r} with objective {obj!r} needs the Fisher information of a loss: "
            f"{verb} loss=fn with fn(model, batch) -> scalar tensor"
        )
    if batches is None:
        return {}
    if not needs:  # nothing data-aware to compute: the calibration data is not needed
        return {"objective": obj}
    settings = {**options, "objective": obj}
    if "gram" in needs:  # layers whose input rows cannot be collected stay dense, saying why
        for info in compressible:
            why = info.handler.calibration_reason(info.module) if info.handler else None
            if why is not None:
                info.reason = f"no calibration inputs for this layer: {why}"
        compressible = [info for info in compressible if info.reason is None]
    with _model_kept(model):
        model.eval()  # statistics of the inputs as the model is used, like the shape trace
        stats = calibrate(
            model,
            {info.name: info.module for info in compressible},
            batches,
            loss=loss if "fisher" in needs else None,
            gram="gram" in needs,
            progress=progress,
        )
    rows = 0
    for info in compressible:
        st = stats[info.name]
        parts = [st, *st.parts.values()]
        if "gram" in needs and not any(p.rows for p in parts):
            info.reason = "not executed on the calibration data"
            continue
        rows = max(rows, st.rows)
        info.site = dataclasses.replace(info.site, stats=st, settings=settings)
    batches_seen = max(
        (p.fisher_batches for st in stats.values() for p in [st, *st.parts.values()]), default=0
    )
    return {
        "objective": obj,
        "calibration": {
            "fisher": "fisher" in needs,
            "gram": "gram" in needs,
            "loss_batches": batches_seen,
            "input_rows_max": rows,
        },
        "method_options": options,
    }
