"""Shared machinery of the recurrent benchmarks (rnn_vowels, rnn_seqfashion): normal training vs
training with the adaptations of Maison et al. 2023 (arXiv 2310.12688), every rank-selection
strategy on the trained GRU, a compression-vs-loss table, the largest compression at <= 1.4 %
relative loss, evaluations used, and CPU latency of the dense and compressed recurrent layers.

Compression ratio = parameters of the GRU's weight matrices before / after (r(m+n) per factorized
matrix; biases, 2 * 3H per layer and direction, are kept and not counted). Relative loss is measured
on the test split against the normally trained dense model (positive = worse): for accuracy
(acc_ref - acc) / acc_ref, for MSE (mse - mse_ref) / mse_ref.

Every configuration is a trial of tensorslim.study.sweep (a pure function of a JSON parameter dict,
appended to the benchmark's trials file as soon as it is measured; rerunning resumes): training
(normal / adapted; the trained weights go to a safetensors file beside the trials file, keyed by the
setup, so the evaluation trials of any process load them), each strategy setting per training, each
Rank-Tuning variant per training, and the latency of the most compressed model within the goal.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tensorslim
from _common import run_trials, trials_path
from tensorslim.decompose import max_useful_rank, singular_values, tail_energy
from tensorslim.io import atomic_write_file
from tensorslim.layers import LowRankRNN
from tensorslim.layers.lowrank_rnn import rnn_matrices
from tensorslim.plan.apply import apply_plan
from tensorslim.search.timing import compare_calls
from tensorslim.study.sweep import canonical_json, trial_key
from tensorslim.train.lowrank import Adaptations

GOAL_LOSS = 0.014  # the paper's "at most 1.4 % relative performance loss"
GOAL_RATIO = 14.0


@dataclass
class Task:
    """What a benchmark plugs in: the recurrent module's attribute name, metric on a split (val /
    test), direction, and how to build a compressed copy's inputs for latency."""

    attr: str
    metric: Callable[[nn.Module, str], float]
    higher_is_better: bool
    metric_name: str


def weight_params(module: nn.Module) -> int:
    """Parameters of the weight matrices of an nn.GRU/LSTM or LowRankRNN (factors counted)."""
    if isinstance(module, LowRankRNN):
        total = 0
        for n, r in module.ranks.items():
            if r is None:
                total += getattr(module, n).numel()
            else:
                total += getattr(module, n + "_u").numel() + getattr(module, n + "_v").numel()
        return total
    return sum(getattr(module, n).numel() for n in rnn_matrices(module))


def rel_loss(value: float, ref: float, higher_is_better: bool) -> float:
    return (ref - value) / abs(ref) if higher_is_better else (value - ref) / abs(ref)


def with_ranks(model: nn.Module, attr: str, ranks: dict[str, int | None], impl: str = "auto"):
    out = copy.deepcopy(model)
    rnn = getattr(out, attr)
    full = {n: ranks.get(n) for n in rnn_matrices(rnn)}
    if all(r is None for r in full.values()):
        return out
    setattr(out, attr, LowRankRNN.from_dense(rnn, full, impl))
    return out


def r_max_of(rnn: nn.Module) -> dict[str, int]:
    return {n: max_useful_rank(*getattr(rnn, n).shape) for n in rnn_matrices(rnn)}


def rule_ranks(rnn: nn.Module, strategy: str, value: float) -> dict[str, int | None]:
    """Ranks of the three rules that need no search: "uniform rank" (the same rank r = value for
    every matrix), "input-to-hidden only" (only the input-to-hidden matrices at rank r) and "error
    threshold" (per matrix, the smallest rank with relative Frobenius error <= eps = value). A rank
    that saves nothing (r > r_max) leaves the matrix dense."""
    rmax = r_max_of(rnn)
    if strategy == "uniform rank":
        return {n: (value if value <= rmax[n] else None) for n in rmax}
    if strategy == "input-to-hidden only":
        return {n: (value if value <= rmax[n] and n.startswith("weight_ih") else None) for n in rmax}
    if strategy == "error threshold":
        ranks = {}
        for n in rmax:
            tail = tail_energy(singular_values(getattr(rnn, n).detach()))
            ok = (tail.sqrt() <= value + 1e-12).nonzero()
            r = int(ok[0]) if len(ok) else None
            ranks[n] = r if r is not None and 1 <= r <= rmax[n] else None
        return ranks
    raise ValueError(f"unknown rank rule {strategy!r}")


RULES = (("uniform rank", "r", "uniform_ranks"), ("input-to-hidden only", "r", "uniform_ranks"),
         ("error threshold", "eps", "thresholds"))  # fmt: skip


