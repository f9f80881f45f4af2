"""A whole-model speed target: compress(model, speedup=2.0, example_input=x).

The layers are analysed once (api.analyse: find, trace, calibrate, propose; with cost="latency"
every proposal's latency is measured on the layer's real input and cached), then the budget keep
is searched: each candidate keep is allocated, built, given the inference levers
(speed.levers.apply_levers: BatchNorm folding, channels_last, merged 1x1 stages, each kept only
where it measures faster) and timed as a WHOLE model against the user's dense model, alternately
in one run (speed.measure.measure_speedup). The search keeps a bracket [lo, hi] on keep with lo
measured at or above the target and hi below it (hi starts at keep 1, the dense model) and
probes inside it by false position on 1 / speedup, which is linear in keep when the compressible
layers' time scales with it (Amdahl's law: 1/S(k) = 1 - q + q k, Amdahl 1967), safeguarded to
stay at least SAFEGUARD of the bracket away from its ends (so it never stalls, as bisection). It
stops when the bracket is narrower than `keep_tol`, a probe lands within `close` above the
target, or after `max_steps` measured steps. The largest keep measured at or above the target
(least error) is returned, re-measured; if even the smallest keep misses the target, the fastest
candidate is returned and the plan says the best speedup reached and why (the compressible
layers' share of the dense model's time from torch.profiler bounds what any compression of
them can give).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tensorslim.api import analyse, build
from tensorslim.errors import TensorSlimError
from tensorslim.plan import Plan
from tensorslim.speed.measure import (
    ModelTiming,
    measure_speedup,
    module_times,
    profile_breakdown,
)

SAFEGUARD = 0.15  # a probe stays this fraction of the bracket away from its ends
MAX_CONFIRM = 3  # re-measured candidates at most (see search_speedup)
MAX_STEPS = 8  # measured whole-model steps (each: build, levers, alternate timing)
KEEP_TOL = 0.02  # stop when the bracket on keep is this narrow
CLOSE = 0.03  # stop when a probe meets the target by at most this relative margin
MET_TOL = 0.05  # the re-measured speedup counts as meeting the target down to (1 - MET_TOL) x


def check_speedup(speedup: Any) -> float:
    """`speedup` as a float if it is a finite number > 1, else TensorSlimError."""
    if isinstance(speedup, (bool, str, bytes)):
        raise TensorSlimError(
            f"speedup must be a number > 1 (e.g. 2.0 for twice as fast); got {speedup!r}"
        )
    try:
        s = float(speedup)
    except (TypeError, ValueError):
        raise TensorSlimError(f"speedup must be a number > 1; got {speedup!r}") from None
    if not math.isfinite(s) or s <= 1.0:
        raise TensorSlimError(
            f"speedup must be a finite number > 1 (dense ms / compressed ms, e.g. 2.0); got "
            f"{speedup!r}"
        )
    return s


@dataclass
class Trial:
    """One measured candidate: the budget keep, the built model before and after the levers,
    its plan, the whole-model timing and the lever decisions."""

    keep: float
    selection: list[int]
    base: nn.Module
    model: nn.Module
    plan: Plan
    timing: ModelTiming
    levers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.timing.speedup


@dataclass
class SpeedResult:
    """What the speed search returns: `model` (the inference model measured, levers applied),
    `base` (the same compression before the levers: its state dict matches the plan, so it is
    what `tensorslim.save` writes), the plan (with `whole_model`) and every trial's record."""

    model: nn.Module
    base: nn.Module
    plan: Plan
    steps: list[dict[str, Any]]


def _lever_records(decisions: list[Any]) -> list[dict[str, Any]]:
    out = []
    for d in decisions:
        rec = d.to_dict() if hasattr(d, "to_dict") else {"name": str(d)}
        out.append({k: v for k, v in rec.items() if v is not None and v != []})
    return out


