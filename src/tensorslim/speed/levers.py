"""Inference levers, each kept only where it measures faster on the whole model.

`apply_levers(model, x)` returns a new model for inference (the input model is untouched) with:

- ``fold_bn``: eval-mode BatchNorm folded into the conv (or the last conv of a factorized chain)
  that feeds it (`speed.fold`);
- ``merge_1x1``: adjacent stages of a factorized chain (a 1x1 stage and its neighbour) multiplied
  into one where that needs fewer multiply-adds (`speed.fold.merge_chains`);
- ``channels_last``: conv weights and the 4-D input in `torch.channels_last` (`speed.layout`).

Each lever is tried on the model as it stands after the previous ones (always in the order
fold_bn, merge_1x1, channels_last, whatever order `levers` lists them in) and kept only if

1. the outputs still match the model before the lever: relative error ||y' - y|| / ||y|| at most
   `tol` (default 1e-4 for float32/float64 models, 1e-2 for float16/bfloat16), on every output
   tensor, on `example_input`; and
2. the whole model is measured faster: the model before and after the lever timed alternately
   (`search.timing.compare_models`, torch's current thread count), faster both in the best of
   `rounds` medians and in the median over rounds of the paired ratio after / before.

After the levers, every factorized layer (one that has a dense equivalent, `to_dense()`) is timed
against that dense equivalent on its own input in the final model; layers measured slower are
listed in the last decision's `slower_than_dense` (the levers do not replace them: that is a
choice for the search, which trades their speed against the compression).

The returned model is for inference only: folded BatchNorms no longer normalize by batch
statistics, so training it afterwards is wrong. Save the model from before the levers (its
state dict matches the plan); apply the levers again after loading.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._nested import tensors_in
from tensorslim.core.discover import run_model
from tensorslim.errors import TensorSlimError
from tensorslim.io import LEVERS_ATTR, LEVERS_BASE_ATTR  # noqa: F401  (re-exported)
from tensorslim.search.timing import Latency, compare_calls, compare_models

LEVER_NAMES: tuple[str, ...] = ("fold_bn", "merge_1x1", "channels_last")
DEFAULT_LEVERS: tuple[str, ...] = ("fold_bn", "channels_last", "merge_1x1")


@dataclass
class LeverDecision:
    """What one lever did: whether it was kept, the whole model's ms before and after (None where it
    was not timed), why, and what it touched (`touched`: BatchNorms folded, chains merged, convs
    converted; `details`: one line per touched module)."""

    name: str
    kept: bool
    ms_before: float | None
    ms_after: float | None
    reason: str
    touched: int = 0
    details: list[str] = field(default_factory=list)
    max_rel_error: float | None = None
    threads: int = field(default_factory=torch.get_num_threads)
    slower_than_dense: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """ms_before / ms_after (above 1: the lever made the model faster)."""
        if self.ms_before is None or not self.ms_after:
            return None
        return self.ms_before / self.ms_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kept": self.kept,
            "ms_before": self.ms_before,
            "ms_after": self.ms_after,
            "reason": self.reason,
            "touched": self.touched,
            "details": list(self.details),
            "max_rel_error": self.max_rel_error,
            "threads": self.threads,
            "slower_than_dense": list(self.slower_than_dense),
        }


def default_tolerance(model: nn.Module) -> float:
    """The relative output error a lever may cause: 1e-4 (float32/64 weights), 1e-2 (16-bit)."""
    for p in model.parameters():
        if p.is_floating_point():
            return 1e-2 if torch.finfo(p.dtype).bits <= 16 else 1e-4
    return 1e-4


def relative_error(reference: Any, output: Any) -> float:
    """Largest ||y' - y|| / ||y|| over the floating-point tensors of two model outputs (inf where
    their structure or shapes differ; absolute error where ||y|| = 0)."""
    ref, out = tensors_in(reference), tensors_in(output)
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        diff = float(torch.linalg.vector_norm(b64 - a64))
        norm = float(torch.linalg.vector_norm(a64))
        err = diff / norm if norm > 0 else diff
        if err != err:  # NaN
            return float("inf")
        worst = max(worst, err)
    return worst


# A lever: (model, example_input) -> (new model, number touched, detail lines, reason if none).
LeverFn = Callable[[nn.Module, Any], tuple[nn.Module, int, list[str], str]]


def _lever_fold(model: nn.Module, example_input: Any) -> tuple[nn.Module, int, list[str], str]:
    from tensorslim.speed.fold import fold_report

    report = fold_report(model, example_input)
    details = [f"{bn} -> {conv}" for bn, conv in report.folded]
    details += [f"{bn} not folded: {why}" for bn, why in report.skipped.items()]
    why = "no BatchNorm fed by a conv alone" if not report.skipped else "; ".join(details)
    return report.model, len(report.folded), details, why


def _lever_merge(model: nn.Module, example_input: Any) -> tuple[nn.Module, int, list[str], str]:
    from tensorslim.speed.fold import merge_chains

    new, details = merge_chains(model, example_input)
    return new, len(details), details, "no chain has stages whose merge needs fewer multiply-adds"


def _lever_channels_last(
    model: nn.Module, example_input: Any
) -> tuple[nn.Module, int, list[str], str]:
    from tensorslim.speed.layout import to_channels_last

    new, n = to_channels_last(model, example_input)
    return new, n, [f"{n} Conv2d layers in channels_last"] if n else [], "no Conv2d fed 4-D input"



LEVERS: dict[str, LeverFn] = {
    "fold_bn": _lever_fold,
    "merge_1x1": _lever_merge,
    "channels_last": _lever_channels_last,
}


def apply_levers(
    model: nn.Module,
    example_input: Any,
    *,
    levers: Sequence[str] = DEFAULT_LEVERS,
    rounds: int = 3,
    tol: float | None = None,
    min_run_time: float = 0.1,
    check_dense: bool = True,
) -> tuple[nn.Module, list[LeverDecision]]:
    """A new inference model (eval mode) with each lever of `levers` kept where it keeps the
    outputs within `tol` (relative, see `default_tolerance`) and measures faster on the whole
    model on `example_input`; one LeverDecision per lever, in the order applied. With
    `check_dense`, the last decision lists the factorized layers still slower than dense."""
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        raise TensorSlimError(f"unknown lever(s) {unknown}; known: {list(LEVER_NAMES)}")
    if rounds < 1:
        raise TensorSlimError(f"rounds must be >= 1, got {rounds}")
    current = copy.deepcopy(model).eval()
    tol = default_tolerance(current) if tol is None else float(tol)
    reference = run_model(current, example_input)
    decisions: list[LeverDecision] = []
    for name in [n for n in LEVER_NAMES if n in levers]:
        candidate, touched, details, why = LEVERS[name](current, example_input)
        if touched == 0:
            decisions.append(LeverDecision(name, False, None, None, f"nothing to do: {why}"))
            continue
        candidate.eval()
        err = relative_error(reference, run_model(candidate, example_input))
        if err > tol:
            decisions.append(
                LeverDecision(
                    name,
                    False,
                    None,
                    None,
                    f"outputs changed: relative error {err:.3g} > {tol:.3g}",
                    touched,
                    details,
                    err,
                )
            )
            continue
        before, after = compare_models([current, candidate], example_input, rounds, min_run_time)
        kept = _faster(before, after)
        verdict = "faster" if kept else "not faster"
        decisions.append(
            LeverDecision(
                name,
                kept,
                before.median_ms,
                after.median_ms,
                f"{verdict} on the whole model ({before.median_ms:.4g} -> "
                f"{after.median_ms:.4g} ms, best of {rounds} alternating medians)",
                touched,
                details,
                err,
            )
        )
        if kept:
            current = candidate
            reference = run_model(current, example_input)
    if check_dense and decisions:
        decisions[-1].slower_than_dense = slower_than_dense(
            current, example_input, rounds=rounds, min_run_time=min(min_run_time, 0.05)
        )
    kept = tuple(d.name for d in decisions if d.kept)
    if kept:  # a plain attribute (not a submodule): tensorslim.save refuses or redirects it
        current.__dict__[LEVERS_ATTR] = (*getattr(model, LEVERS_ATTR, ()), *kept)
    return current, decisions


def _faster(before: Latency, after: Latency) -> bool:
    """Faster by both measures: the best-of-rounds median, and the median over rounds of the
    paired ratio after / before (each round times both back to back, so a load change between
    rounds affects both alike)."""
    ratios = [a / b for a, b in zip(after.round_medians_ms, before.round_medians_ms) if b > 0]
    paired = statistics.median(ratios) if ratios else 0.0
    return after.median_ms < before.median_ms and paired < 1.0


def _dense_equivalent(module: nn.Module) -> nn.Module | None:
    """The dense layer a factorized module computes (its `to_dense()`, or the one recorded by a
    merge), or None for modules without one."""
    dense = getattr(module, "dense_equivalent", None)
    if callable(dense):
        return dense()
    from tensorslim.layers.additive import Compressed

    if isinstance(module, Compressed) and callable(getattr(module, "to_dense", None)):
        try:
            return module.to_dense()
        except (NotImplementedError, RuntimeError, ValueError):
            return None
    return None


def slower_than_dense(
    model: nn.Module, example_input: Any, *, rounds: int = 3, min_run_time: float = 0.05
) -> list[str]:
    """Names of the factorized layers of `model` whose measured latency on their own input (as
    the model runs on `example_input`) is not below their dense equivalent's, each as
    "name (x ms vs dense y ms)". Layers are timed alternately with their dense equivalent."""
    pairs: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in pairs):
            continue
        dense = _dense_equivalent(module)
        if dense is not None:
            pairs[name] = (module, dense.eval())
    if not pairs:
        return []
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, (module, _) in pairs.items():

        def hook(mod, args, name=name):
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    slow: list[str] = []
    with torch.inference_mode():
        for name, (module, dense) in pairs.items():
            x = inputs.get(name)
            if x is None:
                continue
            if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
                dense = dense.to(memory_format=torch.channels_last)
            mine, ref = compare_calls(
                [lambda m=module, x=x: m(x), lambda m=dense, x=x: m(x)], rounds, min_run_time
            )
            if mine.median_ms >= ref.median_ms:
                slow.append(f"{name} ({mine.median_ms:.3g} ms vs dense {ref.median_ms:.3g} ms)")
    return slow
