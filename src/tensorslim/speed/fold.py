"""Exact algebraic folds for inference: BatchNorm into the conv that feeds it, and adjacent stages
of a factorized chain multiplied into one where that needs fewer multiply-adds.

BatchNorm folding (Ioffe & Szegedy 2015, eq. of Alg. 2 in inference form; Jacob et al. 2018,
sec. 3.2): an eval-mode BatchNorm computes y = gamma (x - mean) / sqrt(var + eps) + beta per
channel, so after a conv x = W * u + b it is the conv with, per output channel c,

    s_c = gamma_c / sqrt(var_c + eps),   W'_c = s_c W_c,   b'_c = (b_c - mean_c) s_c + beta_c.

The fold goes into dense nn.Conv1d/2d/3d (any groups), nn.Linear with a 2-D output, and the last
conv (or Linear) of tensorslim's factorized layers (LowRankConv, the Tucker-2 / CP / TT / spatial
chains, LowRankLinear); the BatchNorm becomes nn.Identity. Pairs are found on the example input,
so models that are not nn.Sequential (attribute-style modules as in Hugging Face ResNet /
MobileNetV2) work: a BatchNorm is folded when its input is the output of a conv-like module
called once, the BatchNorm is called once, and the autograd graph of the forward pass shows no
other consumer of that output (a residual add or a second branch reading the conv's output keeps
the BatchNorm). Every fold is then verified: outputs must match the unfolded model within a
relative error `tol`; folds that do not are undone one by one.

Inference only: a folded model no longer normalizes by batch statistics and its running
statistics are gone; training it afterwards is wrong. BatchNorms in training mode are left alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._nested import tensors_in
from tensorslim.core.discover import run_model
from tensorslim.core.modes import eval_mode
from tensorslim.core.surgery import get_submodule, replace_at
from tensorslim.errors import TensorSlimError
from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.lowrank_linear import LowRankLinear
from tensorslim.layers.tensor_conv import FactorizedConv

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DENSE_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRODUCERS = (LowRankConv, FactorizedConv, LowRankLinear, *_DENSE_CONV, nn.Linear)


@dataclass
class FoldReport:
    """The folded model, the (batchnorm, conv) names folded and, per BatchNorm left alone, why."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    max_rel_error: float = 0.0


def fold_batchnorm(
    model: nn.Module, example_input: Any, *, tol: float | None = None
) -> tuple[nn.Module, int]:
    """A copy of `model` with every foldable eval-mode BatchNorm folded into the conv feeding it
    (see the module docstring), and the number folded. `model` is untouched. TensorSlimError if a
    BatchNorm is in training mode (fold for inference only: call model.eval() first)."""
    training = [n for n, m in model.named_modules() if isinstance(m, _BN) and m.training]
    if training:
        raise TensorSlimError(
            f"BatchNorm folding is for inference only and {len(training)} BatchNorm layer(s) are "
            f"in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): "
            "call model.eval() first; a folded model must not be trained afterwards"
        )
    report = fold_report(model, example_input, tol=tol)
    return report.model, len(report.folded)


def fold_report(model: nn.Module, example_input: Any, *, tol: float | None = None) -> FoldReport:
    """Fold what can be folded in a copy of `model`; say why each other BatchNorm was left."""
    from tensorslim.speed.levers import default_tolerance, relative_error

    tol = default_tolerance(model) if tol is None else tol
    pairs, skipped = find_conv_bn_pairs(model, example_input)
    report = FoldReport(copy.deepcopy(model), skipped=skipped)
    if not pairs:
        return report
    reference = _run_eval(model, example_input)
    for bn_name, conv_name in pairs:
        _fold_pair(report.model, bn_name, conv_name)
    err = relative_error(reference, _run_eval(report.model, example_input))
    if err <= tol:
        report.folded, report.max_rel_error = pairs, err
        return report
    # Some fold changed the output: redo them one at a time, keeping those that verify.
    report.model = copy.deepcopy(model)
    for bn_name, conv_name in pairs:
        trial = copy.deepcopy(report.model)
        _fold_pair(trial, bn_name, conv_name)
        err = relative_error(reference, _run_eval(trial, example_input))
        if err <= tol:
            report.model, report.max_rel_error = trial, max(report.max_rel_error, err)
            report.folded.append((bn_name, conv_name))
        else:
            report.skipped[bn_name] = f"folding into {conv_name} changed the output ({err:.3g})"
    return report