def _with_levers(
    model: nn.Module, example_input: Any, levers: bool, rounds: int, min_run_time: float
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """`model` with the inference levers kept where they measure faster (helper module
    speed.levers), and their decisions as plain dicts."""
    if not levers:
        return model, []
    from tensorslim.speed.levers import apply_levers

    new, decisions = apply_levers(
        model, example_input, rounds=rounds, min_run_time=min_run_time, check_dense=False
    )
    return new, _lever_records(decisions)


def compressible_share(
    dense: nn.Module, example_input: Any, names: list[str]
) -> tuple[float | None, float | None]:
    """(share of the dense model's forward time spent in the named layers, Amdahl bound
    1 / (1 - share)) from torch.profiler (module_times); (None, None) if not measurable. The
    bound is None where the share is 1 (no limit)."""
    if not names:
        return None, None
    times = module_times(dense, example_input, names)
    total = times.get("", 0.0)
    if total <= 0:
        return None, None
    # a layer nested in another named one is counted once (the outer one)
    outer = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names if o)]
    share = min(1.0, sum(times[n] for n in outer if n) / total) if "" not in outer else 1.0
    bound = 1.0 / (1.0 - share) if share < 1.0 else None
    return round(share, 4), (round(bound, 4) if bound is not None else None)


def measure_whole_model(
    dense: nn.Module,
    compressed: nn.Module,
    example_input: Any,
    *,
    rounds: int = 5,
    min_run_time: float = 0.2,
    breakdown: bool = True,
    top: int = 8,
) -> dict[str, Any]:
    """The plan's whole_model section for a compressed model: dense vs compressed timed
    alternately (measure_speedup) and, with `breakdown`, where the compressed model's time goes
    (profile_breakdown)."""
    timing = measure_speedup(dense, compressed, example_input, rounds=rounds,
                             min_run_time=min_run_time)  # fmt: skip
    wm = _timing_dict(timing)
    if breakdown:
        wm["breakdown"] = profile_breakdown(compressed, example_input, top=top)
    return wm


def _timing_dict(t: ModelTiming) -> dict[str, Any]:
    return {
        "dense_ms": round(t.dense_ms, 5),
        "compressed_ms": round(t.compressed_ms, 5),
        "speedup": round(t.speedup, 4),
        "threads": t.threads,
        "batch_shapes": t.batch_shapes,
        "rounds": t.rounds,
        "dense_round_ms": [round(x, 5) for x in t.dense_round_ms],
        "compressed_round_ms": [round(x, 5) for x in t.compressed_round_ms],
    }


def _probe(lo: tuple[float, float], hi: tuple[float, float], target: float) -> float:
    """The next keep inside the bracket (lo: (keep, speedup) meeting the target, hi: missing it):
    false position on 1/speedup (linear in keep by Amdahl's law), kept SAFEGUARD of the bracket
    away from either end."""
    (k0, s0), (k1, s1) = lo, hi
    y0, y1, y = 1.0 / s0, 1.0 / s1, 1.0 / target
    k = k0 + (k1 - k0) * (y - y0) / (y1 - y0) if y1 != y0 else 0.5 * (k0 + k1)
    if not math.isfinite(k):
        k = 0.5 * (k0 + k1)
    margin = SAFEGUARD * (k1 - k0)
    return min(max(k, k0 + margin), k1 - margin)