# -- the trials ------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What a benchmark plugs in, built in each process from the trial's setup: a fresh model, its
    training (model, adaptations or None) -> history, the adaptations and the task."""

    make_model: Callable[[], nn.Module]
    train: Callable[[nn.Module, Adaptations | None], list]
    adaptations: Adaptations
    task: Task


def adaptations_json(ad: Adaptations) -> dict[str, Any]:
    return {"nuclear": list(ad.nuclear or []), "hard": list(ad.hard or [])}


def adaptations_of(setup: dict[str, Any]) -> Adaptations:
    a = setup["adapt"]
    return Adaptations(nuclear=tuple(a["nuclear"]) or None, hard=tuple(a["hard"]) or None)


def weights_file(setup: dict[str, Any], label: str) -> Path:
    """Where the "train" trial of `label` leaves the trained weights (beside the trials file)."""
    name = setup["name"]
    return trials_path(name).with_name(f"{name}-{label}-{trial_key(setup)}.safetensors")


def plain(value: Any) -> Any:
    """`value` as plain JSON data for a sweep row: non-str keys and unknown objects as str, and
    non-finite floats (a joint scale that never met its target: inf) as "inf" / "nan"."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_TRAINED: dict[tuple[str, str], tuple[nn.Module, float]] = {}


def trained(bench: Bench, setup: dict[str, Any], label: str) -> tuple[nn.Module, float]:
    """The model trained by the "train" trial of `label` and its test metric (loaded once per
    process from its weights file)."""
    key = (canonical_json(setup), label)
    if key not in _TRAINED:
        path = weights_file(setup, label)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} (the {label} training's weights) is missing; rerun with --fresh"
            )
        torch.manual_seed(setup["seed"])
        model = bench.make_model()
        model.load_state_dict(load_file(path))
        model.eval()
        _TRAINED[key] = (model, bench.task.metric(model, "test"))
    return _TRAINED[key]