def _run_eval(model: nn.Module, example_input: Any) -> Any:
    """The model's output in eval mode (flags restored): no running statistics are updated and
    dropout is off; BatchNorms left in training mode use their running statistics in both models
    compared, so a comparison is still of like with like."""
    with eval_mode(model):
        return run_model(model, example_input)


def _call_with_grad(model: nn.Module, example_input: Any) -> Any:
    with eval_mode(model):
        return run_model(model, example_input, "the example input while looking for BatchNorms to "
                         "fold", grad=True)  # fmt: skip


def _producer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost conv-like modules by name (a chain's inner convs are not listed apart)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in found if p) or (found and "" in found):
            continue
        if isinstance(module, _PRODUCERS) and not isinstance(
            module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            found[name] = module
    return found


def find_conv_bn_pairs(
    model: nn.Module, example_input: Any
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(batchnorm name, conv name) pairs that can be folded, and for every other BatchNorm why
    not, found by running `model` once on `example_input` in eval mode with hooks and reading the
    autograd graph of that pass (modes, hooks and requires_grad flags restored afterwards; BatchNorm
    in training mode is reported, not folded)."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    if not bns:
        return [], {}
    producers = _producer_names(model)
    calls: dict[str, int] = {}
    produced: dict[Any, tuple[str, int]] = {}  # grad_fn of the output -> (producer, ndim)
    bn_inputs: dict[str, Any] = {}
    handles = []

    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    for name, module in producers.items():

        def after(mod, args, out, name=name):
            count(name)
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                produced[out.grad_fn] = (name, out.ndim)

        handles.append(module.register_forward_hook(after))
    for name, module in bns.items():

        def before(mod, args, name=name):
            count(name)
            x = args[0] if args else None
            bn_inputs[name] = x.grad_fn if isinstance(x, torch.Tensor) else None

        handles.append(module.register_forward_pre_hook(before))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            if p.is_floating_point():
                p.requires_grad_(True)
        output = _call_with_grad(model, example_input)
        consumers = _consumer_counts(output)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    del output

    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for bn_name, bn in bns.items():
        why = _bn_reason(bn, calls.get(bn_name, 0))
        node = bn_inputs.get(bn_name)
        src = produced.get(node) if node is not None else None
        if why is None and src is None:
            why = "its input is not the output of a conv or linear layer"
        if why is None:
            conv_name, ndim = src
            conv = producers[conv_name]
            why = _producer_reason(conv, bn, ndim, calls.get(conv_name, 0))
            uses = consumers.get(node, 0)
            if why is None and uses == 0:
                why = f"no autograd graph leads from {conv_name}'s output to the model's output"
            elif why is None and uses != 1:
                why = f"the output of {conv_name} is also used elsewhere (e.g. a residual add)"
            if why is None:
                pairs.append((bn_name, conv_name))
                continue
        skipped[bn_name] = why
    return pairs, skipped


def _consumer_counts(output: Any) -> dict[Any, int]:
    """For every autograd node reachable from the output tensors: how many edges lead to it (an
    output tensor itself counts as one consumer)."""
    counts: dict[Any, int] = {}
    stack = []
    for t in tensors_in(output):
        if t.grad_fn is not None:
            counts[t.grad_fn] = counts.get(t.grad_fn, 0) + 1
            stack.append(t.grad_fn)
    seen = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts[nxt] = counts.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def _bn_reason(bn: nn.Module, calls: int) -> str | None:
    if bn.training:
        return "in training mode (it normalizes by batch statistics; fold after model.eval())"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    if calls != 1:
        return f"called {calls} times in one forward pass"
    return None


def _last_stage(module: nn.Module) -> nn.Module:
    """The conv or Linear that computes a producer's output."""
    if isinstance(module, (LowRankConv, LowRankLinear)):
        return module.second
    if isinstance(module, FactorizedConv):
        return module[-1]
    return module


def _producer_reason(conv: nn.Module, bn: nn.Module, ndim: int, calls: int) -> str | None:
    last = _last_stage(conv)
    if calls != 1:
        return "the conv feeding it is called more than once (shared weights)"
    out_channels = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    if out_channels != bn.num_features:
        return f"channel count differs ({out_channels} vs {bn.num_features})"
    if isinstance(last, nn.Linear):
        if ndim != 2:
            return "a Linear whose output is not (N, C) does not share BatchNorm's channel axis"
    elif ndim != last.weight.ndim:
        return "unbatched conv output"
    if not last.weight.is_floating_point():
        return "the conv's weight is not floating point"
    return None


@torch.no_grad()
def fold_into(last: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode `bn` into the conv or Linear `last` in place (adds a bias if it had none)."""
    w = last.weight
    work = torch.float64
    var = bn.running_var.to(work)
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.to(work)
    shift = -bn.running_mean.to(work) * s
    if bn.bias is not None:
        shift = shift + bn.bias.to(work)
    b = last.bias.to(work) * s + shift if last.bias is not None else shift
    w.copy_((w.to(work) * s.reshape(-1, *([1] * (w.ndim - 1)))).to(w.dtype))
    if last.bias is None:
        last.bias = nn.Parameter(b.to(dtype=w.dtype, device=w.device))
    else:
        last.bias.copy_(b.to(last.bias.dtype))


def _fold_pair(model: nn.Module, bn_name: str, conv_name: str) -> None:
    conv = get_submodule(model, conv_name)
    bn = get_submodule(model, bn_name)
    fold_into(_last_stage(conv), bn)
    if isinstance(conv, FactorizedConv) and not conv.geometry.bias:
        conv.geometry = dataclasses.replace(conv.geometry, bias=True)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is bn]
    replace_at(model, names, nn.Identity())


# --------------------------------------------------------------------------------------------
# Merging adjacent stages of a factorized chain


class MergedChain(nn.Sequential):
    """A factorized chain after some adjacent stages were multiplied together (inference only).
    `dense_equivalent()` is the dense layer of the chain it came from."""

    def __init__(self, stages: list[nn.Module], source: nn.Module) -> None:
        super().__init__(*stages)
        self.__dict__["_source"] = source  # not a submodule: not in the state dict

    def dense_equivalent(self) -> nn.Module:
        return self.__dict__["_source"].to_dense()


def _stages(module: nn.Module) -> list[nn.Module] | None:
    if isinstance(module, (LowRankConv, LowRankLinear)):
        return [module.first, module.second]
    if isinstance(module, FactorizedConv):
        return list(module)
    return None


def _is_pointwise(conv: nn.Module) -> bool:
    """A per-position channel map: 1x1 kernel, stride 1, no padding, one group."""
    if isinstance(conv, nn.Linear):
        return True
    pad = conv.padding
    no_pad = pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad))
    return (
        all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and no_pad
        and conv.groups == 1
    )


def _macs(stage: nn.Module, positions: int) -> int:
    if isinstance(stage, nn.Linear):
        return positions * stage.in_features * stage.out_features
    k = math.prod(stage.kernel_size)
    return positions * stage.out_channels * (stage.in_channels // stage.groups) * k


@torch.no_grad()
def merge_pair(a: nn.Module, b: nn.Module) -> nn.Module | None:
    """One stock layer computing b(a(x)) exactly, or None where no exact merge exists: a pointwise
    stage after a conv (the conv's geometry, W = W_b W_a), or a bias-free pointwise stage before
    a conv (the conv's geometry: padding commutes with a bias-free channel map). Both groups=1."""
    if isinstance(a, nn.Linear) != isinstance(b, nn.Linear):
        return None
    if isinstance(a, nn.Linear):
        new = nn.Linear(
            a.in_features, b.out_features, bias=a.bias is not None or b.bias is not None
        )
        new = new.to(device=b.weight.device, dtype=b.weight.dtype)
        new.weight.copy_(b.weight @ a.weight)
        if new.bias is not None:
            bias = b.weight @ a.bias if a.bias is not None else torch.zeros_like(new.bias)
            new.bias.copy_(bias + (b.bias if b.bias is not None else 0))
        return new
    if a.groups != 1 or b.groups != 1 or type(a) is not type(b):
        return None
    if _is_pointwise(b):
        geo, w = a, torch.einsum("om,mi...->oi...", b.weight.flatten(1), a.weight)
        bias = None
        if a.bias is not None:
            bias = b.weight.flatten(1) @ a.bias
        if b.bias is not None:
            bias = b.bias.clone() if bias is None else bias + b.bias
    elif _is_pointwise(a) and a.bias is None:
        geo, w = b, torch.einsum("om...,mi->oi...", b.weight, a.weight.flatten(1))
        bias = None if b.bias is None else b.bias.clone()
    else:
        return None
    new = type(geo)(
        a.in_channels,
        b.out_channels,
        geo.kernel_size,
        stride=geo.stride,
        padding=geo.padding,
        dilation=geo.dilation,
        padding_mode=geo.padding_mode,
        bias=bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    new.weight.copy_(w)
    if bias is not None:
        new.bias.copy_(bias)
    if a.weight.ndim == 4 and a.weight.is_contiguous(memory_format=torch.channels_last):
        new = new.to(memory_format=torch.channels_last)
    return new


def _positions(model: nn.Module, stages: dict[str, list[nn.Module]], example_input: Any):
    """Output positions (per output channel, whole batch) of every stage on the example input."""
    seen: dict[int, int] = {}
    handles = []
    for chain in stages.values():
        for stage in chain:

            def hook(mod, args, out):
                if isinstance(out, torch.Tensor) and id(mod) not in seen:
                    ch = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                    seen[id(mod)] = out.numel() // ch

            handles.append(stage.register_forward_hook(hook))
    try:
        _run_eval(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def plan_merges(stages: list[nn.Module], positions: list[int]) -> list[nn.Module]:
    """Greedily merge the adjacent pair that saves the most multiply-adds until none saves any;
    returns the new stage list (the input list's stages where unmerged)."""
    stages, positions = list(stages), list(positions)
    while len(stages) > 1:
        best = None
        for i in range(len(stages) - 1):
            merged = merge_pair(stages[i], stages[i + 1])
            if merged is None:
                continue
            pos = positions[i + 1]
            saved = _macs(stages[i], positions[i]) + _macs(stages[i + 1], pos) - _macs(merged, pos)
            if saved > 0 and (best is None or saved > best[0]):
                best = (saved, i, merged)
        if best is None:
            break
        _, i, merged = best
        stages[i : i + 2] = [merged]
        positions[i : i + 2] = [positions[i + 1]]
    return stages


def merge_chains(model: nn.Module, example_input: Any) -> tuple[nn.Module, list[str]]:
    """A copy of `model` in which each factorized chain (LowRankConv, LowRankLinear, the tensor
    conv chains) has its adjacent stages merged where that needs fewer multiply-adds on the
    example input (`plan_merges`), and one line per chain changed. A chain merged to one stage
    becomes that stock layer (its dense form); others become a MergedChain. Exact up to rounding."""
    model = copy.deepcopy(model)
    chains = {n: s for n, m in model.named_modules() if (s := _stages(m)) is not None}
    if not chains:
        return model, []
    pos = _positions(model, chains, example_input)
    details: list[str] = []
    for name, stages in chains.items():
        if any(id(s) not in pos for s in stages):
            continue  # not run on the example input
        new_stages = plan_merges(stages, [pos[id(s)] for s in stages])
        if len(new_stages) == len(stages):
            continue
        source = get_submodule(model, name)
        new = new_stages[0] if len(new_stages) == 1 else MergedChain(new_stages, source)
        new.train(source.training)
        names = [n for n, m in model.named_modules(remove_duplicate=False) if m is source]
        model = replace_at(model, names, new)
        details.append(f"{name}: {len(stages)} stages -> {len(new_stages)}")
    return model, details