def search_speedup(
    model: nn.Module,
    speedup: float,
    example_input: Any,
    *,
    cost: str = "latency",
    levers: bool = True,
    rounds: int = 5,
    min_run_time: float = 0.2,
    max_steps: int = MAX_STEPS,
    keep_tol: float = KEEP_TOL,
    close: float = CLOSE,
    breakdown: bool = True,
    **compress_kwargs: Any,
) -> SpeedResult:
    """The speed search (see the module docstring); compress_for_speedup without the unpacking.
    `rounds` / `min_run_time`: timing of each whole-model measurement (measure_speedup); the
    levers are decided with lighter timing (rounds 2, 0.05 s)."""
    target = check_speedup(speedup)
    if example_input is None:
        raise TensorSlimError(
            f"speedup={target:g} needs example_input=: the whole model is timed on it "
            "(dense vs compressed), e.g. a batch of the size you will serve"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise TensorSlimError(f"max_steps must be an integer >= 1; got {max_steps!r}")
    if "keep" in compress_kwargs:
        raise TensorSlimError("a speed target searches keep itself: do not pass keep=")
    a = analyse(model, cost=cost, example_input=example_input, **compress_kwargs)
    names = [i.name for i in a.layers if i.compressible]
    share, bound = compressible_share(model, example_input, names)

    trials: list[Trial] = []
    steps: list[dict[str, Any]] = []

    def trial(keep: float) -> Trial:
        selection = a.selection(keep)
        for t in trials:  # the same layers as a measured candidate: nothing new to time
            if t.selection == selection and t.model is not None:
                steps.append({"keep": round(keep, 5), "speedup": round(t.speedup, 4),
                              "achieved_keep": round(t.plan.achieved_keep, 5), "reused": True})  # fmt: skip
                return t
        base, plan = build(a, keep, selection)
        fast, lever_recs = _with_levers(base, example_input, levers, 2, 0.05)
        timing = measure_speedup(model, fast, example_input, rounds=rounds,
                                 min_run_time=min_run_time)  # fmt: skip
        t = Trial(keep, selection, base, fast, plan, timing, lever_recs)
        trials.append(t)
        steps.append({
            "keep": round(keep, 5),
            "speedup": round(timing.speedup, 4),
            "achieved_keep": round(plan.achieved_keep, 5),
            "dense_ms": round(timing.dense_ms, 5),
            "compressed_ms": round(timing.compressed_ms, 5),
            "levers": [r["name"] for r in lever_recs if r.get("kept")],
        })  # fmt: skip
        return t

    k_min = min(1.0, a.min_keep() * (1 + 1e-9))
    fastest = trial(k_min)
    best: Trial | None = fastest if fastest.speedup >= target else None
    if best is not None:
        lo = (k_min, fastest.speedup)
        hi = (1.0, 1.0)  # keep 1: the dense layers (assumed to miss a target > 1)
        probes = 0  # a probe that selects already measured layers is not a measured step
        while len(trials) < max_steps and probes < 3 * max_steps and hi[0] - lo[0] > keep_tol:
            if best.speedup <= target * (1 + close):
                break  # meets the target with little to spare: more keep would miss it
            k = _probe(lo, hi, target)
            t = trial(k)
            probes += 1
            if t.speedup >= target:
                lo = (k, t.speedup)
                if best is not t:
                    best = t
            else:
                hi = (k, t.speedup)
            _release(trials, keep=(best, max(trials, key=lambda t: t.speedup)))
    # Confirm by re-measuring (timing noise can flip a verdict of the search): the candidates
    # that met the target in the search, largest keep (least error) first, then the fastest, which
    # is also re-measured when none met it; at most MAX_CONFIRM re-measurements. A candidate whose
    # models were released is built again from the analysis (same layers and ranks).
    fastest = max(trials, key=lambda t: t.speedup)
    order = sorted((t for t in trials if t.speedup >= target), key=lambda t: -t.keep)
    order = order[: MAX_CONFIRM - 1]
    if all(fastest is not t for t in order):
        order.append(fastest)
    dense_levered: dict[str, Any] = {}

    def levered_dense() -> tuple[nn.Module | None, list[str]]:
        if not dense_levered:  # the levers alone on the dense model: the part not from compression
            fast, recs = _with_levers(model, example_input, True, 2, 0.05)
            names = [r["name"] for r in recs if r.get("kept")]
            dense_levered.update(model=fast if names else None, names=names)
        return dense_levered["model"], dense_levered["names"]

    confirmations: list[dict[str, Any]] = []
    for chosen in order:
        if chosen.model is None:
            chosen.base, chosen.plan = build(a, chosen.keep, chosen.selection)
            chosen.model, chosen.levers = _with_levers(chosen.base, example_input, levers, 2, 0.05)
        kept = [r for r in chosen.levers if r.get("kept")]
        dense_fast, dense_levers = levered_dense() if kept else (None, [])
        final = measure_speedup(model, chosen.model, example_input, rounds=rounds,
                                min_run_time=min_run_time, reference=dense_fast)  # fmt: skip
        met = final.speedup >= target * (1 - MET_TOL)
        confirmations.append({"keep": round(chosen.keep, 5), "search_speedup":
                              round(chosen.speedup, 4), "speedup": round(final.speedup, 4)})  # fmt: skip
        if met:
            break
    wm: dict[str, Any] = {
        "target_speedup": target,
        **_timing_dict(final),
        "met": met,
        "reason": _reason(target, best, chosen, final, share, bound, confirmations),
        "search_speedup": round(chosen.speedup, 4),
        "confirmations": confirmations,
        "steps": steps,
        "n_steps": len(trials),
        "cost": a.cost,
        "levers": kept,
        "levers_tried": chosen.levers,
        "compressible_share": share,
        "amdahl_bound": bound,
    }
    if kept:
        wm["dense_levers"] = dense_levers
        if final.reference_ms is not None and final.compressed_ms > 0:
            wm["levered_dense_ms"] = round(final.reference_ms, 5)
            wm["speedup_vs_levered_dense"] = round(final.reference_ms / final.compressed_ms, 4)
        wm["levers_note"] = (
            "the measured model has the kept levers applied (inference only); the plan and the "
            "saved weights are the compression before them: after loading, apply "
            "tensorslim.speed.levers.apply_levers(model, example_input) again"
        )
    if breakdown:
        wm["breakdown"] = profile_breakdown(chosen.model, example_input)
    plan = chosen.plan
    plan.whole_model = wm
    return SpeedResult(chosen.model, chosen.base, plan, steps)


def _release(trials: list[Trial], keep: tuple[Trial, ...]) -> None:
    """Free the models of the trials that can no longer be returned (neither the best meeting
    the target nor the fastest), so a long search holds at most a few models."""
    for t in trials:
        if all(t is not k for k in keep):
            t.base = t.model = None  # type: ignore[assignment]


def _reason(
    target: float,
    best: Trial | None,
    chosen: Trial,
    final: ModelTiming,
    share: float | None,
    bound: float | None,
    confirmations: list[dict[str, Any]] | None = None,
) -> str:
    """Why the search ended where it did, in words for the plan."""
    met = final.speedup >= target * (1 - MET_TOL)
    earlier = (confirmations or [])[:-1]  # re-measurements that missed before the chosen one
    missed = "".join(
        f"keep {c['keep']:.3f} measured {c['search_speedup']:.2f}x in the search but "
        f"{c['speedup']:.2f}x re-measured; " for c in earlier
    )
    if best is not None and chosen is best:
        text = (
            f"largest keep measured at or above {target:.2f}x: {chosen.keep:.3f} "
            f"({chosen.speedup:.2f}x in the search, {final.speedup:.2f}x re-measured)"
        )
        if not met:
            text += f"; the re-measurement fell more than {MET_TOL:.0%} below the target (noise?)"
        return text
    if met:
        which = "the fastest candidate, keep" if best is None else "keep"
        return (
            missed + f"{which} {chosen.keep:.3f} measured {chosen.speedup:.2f}x in the search and "
            f"{final.speedup:.2f}x re-measured: target {target:.2f}x met (timing noise on this "
            "machine decides close calls)"
        )
    text = missed + (
        f"target {target:.2f}x is out of reach: the fastest candidate (keep {chosen.keep:.3f}, "
        f"every compressible layer at its cheapest factorization) measured {chosen.speedup:.2f}x "
        f"({final.speedup:.2f}x re-measured)"
    )
    if share is not None:
        text += f"; the compressible layers take {share:.0%} of the dense model's time"
        if bound is not None and bound < target:
            text += (
                f", so even removing them would give at most {bound:.2f}x (Amdahl's law; only "
                "the levers can speed up the rest): the rest of the model (activations, "
                "normalization, pooling, other layers) bounds it"
            )
        else:
            text += (
                ", so the limit is the factorized layers themselves: at their smallest ranks "
                "their chains of narrow stages still cost more than the target allows"
            )
    return text


def compress_for_speedup(
    model: nn.Module, speedup: float, example_input: Any, **compress_kwargs: Any
) -> tuple[nn.Module, Plan]:
    """(model, Plan): the least-error compression of `model` whose measured whole-model speedup
    on `example_input` meets `speedup` (dense ms / compressed ms, timed alternately with
    torch.get_num_threads() threads), or the fastest one found if none does; the plan's
    `whole_model` holds the measurements, the search steps, the levers kept, the profiler's
    breakdown and, when the target is out of reach, why. The returned model is the inference
    model that was measured (levers applied, eval mode; not for training); tensorslim.save
    writes the same compression before the levers, which tensorslim.load rebuilds (apply
    tensorslim.speed.levers.apply_levers to it again for the measured speed). compress_kwargs: compress's arguments
    (cost defaults to "latency"), and search_speedup's (levers, rounds, min_run_time,
    max_steps, keep_tol, close, breakdown)."""
    res = search_speedup(model, speedup, example_input, **compress_kwargs)
    if res.model is not res.base:  # tensorslim.save writes the base (its state dict fits the plan)
        from tensorslim.speed.levers import LEVERS_BASE_ATTR

        res.model.__dict__[LEVERS_BASE_ATTR] = res.base
    return res.model, res.plan
