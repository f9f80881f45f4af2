"""Sequential calibration: build the compressed model layer group by layer group in execution
order, each group from the inputs the already compressed earlier layers give it.

For every matrix of a group's layers, the calibration batches run through the original model and
through the partly compressed model in turn; the rows X (original) and X~ (compressed model) of
the same batch are paired, and three n x n Grams are summed in float64 (G~ = X~^T X~,
C = X^T X~, G = X^T X). Nothing else is kept: the rows of one batch and one group live only until
the batch's Grams are added. The group's layers are then built from those statistics
(compressors/_factors: a whitened layer is whitened by G~, and the output-side factor of every
low-rank layer is refit in closed form so that the layer reproduces the original outputs W X^T
from X~; whole-layer compressors such as Tucker-2 see G~ as their Gram) and set into the
compressed model before the next group is calibrated.

A group is the layers that read the very same input tensor (q, k and v projections of an
attention block): none of them changes another's input, so one pass serves them all. Cost: two
forward passes over the calibration data per group.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.calibrate.collect import (
    LayerStats,
    _all_finite,
    _nonfinite_inputs_error,
    batch_name,
    numbered,
)
from tensorslim.core.discover import LayerInfo, run_model
from tensorslim.core.materialize import LayerJob, Options, build_layer
from tensorslim.core.modes import eval_mode
from tensorslim.core.surgery import get_submodule, replace_at
from tensorslim.errors import TensorSlimError

_HINT = "; calibration batches must be model inputs"


def as_batches(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches as a list (sequential calibration reads them once per group);
    an error while reading names the batch."""
    if isinstance(calibration, (list, tuple)):
        return list(calibration)
    return [b for _, b in numbered(calibration, lambda i: f"{batch_name(i)} from the calibration data")]


def execution_groups(
    model: nn.Module, layers: Sequence[LayerInfo], batch: Any, calls: dict[str, int] | None = None
) -> list[list[str]]:
    """Names of `layers` in the order the model first calls them on `batch`, grouped where
    consecutive layers read the same input tensor. Layers not called are left out. `calls`, if
    given, receives how often each layer ran."""
    order: list[tuple[str, bool]] = []  # (name, reads the previous layer's input tensor)
    seen: set[str] = set()
    counts = calls if calls is not None else {}
    # The previous first-called layer's input, kept referenced until the next one: compared by
    # address, and a freed tensor's memory can be reused for a later, different input (an MLP's
    # ReLU outputs of one shape alternate between two addresses), which must not look "same".
    last: list[Any] = [None]

    def key(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return None
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)

    def hook(name: str):
        def fn(_mod, args, kwargs, _out):
            counts[name] = counts.get(name, 0) + 1
            if name in seen:
                return
            seen.add(name)
            x = args[0] if args else next(iter(kwargs.values()), None)
            k = key(x)
            order.append((name, k is not None and k == key(last[0])))
            last[0] = x

        return fn

    hooks = [
        info.module.register_forward_hook(hook(info.name), with_kwargs=True) for info in layers
    ]
    try:
        run_model(model, batch, batch_name(0), _HINT)
    finally:
        for h in hooks:
            h.remove()
        last[0] = None
    groups: list[list[str]] = []
    for name, same in order:
        if groups and same:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