def trial(p: dict[str, Any], bench: Bench) -> dict[str, Any]:
    """One trial of a recurrent benchmark (p["kind"]: train, dense, rule, global, rank_tuning,
    latency). Table trials return {"rows": [...], "ranks": [ranks of each row's model]}."""
    setup, kind = p["setup"], p["kind"]
    task = bench.task
    if kind == "train":
        torch.manual_seed(setup["seed"])
        model = bench.make_model()
        t0 = time.perf_counter()
        history = bench.train(model, None if p["training"] == "normal" else bench.adaptations)
        seconds = round(time.perf_counter() - t0, 1)
        model.eval()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_file(weights_file(setup, p["training"]), lambda f: save_file(state, str(f)))
        dense = task.metric(model, "test")
        print(f"{p['training']}: test {task.metric_name} {dense:.5f} ({seconds:.0f}s)", flush=True)
        return {"train_s": seconds, "dense": dense, "history": plain(history)}
    label = p["training"]
    model, own = trained(bench, setup, label)
    ref = trained(bench, setup, "normal")[1]
    rnn = getattr(model, task.attr)
    if kind == "latency":
        ranks = p["ranks"]
        return {
            "rows": latency_rows(rnn, ranks, p["batches"], p["seq_len"], p["picked"]),
            "savings": compute_savings(rnn, ranks),
        }
    dense_w = weight_params(rnn)
    rows, ranks_of = [], []

    def row(strategy, setting, compressed, evals, note=""):
        small = getattr(compressed, task.attr)
        ranks_of.append(dict(small.ranks) if isinstance(small, LowRankRNN) else {})
        t0 = time.perf_counter()
        value = task.metric(compressed, "test")
        ratio = dense_w / weight_params(small)
        rows.append(
            {
                "training": label,
                "strategy": strategy,
                "setting": setting,
                "ratio": round(ratio, 2),
                f"test {task.metric_name}": round(value, 5),
                "rel. loss %": round(100 * rel_loss(value, ref, task.higher_is_better), 2),
                "vs own dense %": round(100 * rel_loss(value, own, task.higher_is_better), 2),
                "evaluations": evals,
                "note": note,
            }
        )
        print(
            f"  {label:8s} {strategy:22s} {setting:12s} ratio {ratio:6.2f}  {task.metric_name} {value:.4f}  ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )

    out: dict[str, Any] = {}
    if kind == "dense":
        row("dense", "-", model, 0)
    elif kind == "rule":
        ranks = rule_ranks(rnn, p["strategy"], p["value"])
        row(p["strategy"], p["setting"], with_ranks(model, task.attr, ranks), 0)
    elif kind == "global":
        compressed, _ = tensorslim.compress(model, p["keep"], include=[task.attr])
        row("global allocator", f"keep={p['keep']}", compressed, 0)
    elif kind == "rank_tuning":
        exhaustive = sum(r_max_of(rnn).values())
        t0 = time.perf_counter()
        res = tensorslim.rank_tuning(
            model,
            lambda m: task.metric(m, "val"),
            p["targets"],
            higher_is_better=task.higher_is_better,
            include=[task.attr],
            evaluate=False,
            joint=p["joint"],
        )
        seconds = time.perf_counter() - t0
        for t in res.targets:
            compressed = apply_plan(model, res.plans[t]).eval()
            scale = res.joint_scale.get(t)
            row(
                p["name"],
                f"target={100 * t:g}%",
                compressed,
                res.evaluations,
                f"val-tuned; scan of every rank: {exhaustive} evals"
                + (f"; ranks x{scale:.2f}" if scale not in (None, 1.0) else ""),
            )
        info = {
            "evaluations": res.evaluations,
            "exhaustive": exhaustive,
            "seconds": round(seconds, 2),
            "ranks": {str(t): res.ranks[t] for t in res.targets},
            "joint_scale": {str(t): v for t, v in res.joint_scale.items()},
        }
        out["info"] = plain(info)
    else:
        raise ValueError(f"unknown trial kind {kind!r}")
    return {"rows": rows, "ranks": ranks_of, **out}


def best_at_goal(rows, goal=GOAL_LOSS, column="rel. loss %"):
    """Per (training, strategy): the largest ratio with relative test loss (`column`) <= goal."""
    best = {}
    for r in rows:
        if r["strategy"] == "dense":
            continue
        key = (r["training"], r["strategy"])
        ok = r[column] <= 100 * goal + 1e-9
        if key not in best:
            best[key] = None
        if ok and (best[key] is None or r["ratio"] > best[key]["ratio"]):
            best[key] = r
    out = []
    for (training, strategy), r in best.items():
        out.append(
            {
                "training": training,
                "strategy": strategy,
                "largest ratio at <= 1.4% loss": "-" if r is None else r["ratio"],
                "setting": "-" if r is None else r["setting"],
                column: "-" if r is None else r[column],
                "evaluations": "-" if r is None else r["evaluations"],
                f">= {GOAL_RATIO:g}x?": "-"
                if r is None
                else ("yes" if r["ratio"] >= GOAL_RATIO else "no"),
            }
        )
    return out


def latency_rows(rnn: nn.Module, ranks: dict[str, int | None], batches, seq_len, label):
    """CPU latency of the dense GRU vs the same ranks with impl fused / lowrank / auto, on
    unpacked (batch, time, features) inputs; alternating timings (model.latency.compare_calls)."""
    rows = []
    full = {n: ranks.get(n) for n in rnn_matrices(rnn)}
    impls = {i: LowRankRNN.from_dense(rnn, full, i).eval() for i in ("fused", "lowrank")}
    auto = LowRankRNN.from_dense(rnn, full, "auto").impl
    rnn = rnn.eval()
    for b in batches:
        shape = (b, seq_len, rnn.input_size) if rnn.batch_first else (seq_len, b, rnn.input_size)
        x = torch.randn(*shape)
        with torch.inference_mode():
            lat = compare_calls(
                [
                    lambda x=x: rnn(x),
                    lambda x=x: impls["fused"](x),
                    lambda x=x: impls["lowrank"](x),
                ],
                rounds=3,
                min_run_time=0.2,
            )
        d = lat[0].median_ms
        rows.append(
            {
                "model": label,
                "batch": b,
                "seq len": seq_len,
                "dense ms": round(d, 3),
                "fused ms (storage only)": round(lat[1].median_ms, 3),
                "lowrank ms (factors)": round(lat[2].median_ms, 3),
                "speed-up fused": round(d / lat[1].median_ms, 2),
                "speed-up lowrank": round(d / lat[2].median_ms, 2),
                "auto picks": auto,
            }
        )
    return rows


def compute_savings(rnn: nn.Module, ranks: dict[str, int | None]) -> dict[str, float]:
    """Storage and per-timestep multiply-add savings of the recurrent matrices, stated separately."""
    full = {n: ranks.get(n) for n in rnn_matrices(rnn)}
    dense = weight_params(rnn)
    low = LowRankRNN.from_dense(rnn, full, "lowrank")
    stored = weight_params(low)
    # per position, lowrank multiplies by U and V (r(m+n)); fused multiplies by the rebuilt m x n
    return {
        "storage ratio": round(dense / stored, 2),
        "MAC ratio, lowrank impl": round(dense / stored, 2),
        "MAC ratio, fused impl": 1.0,
        "rebuild MACs per call (fused)": int(
            sum(r * math.prod(getattr(rnn, n).shape) for n, r in full.items() if r is not None)
        ),
    }


def run_benchmark(
    *,
    trial_fn: Callable[[dict[str, Any]], dict[str, Any]],
    bench: Callable[[], Bench],
    setup: dict[str, Any],
    args: Any,
    uniform_ranks,
    thresholds,
    keeps,
    targets,
    latency_batches,
    seq_len: int,
):
    """Train normal and adapted models, evaluate every strategy, pick the most compressed model
    within the goal and time its recurrent layer, every step a trial of the sweep in
    trials_path(setup["name"]) run by `trial_fn` (the benchmark's module-level trial function; it
    builds its Bench from p["setup"]). Returns (tables, facts for the notes, extra)."""
    path = trials_path(setup["name"])
    counts = {"ran": 0, "reused": 0}

    def sweep(trials):
        res = run_trials(trial_fn, trials, path, args, threads=setup["threads"],
                         description=setup["name"])  # fmt: skip
        counts["ran"] += res.ran
        counts["reused"] += res.reused
        return res.rows

    labels = ("normal", "adapted")
    trained_rows = dict(zip(labels, sweep([{"setup": setup, "kind": "train", "training": label}
                                           for label in labels])))  # fmt: skip
    train_s = {label: r["train_s"] for label, r in trained_rows.items()}
    dense = {label: r["dense"] for label, r in trained_rows.items()}
    histories = {label: r["history"] for label, r in trained_rows.items()}
    ref = dense["normal"]

    values = {"uniform_ranks": uniform_ranks, "thresholds": thresholds}
    evals = []
    for label in labels:
        base = {"setup": setup, "training": label}
        evals.append({**base, "kind": "dense"})
        for strategy, sym, axis in RULES:
            evals += [{**base, "kind": "rule", "strategy": strategy, "value": v,
                       "setting": f"{sym}={v}"} for v in values[axis]]  # fmt: skip
        evals += [{**base, "kind": "global", "keep": k} for k in keeps]
        for name, joint in (("Rank-Tuning", False), ("Rank-Tuning + joint check", True)):
            evals.append({**base, "kind": "rank_tuning", "name": name, "joint": joint,
                          "targets": list(targets)})  # fmt: skip
    rows, tuning, ranks_of = [], {label: {} for label in labels}, {}
    for p, out in zip(evals, sweep(evals)):
        rows.extend(out["rows"])
        for r, ranks in zip(out["rows"], out["ranks"]):
            ranks_of[(r["training"], r["strategy"], r["setting"])] = ranks
        if p["kind"] == "rank_tuning":
            tuning[p["training"]][p["name"]] = out["info"]
    summary = best_at_goal(rows)
    summary_own = best_at_goal(rows, column="vs own dense %")
    ok = [r for r in rows if r["strategy"] != "dense" and r["rel. loss %"] <= 100 * GOAL_LOSS]
    best = max(ok, key=lambda r: r["ratio"]) if ok else None
    lat, savings, picked = [], {}, None
    if best is not None:
        picked = f"{best['training']} / {best['strategy']} {best['setting']}"
        chosen = ranks_of[(best["training"], best["strategy"], best["setting"])]
        if any(r is not None for r in chosen.values()):
            out = sweep([{"setup": setup, "kind": "latency", "training": best["training"],
                          "ranks": chosen, "batches": list(latency_batches), "seq_len": seq_len,
                          "picked": picked}])[0]  # fmt: skip
            lat, savings = out["rows"], out["savings"]
    normal_model = trained(bench(), setup, "normal")[0]
    facts = {
        "ref": ref,
        "dense": dense,
        "train_s": train_s,
        "reached": max((r["ratio"] for r in ok), default=0.0),
        "picked": picked,
        "savings": savings,
        "weights": weight_params(getattr(normal_model, bench().task.attr)),
        "trials": counts,
        "trials_file": path,
    }
    tables = {
        "Largest compression at <= 1.4% relative loss": summary,
        "Largest compression at <= 1.4% loss relative to each training's own dense model": summary_own,
        "Compression of the recurrent weights vs relative test loss": rows,
        "Latency of the recurrent layer (CPU, unpacked input)": lat,
    }
    extra = {"rank_tuning": tuning, "histories": histories, "facts": facts}
    return tables, facts, extra
