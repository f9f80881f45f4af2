"""The learning-compression (LC) algorithm and its direct-compression baselines.

Carreira-Perpinan (2017), "Model compression as constrained optimization, with application to neural
nets. Part I: general framework", Sec. 4 (augmented Lagrangian, Eq. 5-7): min_w L(w) subject to
w = Delta(Theta). Direct compression first (mu = 0: Theta = Pi(w_reference), lambda = 0); then for
each mu_k of an increasing schedule:

- L step: w = argmin L(w) + mu/2 ||w - Delta(Theta) - lambda/mu||^2 (SGD from the current w);
- C step: Theta = Pi(w - lambda/mu), the compressor's exact projection per matrix (lc.cstep; a sum
  of components by alternation, Idelbayev & Carreira-Perpinan 2021);
- multipliers: lambda = lambda - mu (w - Delta(Theta)) (lagrangian=False: the quadratic penalty
  method, lambda = 0).

The returned model uses w = Delta(Theta), built through core.materialize.build_layer (deployable
modules: low-rank factors, codebooks, sparse values, summed), with a Plan that tensorslim.save and
tensorslim.load understand. Only the weight matrices named by the specs are constrained; every
other parameter (biases, BatchNorm) trains freely in the L steps.

Baselines (`finetune`): direct compression, then the same schedule of training epochs and learning
rates without the penalty, kept feasible in one of two ways: how="reproject" trains the dense
weights from w = Delta(Pi(w)) and projects them again after every chunk (the "iterated direct
compression" of Carreira-Perpinan 2017, Sec. 5); how="modules" trains the parameters of the
compressed modules themselves (low-rank factors, codebooks, kept values) and never leaves the form.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tensorslim.lc.checkpoint as ckpt
from tensorslim._progress import bar
from tensorslim._version import __version__
from tensorslim.core.discover import LayerInfo, find_layers
from tensorslim.core.materialize import LayerJob, build_layer, reconstructed
from tensorslim.core.modes import eval_mode
from tensorslim.core.spec import Component, spec_to_json
from tensorslim.core.surgery import get_submodule, replace_at
from tensorslim.errors import TensorSlimError, is_int, short_repr
from tensorslim.lc.cstep import Projection, c_step
from tensorslim.lc.data import LabeledData
from tensorslim.lc.lstep import Loss, l_step, recalibrate_bn
from tensorslim.lc.schedule import Schedule
from tensorslim.lc.units import Choice, Unit, choose, every_layer, parse_specs
from tensorslim.plan import Plan
from tensorslim.plan.account import layer_plan, make_plan

MODES = ("lc", "reproject", "modules")
Evaluate = Callable[[nn.Module], Any]


@dataclass
class LCResult:
    """What an LC (or baseline) run did. `history`: one record per LC step (mu, lr, mean task
    loss and penalty of the L step, the constraint violation ||w - Delta(Theta)||^2 summed over the
    compressed matrices and its value relative to ||w||^2 (square-rooted), C-step rounds, selected
    ranks, seconds, `evaluate`'s answer on the model at w = Delta(Theta)); `direct`: the same for the
    direct compression. `build_error`: the largest ||W_built - Delta|| / ||Delta|| over the layers
    (the built modules compute with Delta(Theta) up to float rounding). `recalibrated`: batches
    the BatchNorm statistics were re-estimated on."""

    plan: Plan
    mode: str
    history: list[dict[str, Any]]
    direct: dict[str, Any]
    seconds: float
    resumed_at: int = 0
    checkpoint: Path | None = None
    build_error: float = 0.0
    specs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    recalibrated: int = 0

    @property
    def compression_ratio(self) -> float:
        """Storage bits of the whole model before / after."""
        before, after = self.plan.model_bits_before, self.plan.model_bits_after
        return (before or 0) / max(1, after or 0)

    def summary(self) -> str:
        last = self.history[-1] if self.history else self.direct
        return (
            f"{self.mode}: {len(self.history)} steps, mu up to "
            f"{last.get('mu', 0.0):.3g}, relative violation {last.get('rel_violation', 0.0):.3g}, "
            f"{self.compression_ratio:.2f}x smaller than the dense model's storage, "
            f"{self.seconds:.1f} s"
        )


# -- public entry points ---------------------------------------------------------------------------
def compress(
    model: nn.Module,
    specs: Any,
    data: Any,
    loss: Loss | None = None,
    *,
    schedule: Schedule | Mapping[str, Any] | list[float] | None = None,
    lagrangian: bool = True,
    batch_size: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
    evaluate: Evaluate | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    recalibrate: int = 0,
) -> tuple[nn.Module, LCResult]:
    """Compress `model` by the LC algorithm; returns (compressed model, LCResult). `model` is
    not modified.

    specs: one spec for every compressible layer (a list of components, e.g.
    [{"kind": "lowrank", "rank": 8}], or one component) or {layer name or fnmatch pattern: spec}
    (the first pattern naming a layer wins; [] keeps it dense). A lowrank component may learn its
    rank: {"kind": "lowrank", "alpha": 1e-6, "criterion": "storage" | "flops"}. Budgets (keep=)
    are not supported here: pick specs, e.g. from tensorslim.compress's plan.
    data: (x, y) tensors (split into seeded batches of `batch_size`, default 64) or a list /
    DataLoader of (inputs, targets) batches, read every epoch. loss(output, targets) -> scalar
    tensor, default cross-entropy. schedule: a Schedule (mu_k = mu0 growth^k, L-step epochs or
    batches, optimizer, learning rate and its decay), a dict of its fields or a list of mu values.
    options: compressor options by kind.

    checkpoint: a folder written atomically after every LC step; calling again with the same
    arguments continues from it (resume=False refuses an existing checkpoint), and the result is
    identical to an uninterrupted run's (CPU; CUDA with deterministic algorithms). evaluate(model)
    (a number or a dict of numbers) is recorded after the direct compression and every step, on a
    copy at w = Delta(Theta) in eval mode. on_step(step, record) runs after each step's checkpoint
    (step counted from 1). progress: a rich bar with mu, the loss and the penalty.
    recalibrate: re-estimate BatchNorm statistics of the compressed model on this many training
    batches (lstep.recalibrate_bn; the statistics gathered in the L steps belong to w, not to
    Delta(Theta)).
    """
    return _run(
        "lc", model, specs, data, loss, schedule=schedule, lagrangian=lagrangian,
        batch_size=batch_size, seed=seed, checkpoint=checkpoint, resume=resume,
        progress=progress, options=options, evaluate=evaluate, on_step=on_step,
        recalibrate=recalibrate,
    )


def finetune(
    model: nn.Module,
    specs: Any,
    data: Any,
    loss: Loss | None = None,
    *,
    how: str = "reproject",
    schedule: Schedule | Mapping[str, Any] | list[float] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
    evaluate: Evaluate | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    recalibrate: int = 0,
) -> tuple[nn.Module, LCResult]:
    """The baseline of `compress`: direct compression, then as many chunks of training as the
    schedule has steps (same epochs or batches, optimizer and learning rates, no penalty), the
    weights kept feasible. how="reproject": train the dense weights and project them again after
    every chunk (iterated direct compression; mu of the schedule is used only by rank selection);
    how="modules": train the compressed modules' own parameters (factors, codebooks, kept values).
    Arguments and result as `compress`."""
    if how not in ("reproject", "modules"):
        raise TensorSlimError(f"how must be 'reproject' or 'modules'; got {short_repr(how)}")
    return _run(
        how, model, specs, data, loss, schedule=schedule, lagrangian=False,
        batch_size=batch_size, seed=seed, checkpoint=checkpoint, resume=resume,
        progress=progress, options=options, evaluate=evaluate, on_step=on_step,
        recalibrate=recalibrate,
    )


def direct(
    model: nn.Module,
    specs: Any,
    data: Any,
    *,
    schedule: Schedule | Mapping[str, Any] | list[float] | None = None,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    recalibrate: int = 0,
) -> tuple[nn.Module, LCResult]:
    """Direct compression alone (the LC algorithm's start, mu = 0: each matrix projected onto its
    form, no training); `data` only gives the layers' input shapes, `schedule` its first mu to a
    rank-selection component. Returns (compressed model, LCResult with an empty history)."""
    return _run(
        "lc", model, specs, data, None, schedule=schedule, lagrangian=True,
        batch_size=batch_size, seed=0, checkpoint=None, resume=True, progress=False,
        options=options, evaluate=None, on_step=None, steps=0, recalibrate=recalibrate,
    )


# -- the state of a run ----------------------------------------------------------------------------
@dataclass
class _State:
    """Per unit: the multipliers lambda (m x n), the components Delta_k and their parameters."""

    lam: list[torch.Tensor]
    deltas: list[list[torch.Tensor]]
    params: list[list[dict[str, Any]]]
    next_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    direct: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def total(self, i: int) -> torch.Tensor:
        out = self.deltas[i][0]
        for d in self.deltas[i][1:]:
            out = out + d
        return out


def _run(
    mode: str,
    model: nn.Module,
    specs: Any,
    data: Any,
    loss: Loss | None,
    *,
    schedule: Any,
    lagrangian: bool,
    batch_size: int | None,
    seed: int,
    checkpoint: str | Path | None,
    resume: bool,
    progress: bool,
    options: Mapping[str, Any] | None,
    evaluate: Evaluate | None,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    steps: int | None = None,
    recalibrate: int = 0,
) -> tuple[nn.Module, LCResult]:
    if not isinstance(model, nn.Module):
        raise TensorSlimError(f"model must be a torch nn.Module; got {type(model).__name__}")
    schedule = Schedule.coerce(schedule)
    loss_fn = loss if loss is not None else nn.functional.cross_entropy
    if not callable(loss_fn):
        raise TensorSlimError(f"loss must be a callable loss(output, targets); got {short_repr(loss)}")
    if not is_int(seed):
        raise TensorSlimError(f"seed must be an integer; got {short_repr(seed)}")
    for name, flag in (("lagrangian", lagrangian), ("resume", resume), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TensorSlimError(f"{name} must be True or False; got {short_repr(flag)}")
    if not is_int(recalibrate) or recalibrate < 0:
        raise TensorSlimError(
            f"recalibrate must be an integer >= 0 (batches); got {short_repr(recalibrate)}"
        )
    if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise TensorSlimError(f"checkpoint must be a folder path; got {short_repr(checkpoint)}")
    parsed = parse_specs(specs)
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        from tensorslim.io import check_output_dir

        check_output_dir(ck)  # before any work: a folder we may not replace is refused now
    source = LabeledData(data, batch_size, seed)
    work = copy.deepcopy(model)
    layers, choices = choose(work, parsed, source.example_input(), options)
    units = [u for c in choices for u in c.units]
    mus = schedule.mu_values()
    run_mus = mus if steps is None else mus[:steps]
    config = {
        "mode": mode,
        "specs": {k or "*": spec_to_json(v) for k, v in parsed.items()},
        "units": [[u.key, list(u.shape)] for u in units],
        "schedule": schedule.to_dict(),
        "lagrangian": lagrangian,
        "seed": seed,
        "data": source.fingerprint(),
        "params": [
            [n, list(p.shape), str(p.dtype).removeprefix("torch.")]
            for n, p in work.named_parameters()
        ],
        "options": {k: repr(v) for k, v in (options or {}).items()},
    }
    saved = ckpt.read(ck) if ck is not None else None
    if saved is not None:
        if not resume:
            raise TensorSlimError(
                f"checkpoint {str(ck)!r} holds a run already; resume it (resume=True, --resume) "
                "or name another folder"
            )
        ckpt.check_same_run(ck, saved[0], config)
    cuda = ckpt.cuda_indices(work)
    run = _Runner(mode, work, units, choices, source, loss_fn, schedule, run_mus, lagrangian,
                  options, evaluate, ck, cuda, config)
    with torch.random.fork_rng(devices=cuda):
        if saved is not None:
            state, net = run.restore(*saved)
        else:
            torch.manual_seed(seed)
            state, net = run.direct()
        resumed_at = state.next_step
        net = run.steps(state, net, progress, on_step)
        final, jobs, build_error = run.final(state, net)
        torch.manual_seed(seed)  # dropout while recalibrating: the same draws after a resume
        recalibrated = recalibrate_bn(final, source, recalibrate)
    plan = _plan(model, final, layers, choices, jobs, options, mode, schedule, lagrangian, seed,
                 state)
    plan.meta["lc"]["recalibrated_batches"] = recalibrated
    result = LCResult(
        plan=plan,
        mode=mode,
        history=state.history,
        direct=state.direct,
        seconds=state.seconds,
        resumed_at=resumed_at,
        checkpoint=ck,
        build_error=build_error,
        specs={j.names[0]: spec_to_json(j.spec) for j in jobs},
        recalibrated=recalibrated,
    )
    return final.eval(), result


class _Runner:
    """One run's fixed parts and its steps."""

    def __init__(self, mode, work, units, choices, source, loss_fn, schedule, mus, lagrangian,
                 options, evaluate, ck, cuda, config) -> None:
        self.mode, self.work, self.units, self.choices = mode, work, units, choices
        self.source, self.loss_fn, self.schedule, self.mus = source, loss_fn, schedule, mus
        self.lagrangian, self.options, self.evaluate = lagrangian, options, evaluate
        self.ck, self.cuda, self.config = ck, cuda, config

    # -- C step over all units ---------------------------------------------------------------
    def c_steps(self, state: _State | None, mu: float, offset: bool) -> list[Projection]:
        """Every unit's C step of w - lambda/mu (offset) or of w, warm-started from `state`."""
        out = []
        for i, u in enumerate(self.units):
            x = u.matrix().detach()
            if offset and mu > 0:
                x = x - state.lam[i] / mu
            start = None if state is None else state.deltas[i]
            params = None if state is None else state.params[i]
            try:
                out.append(c_step(x, u.parts, mu, start, params))
            except TensorSlimError as exc:
                raise TensorSlimError(f"{u.label}: {exc}") from None
        return out

    def _violation(self, state: _State) -> tuple[float, float]:
        num = den = 0.0
        for i, u in enumerate(self.units):
            w = u.matrix().detach().to(torch.float64)
            d = w - state.total(i).to(torch.float64)
            num += float((d * d).sum())
            den += float((w * w).sum())
        return num, math.sqrt(num / den) if den > 0 else 0.0

    def _ranks(self, state: _State) -> dict[str, list[int]]:
        return {
            u.key: [p["rank"] for p, part in zip(state.params[i], u.parts) if part.selects_rank]
            for i, u in enumerate(self.units)
            if any(part.selects_rank for part in u.parts)
        }

    def _evaluate(self, state: _State, net: nn.Module | None) -> Any:
        if self.evaluate is None:
            return None
        if net is None:  # a dense copy at w = Delta(Theta)
            net = copy.deepcopy(self.work)
            twins = {id(m): t for m, t in zip(self.work.modules(), net.modules())}
            for i, u in enumerate(self.units):
                module = twins[id(u.module)]
                param = u.handler.weight_parameters(module)[u.part]
                Unit(u.layer, u.part, module, u.handler, param, u.shape, u.parts, u.slots
                     ).set_matrix(state.total(i))
        with eval_mode(net), torch.no_grad():
            got = self.evaluate(net)
        if isinstance(got, Mapping):
            return {str(k): float(v) for k, v in got.items()}
        return float(got)

    # -- start: direct compression, or a checkpoint -----------------------------------------------
    def direct(self) -> tuple[_State, nn.Module | None]:
        t0 = time.perf_counter()
        mu0 = self.schedule.mu_values()[0]  # rank selection needs a mu: the schedule's first
        proj = self.c_steps(None, mu0, offset=False)
        state = _State(
            lam=[torch.zeros_like(u.matrix().detach()) for u in self.units],
            deltas=[p.values for p in proj],
            params=[p.params for p in proj],
        )
        viol, rel = self._violation(state)
        net = None
        if self.mode == "reproject":
            for i, u in enumerate(self.units):
                u.set_matrix(state.total(i))
        elif self.mode == "modules":
            net, _, _ = self.final(state, None)
        state.direct = {"violation": viol, "rel_violation": rel, "ranks": self._ranks(state),
                        "c_rounds": max(len(p.residuals) - 1 for p in proj)}
        ev = self._evaluate(state, net if net is not None else
                            (self.work if self.mode == "reproject" else None))
        if ev is not None:
            state.direct["eval"] = ev
        state.seconds = time.perf_counter() - t0
        return state, net

    def restore(self, progress: dict[str, Any], tensors: dict[str, torch.Tensor]):
        ck = self.ck
        try:
            next_step = int(progress["next_step"])
            history = list(progress["history"])
            direct = dict(progress["direct"])
            params = progress["params"]
            seconds = float(progress["seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ckpt.damaged(ck, f"progress field {exc}") from None
        if not (0 <= next_step <= len(self.mus)) or len(params) != len(self.units):
            raise ckpt.damaged(ck, "step counter or unit parameters out of range")
        lam, deltas = [], []
        for i, u in enumerate(self.units):
            like = u.matrix().detach()
            lam.append(ckpt.tensor(ck, tensors, f"lc/{i}/lambda", like))
            if not isinstance(params[i], list) or len(params[i]) != len(u.parts):
                raise ckpt.damaged(ck, f"parameters of {u.label}")
            deltas.append([
                ckpt.tensor(ck, tensors, f"lc/{i}/delta/{j}", like) for j in range(len(u.parts))
            ])
        state = _State(lam, deltas, [list(p) for p in params], next_step, history, direct, seconds)
        net = None
        if self.mode == "modules":
            net, _, _ = self.final(state, None)
            ckpt.load_model_state(ck, tensors, net)
        else:
            ckpt.load_model_state(ck, tensors, self.work)
        ckpt.restore_rng(ck, tensors, self.cuda)
        return state, net

    def save(self, state: _State, net: nn.Module | None) -> None:
        if self.ck is None:
            return
        model = net if net is not None else self.work
        tensors = ckpt.model_tensors(model)
        for i in range(len(self.units)):
            tensors[f"lc/{i}/lambda"] = state.lam[i]
            for j, d in enumerate(state.deltas[i]):
                tensors[f"lc/{i}/delta/{j}"] = d
        tensors.update(ckpt.rng_tensors(self.cuda))
        progress = {
            "config": self.config,
            "next_step": state.next_step,
            "history": state.history,
            "direct": state.direct,
            "params": state.params,
            "seconds": state.seconds,
        }
        ckpt.write(self.ck, tensors, progress)

    # -- the LC steps ------------------------------------------------------------------------------
    def steps(self, state: _State, net: nn.Module | None, progress: bool,
              on_step: Callable[[int, dict[str, Any]], None] | None) -> nn.Module | None:
        per = self.schedule.batches or (
            None if self.source.length is None else self.source.length * self.schedule.epochs
        )
        todo = len(self.mus) - state.next_step
        total = None if per is None else per * todo
        titles = {"lc": "LC", "reproject": "Fine-tuning (reproject)", "modules": "Fine-tuning"}
        fields = ("mu", "loss", "penalty") if self.mode == "lc" else ("loss",)
        with bar(progress, titles[self.mode], total, fields) as update:
            for k in range(state.next_step, len(self.mus)):
                t0 = time.perf_counter()
                record = self._step(k, state, net, update)
                record["seconds"] = round(time.perf_counter() - t0, 3)
                state.seconds += time.perf_counter() - t0
                state.history.append(record)
                state.next_step = k + 1
                self.save(state, net)
                if on_step is not None:
                    on_step(k + 1, record)
        return net

    def _step(self, k: int, state: _State, net: nn.Module | None, update) -> dict[str, Any]:
        mu = self.mus[k]
        record: dict[str, Any] = {"step": k + 1, "mu": mu, "lr": self.schedule.lr_at(k)}
        if self.mode == "modules":
            stats = l_step(net, self.source, self.loss_fn, self.schedule, k, update=update)
            record.update(stats)
            ev = self._evaluate(state, net)
            if ev is not None:
                record["eval"] = ev
            return record
        if self.mode == "lc":
            targets = [
                state.total(i) + (state.lam[i] / mu if self.lagrangian else 0.0)
                for i in range(len(self.units))
            ]
            stats = l_step(self.work, self.source, self.loss_fn, self.schedule, k,
                           units=self.units, targets=targets, mu=mu, update=update)
        else:  # reproject: plain training of the dense weights from w = Delta(Theta)
            stats = l_step(self.work, self.source, self.loss_fn, self.schedule, k, update=update)
        record.update(stats)
        proj = self.c_steps(state, mu, offset=self.mode == "lc" and self.lagrangian)
        state.deltas = [p.values for p in proj]
        state.params = [p.params for p in proj]
        viol, rel = self._violation(state)
        record.update(violation=viol, rel_violation=rel,
                      c_rounds=max(len(p.residuals) - 1 for p in proj))
        ranks = self._ranks(state)
        if ranks:
            record["ranks"] = ranks
        if self.mode == "lc" and self.lagrangian:
            for i, u in enumerate(self.units):
                state.lam[i] = state.lam[i] - mu * (u.matrix().detach() - state.total(i))
        if self.mode == "reproject":
            for i, u in enumerate(self.units):
                u.set_matrix(state.total(i))
        ev = self._evaluate(state, self.work if self.mode == "reproject" else None)
        if ev is not None:
            record["eval"] = ev
        return record

    # -- the compressed model -----------------------------------------------------------------------
    def final(self, state: _State, net: nn.Module | None) -> tuple[nn.Module, list[LayerJob], float]:
        """The compressed model at w = Delta(Theta) (in "modules" mode: the trained `net`), the
        layer jobs (final specs) and the build error."""
        jobs: list[LayerJob] = []
        out = copy.deepcopy(self.work) if net is None else net
        index = {id(u): i for i, u in enumerate(self.units)}
        worst = 0.0
        for choice in self.choices:
            spec, weights = _resolved(choice, state, index)
            job = LayerJob(choice.info.names, spec, choice.info.site)
            jobs.append(job)
            if net is not None:
                continue
            module = get_submodule(out, choice.info.name)
            try:
                new, facts = build_layer(module, choice.info.handler, spec, choice.info.site,
                                         options=self.options, weights=weights)
            except TensorSlimError as exc:
                raise TensorSlimError(f"layer {choice.info.name!r}: {exc}") from None
            job.facts.update(facts)
            got = reconstructed(module, choice.info.handler, new)
            for u in choice.units:
                want = state.total(index[id(u)]).detach().to(torch.float64)
                diff = got[u.part].to(torch.float64).reshape(want.shape) - want
                scale = float(want.norm()) or 1.0
                worst = max(worst, float(diff.norm()) / scale)
            out = replace_at(out, choice.info.names, new)
        return out, jobs, worst


def _resolved(
    choice: Choice, state: _State, index: dict[int, int]
) -> tuple[list[Component], list[dict[str, torch.Tensor]]]:
    """The layer's spec with learnt parameters (a selected rank) and, per component, the matrix
    of each part it is built from."""
    handler, module = choice.info.handler, choice.info.module
    spec: list[Component] = []
    weights: list[dict[str, torch.Tensor]] = []
    for slot, c in enumerate(choice.spec):
        mats: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for u in choice.units:
            if slot not in u.slots:
                continue
            j = u.slots.index(slot)
            i = index[id(u)]
            mats[u.part] = state.deltas[i][j]
            if u.parts[j].selects_rank:
                ranks[u.part] = int(state.params[i][j]["rank"])
        if ranks:
            spec.append(Component("lowrank", {"rank": handler.pack(module, ranks)}))
        else:
            spec.append(c)
        weights.append(mats)
    return spec, weights


def _plain_options(options: Any) -> dict[str, Any]:
    """A compressor's options as JSON (what apply_plan and load rebuild the modules with)."""
    if dataclasses.is_dataclass(options):
        return dataclasses.asdict(options)
    return dict(options)


def _plan(
    model: nn.Module,
    compressed: nn.Module,
    work_layers: list[LayerInfo],
    choices: list[Choice],
    jobs: list[LayerJob],
    options: Mapping[str, Any] | None,
    mode: str,
    schedule: Schedule,
    lagrangian: bool,
    seed: int,
    state: _State,
) -> Plan:
    """The Plan of the compressed model, measured against the original (untrained) `model`."""
    by_name = {i.name: i for i in work_layers}
    chosen = {c.info.name for c in choices}
    job_of = {j.names[0]: j for j in jobs}
    plans = []
    for info in find_layers(model, every_layer):
        twin = by_name.get(info.name)
        if twin is not None:
            info.site = twin.site
            info.reason = twin.reason
        if info.name not in chosen and info.reason is None:
            info.reason = "not named by the specs"
        plans.append(layer_plan(info, job_of.get(info.name), compressed, options=options))
    last = state.history[-1] if state.history else state.direct
    plan = make_plan(
        model, compressed, plans, keep=1.0, cost="bits", method="lc", allocator=mode,
        flops_known=all(i.site.input_shape is not None for i in work_layers if i.name in chosen),
        meta={
            "tensorslim": __version__,
            "torch": torch.__version__,
            "model_class": type(model).__name__,
            "options": {k: _plain_options(v) for k, v in (options or {}).items()},
            "lc": {
                "mode": mode,
                "schedule": schedule.to_dict(),
                "lagrangian": lagrangian,
                "seed": seed,
                "steps": len(state.history),
                "final_violation": last.get("violation"),
                "final_rel_violation": last.get("rel_violation"),
            },
        },
    )
    plan.keep = plan.achieved_keep
    return plan