class _Done(TensorSlimError):
    """Raised by a hook to end a forward pass early (caught by paired_stats; a TensorSlimError so
    run_model lets it through unchanged)."""


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _Pairing:
    """Hooks pairing each matrix's rows in the original and the compressed model, batch by
    batch: the original model's run queues the rows, the compressed model's run consumes them."""

    def __init__(self, infos: dict[str, LayerInfo]) -> None:
        self.infos = infos
        self.queue: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.stats: dict[str, LayerStats] = {}
        for name, info in infos.items():
            st = LayerStats()
            for p in info.handler.weight_parameters(info.module):
                if p:
                    st.parts[p] = LayerStats()
            self.stats[name] = st
        self.index, self.batch = 0, None
        # early stop: a pass ends once every layer of the group ran as often as on batch 0
        self.expected: dict[str, int] = {}
        self.ran: dict[str, int] = {}
        # the Grams of one (X, X~) pair of row tensors, shared by the matrices reading them (q, k, v)
        self.shared: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def start_pass(self) -> None:
        self.ran = dict.fromkeys(self.infos, 0)

    def _count(self, name: str) -> None:
        self.ran[name] += 1
        if self.expected and all(self.ran[n] >= self.expected.get(n, 0) for n in self.infos):
            raise _Done

    def source_hook(self, name: str, module: nn.Module):
        handler = self.infos[name].handler

        def fn(_mod, args, kwargs, output):
            for part, x in handler.rows(module, args, kwargs, output).items():
                self.queue.setdefault((name, part), []).append(x.detach())
            self._count(name)

        return fn

    def target_hook(self, name: str, module: nn.Module):
        handler = self.infos[name].handler

        def fn(_mod, args, kwargs, output):
            self._pair(name, handler.rows(module, args, kwargs, output))
            self._count(name)

        return fn

    def _pair(self, name: str, rows: dict[str, torch.Tensor]) -> None:
        for part, xt in rows.items():
            queued = self.queue.get((name, part))
            if not queued:
                raise TensorSlimError(
                    f"sequential calibration: layer {name!r} ran more often in the compressed "
                    f"model than in the original on {batch_name(self.index)}"
                )
            x = queued.pop(0)
            if x.shape != xt.shape:
                raise TensorSlimError(
                    f"sequential calibration: the inputs of layer {name!r} differ in shape "
                    f"between the original ({tuple(x.shape)}) and the compressed model "
                    f"({tuple(xt.shape)}) on {batch_name(self.index)}"
                )
            self._add(name, part, x, xt)

    def _add(self, name: str, part: str, x: torch.Tensor, xt: torch.Tensor) -> None:
        st = self.stats[name].part(part)
        key = (_identity(x), _identity(xt))
        if key not in self.shared:
            x64, xt64 = x.to(torch.float64), xt.to(torch.float64)
            gt = xt64.T @ xt64
            if not _all_finite(gt):
                raise _nonfinite_inputs_error(name, part, self.index, self.batch, xt)
            # x and xt are kept with their Grams until the batch ends, so that no other tensor
            # can take their address (and key) in the meantime
            self.shared[key] = (gt, x64.T @ x64, x64.T @ xt64, x, xt)
        gt, g, c, _, _ = self.shared[key]
        if st.gram is None:
            gt, g, c = gt.clone(), g.clone(), c.clone()
            st.gram, st.source_gram, st.cross = gt, g, c
        else:
            st.gram.add_(gt)
            st.source_gram.add_(g)
            st.cross.add_(c)
        st.rows += x.shape[0]


def paired_stats(
    original: nn.Module,
    current: nn.Module,
    infos: dict[str, LayerInfo],
    batches: Sequence[Any],
    calls: dict[str, int] | None = None,
) -> dict[str, LayerStats]:
    """Sequential statistics of each layer in `infos` (named as in both models): gram (the
    compressed model's inputs), source_gram (the original's) and cross, per matrix part.
    calls: how often each layer runs per batch; a forward pass stops (the rest of the model is
    not run) once every layer of `infos` ran that often."""
    pairing = _Pairing(infos)
    pairing.expected = dict(calls or {})
    for index, batch in enumerate(batches):
        pairing.index, pairing.batch = index, batch
        pairing.shared.clear()
        for model, make in ((original, pairing.source_hook), (current, pairing.target_hook)):
            mods = {name: get_submodule(model, name) for name in infos}
            hooks = [m.register_forward_hook(make(n, m), with_kwargs=True) for n, m in mods.items()]
            pairing.start_pass()
            try:
                run_model(model, batch, batch_name(index), _HINT)
            except _Done:
                pass
            finally:
                for h in hooks:
                    h.remove()
        left = [k for k, v in pairing.queue.items() if v]
        if left:
            raise TensorSlimError(
                f"sequential calibration: layer {left[0][0]!r} ran more often in the original "
                f"model than in the compressed one on {batch_name(index)}"
            )
    return pairing.stats


def _with_stats(st: LayerStats, seq: LayerStats) -> LayerStats:
    """The layer's statistics with the sequential Grams in place of the original Gram (the
    Fisher estimate and the samples stay those of the original model)."""

    def one(orig: LayerStats | None, new: LayerStats) -> LayerStats:
        base = orig if orig is not None else LayerStats()
        return dataclasses.replace(
            base, gram=new.gram, rows=new.rows, cross=new.cross, source_gram=new.source_gram,
            parts={}, cache={},
        )

    out = one(st, seq)
    out.parts = {p: one(st.parts.get(p) if st else None, s) for p, s in seq.parts.items()}
    return out


def sequential_materialize(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    jobs: dict[str, LayerJob],
    batches: Sequence[Any],
    *,
    options: Options | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with every job's layer replaced, group by group in execution order, each
    built from sequential statistics; and facts for the plan's meta. The original model is not
    modified (both run in eval mode; the caller restores modes)."""
    out = copy.deepcopy(model)
    todo = [info for info in layers if info.compressible and jobs.get(info.name) and jobs[info.name].spec]
    by_name = {info.name: info for info in todo}
    plain: list[str] = []  # layers whose rows cannot be collected: built from the original stats
    for info in todo:
        if info.handler.calibration_reason(info.module) is not None:
            plain.append(info.name)
    calls: dict[str, int] = {}
    with eval_mode(model):
        groups = execution_groups(
            model, [by_name[n] for n in by_name if n not in plain], batches[0], calls
        )
    grouped = {name for g in groups for name in g}
    plain += [name for name in by_name if name not in grouped and name not in plain]
    passes = 0
    layered: list[str] = []  # stacked GRU/LSTM modules built layer by layer
    for group in track(groups, "Sequential calibration", progress):
        infos = {name: by_name[name] for name in group}
        with eval_mode(model), eval_mode(out):
            seq = paired_stats(model, out, infos, batches, calls)
        passes += 1
        for name, info in infos.items():
            job = jobs[name]
            module = get_submodule(out, name)
            if _stacked(module):
                new, facts, more = _build_stacked(
                    model, out, name, info, job, seq[name], batches, calls, options
                )
                passes += more
                if more:
                    layered.append(name)
            else:
                stats = _with_stats(info.site.stats, seq[name])
                site = dataclasses.replace(info.site, stats=stats)
                new, facts = build_layer(module, info.handler, job.spec, site, options=options)
            job.facts.update(facts)
            out = replace_at(out, job.names, new)
    for name in plain:  # no calibration view, or not called on the first batch
        job = jobs[name]
        info = by_name[name]
        module = get_submodule(out, name)
        new, facts = build_layer(module, info.handler, job.spec, info.site, options=options)
        job.facts.update(facts)
        out = replace_at(out, job.names, new)
    meta = {"groups": len(groups), "passes": 2 * passes * len(batches), "layers": len(todo)}
    if plain:
        meta["not_sequential"] = plain
    if layered:
        meta["layer_by_layer"] = layered
    return out, meta


def _stacked(module: nn.Module) -> bool:
    return isinstance(module, nn.RNNBase) and module.num_layers > 1


def _layer_of(part: str) -> int | None:
    """k of a stacked-gate matrix name weight_{ih,hh}_l{k}[_reverse]; None for other names."""
    tail = part.rsplit("_l", 1)[-1].removesuffix("_reverse")
    return int(tail) if "_l" in part and tail.isdigit() else None


def _build_stacked(
    model: nn.Module,
    out: nn.Module,
    name: str,
    info: LayerInfo,
    job: LayerJob,
    first: LayerStats,
    batches: Sequence[Any],
    calls: dict[str, int],
    options: Options | None,
) -> tuple[nn.Module, dict[str, Any], int]:
    """A stacked nn.GRU / nn.LSTM built layer by layer: the matrices of inner layer k are fitted
    to the inputs that the already built layers 0..k-1 give it (the model's input comes from the
    compressed layers before the module, as for any layer). Pass k runs a dense copy of the
    module whose layers below k compute what the built ones do (their to_dense weights) and
    whose layers from k on are the original's, so layer k's rows (its input sequence, and h_{t-1}
    from the original layer k on that input) are those of the compressed stack. Every pass builds
    the whole module from the statistics gathered so far (layers below k from their own pass);
    the last build is returned, with its facts and the number of extra passes (num_layers - 1).
    `first`: the sequential statistics of the pass with the whole module dense (layer 0's)."""
    dense = get_submodule(out, name)
    gathered: dict[str, LayerStats] = {}

    def build(seq: LayerStats, k: int) -> tuple[nn.Module, dict[str, Any]]:
        for part, st in seq.parts.items():
            if _layer_of(part) == k:
                gathered[part] = st
        merged = dataclasses.replace(seq, parts={**seq.parts, **gathered}, cache={})
        site = dataclasses.replace(info.site, stats=_with_stats(info.site.stats, merged))
        return build_layer(dense, info.handler, job.spec, site, options=options)

    new, facts = build(first, 0)
    if not (hasattr(new, "to_dense") or isinstance(new, nn.RNNBase)):
        # a module that cannot show its layers as stock weights: the whole stack as one block
        warnings.warn(
            f"sequential calibration: {name!r} was compressed into a {type(new).__name__}, "
            "which has no dense view of its layers; its inner layers are fitted to the outputs "
            "of the dense lower layers",
            stacklevel=4,
        )
        return new, facts, 0
    for k in range(1, dense.num_layers):
        probe = copy.deepcopy(dense)
        built = new.to_dense() if hasattr(new, "to_dense") else new
        with torch.no_grad():
            for pname, p in built.named_parameters():
                layer = _layer_of(pname)
                if layer is not None and layer < k:
                    getattr(probe, pname).copy_(p)
        probe.flatten_parameters()
        current = replace_at(out, job.names, probe)
        with eval_mode(current):
            seq = paired_stats(model, current, {name: info}, batches, calls)[name]
        new, facts = build(seq, k)
    return new, facts, dense.num_layers - 1

