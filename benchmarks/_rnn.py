"""Shared machinery of the recurrent benchmarks (rnn_vowels, rnn_seqfashion): normal training vs
training with the adaptations of Maison et al. 2023 (arXiv 2310.12688), every rank-selection
strategy on the trained GRU, a compression-vs-loss table, the largest compression at <= 1.4 %
relative loss, evaluations used, and CPU latency of the dense and compressed recurrent layers.

Compression ratio = parameters of the GRU's weight matrices before / after (r(m+n) per factorized
matrix; biases, 2 * 3H per layer and direction, are kept and not counted). Relative loss is measured
on the test split against the normally trained dense model (positive = worse): for accuracy
(acc_ref - acc) / acc_ref, for MSE (mse - mse_ref) / mse_ref.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import tensorslim
from tensorslim.decompose import max_useful_rank, singular_values, tail_energy
from tensorslim.layers import LowRankRNN
from tensorslim.layers.lowrank_rnn import rnn_matrices
from tensorslim.plan.apply import apply_plan
from tensorslim.search.timing import compare_calls

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


def strategy_settings(rnn: nn.Module, uniform_ranks, thresholds):
    """(strategy, setting, ranks) for the three rank rules that need no search: the same rank r for
    every matrix; only the input-to-hidden matrices at rank r; per matrix, the smallest rank with
    relative Frobenius error <= eps. A rank that saves nothing (r > r_max) leaves the matrix dense."""
    rmax = r_max_of(rnn)
    out = []
    for r in uniform_ranks:
        out.append(("uniform rank", f"r={r}", {n: (r if r <= rmax[n] else None) for n in rmax}))
    for r in uniform_ranks:
        ranks = {n: (r if r <= rmax[n] and n.startswith("weight_ih") else None) for n in rmax}
        out.append(("input-to-hidden only", f"r={r}", ranks))
    tails = {n: tail_energy(singular_values(getattr(rnn, n).detach())) for n in rmax}
    for eps in thresholds:
        ranks = {}
        for n in rmax:
            ok = (tails[n].sqrt() <= eps + 1e-12).nonzero()
            r = int(ok[0]) if len(ok) else None
            ranks[n] = r if r is not None and 1 <= r <= rmax[n] else None
        out.append(("error threshold", f"eps={eps}", ranks))
    return out


def evaluate_strategies(
    model: nn.Module,
    task: Task,
    ref: float,
    label: str,
    *,
    uniform_ranks,
    thresholds,
    keeps,
    targets,
    log=print,
):
    """Rows of the compression-vs-loss table for one trained model; also the Rank-Tuning results."""
    rnn = getattr(model, task.attr)
    dense_w = weight_params(rnn)
    own = task.metric(model, "test")  # this training's own dense model
    rows, ranks_of = [], {}

    def row(strategy, setting, compressed, evals, note=""):
        small = getattr(compressed, task.attr)
        ranks_of[(label, strategy, setting)] = (
            dict(small.ranks) if isinstance(small, LowRankRNN) else {}
        )
        t0 = time.perf_counter()
        value = task.metric(compressed, "test")
        ratio = dense_w / weight_params(getattr(compressed, task.attr))
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
        log(
            f"  {label:8s} {strategy:22s} {setting:12s} ratio {ratio:6.2f}  {task.metric_name} {value:.4f}  ({time.perf_counter() - t0:.1f}s)"
        )

    row("dense", "-", model, 0)
    for strategy, setting, ranks in strategy_settings(rnn, uniform_ranks, thresholds):
        row(strategy, setting, with_ranks(model, task.attr, ranks), 0)
    for keep in keeps:
        compressed, _ = tensorslim.compress(model, keep, include=[task.attr])
        row("global allocator", f"keep={keep}", compressed, 0)
    exhaustive = sum(r_max_of(rnn).values())
    info = {}
    for name, joint in (("Rank-Tuning", False), ("Rank-Tuning + joint check", True)):
        t0 = time.perf_counter()
        res = tensorslim.rank_tuning(
            model,
            lambda m: task.metric(m, "val"),
            targets,
            higher_is_better=task.higher_is_better,
            include=[task.attr],
            evaluate=False,
            joint=joint,
        )
        seconds = time.perf_counter() - t0
        for t in res.targets:
            compressed = apply_plan(model, res.plans[t]).eval()
            scale = res.joint_scale.get(t)
            row(
                name,
                f"target={100 * t:g}%",
                compressed,
                res.evaluations,
                f"val-tuned; scan of every rank: {exhaustive} evals"
                + (f"; ranks x{scale:.2f}" if scale not in (None, 1.0) else ""),
            )
        info[name] = {
            "evaluations": res.evaluations,
            "exhaustive": exhaustive,
            "seconds": round(seconds, 2),
            "ranks": {str(t): res.ranks[t] for t in res.targets},
            "joint_scale": {str(t): v for t, v in res.joint_scale.items()},
        }
    return rows, info, ranks_of


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
    make_model: Callable[[], nn.Module],
    train: Callable[[nn.Module, object], list],
    adaptations,
    task: Task,
    seed: int,
    uniform_ranks,
    thresholds,
    keeps,
    targets,
    latency_batches,
    seq_len: int,
):
    """Train normal and adapted models, evaluate every strategy, pick the most compressed model
    within the goal and time its recurrent layer. Returns (tables, facts for the notes, extra)."""
    models, histories, train_s, dense = {}, {}, {}, {}
    for label, ad in (("normal", None), ("adapted", adaptations)):
        torch.manual_seed(seed)
        model = make_model()
        t0 = time.perf_counter()
        histories[label] = train(model, ad)
        train_s[label] = round(time.perf_counter() - t0, 1)
        models[label] = model.eval()
        dense[label] = task.metric(model, "test")
        print(
            f"{label}: test {task.metric_name} {dense[label]:.5f} ({train_s[label]:.0f}s)",
            flush=True,
        )
    ref = dense["normal"]

    rows, tuning, ranks_of = [], {}, {}
    for label, model in models.items():
        r, tuning[label], ro = evaluate_strategies(
            model,
            task,
            ref,
            label,
            uniform_ranks=uniform_ranks,
            thresholds=thresholds,
            keeps=keeps,
            targets=targets,
        )
        rows.extend(r)
        ranks_of.update(ro)
    summary = best_at_goal(rows)
    summary_own = best_at_goal(rows, column="vs own dense %")
    ok = [r for r in rows if r["strategy"] != "dense" and r["rel. loss %"] <= 100 * GOAL_LOSS]
    best = max(ok, key=lambda r: r["ratio"]) if ok else None
    lat, savings, picked = [], {}, None
    if best is not None:
        picked = f"{best['training']} / {best['strategy']} {best['setting']}"
        src = getattr(models[best["training"]], task.attr)
        chosen = ranks_of[(best["training"], best["strategy"], best["setting"])]
        if any(r is not None for r in chosen.values()):
            lat = latency_rows(src, chosen, latency_batches, seq_len, picked)
            savings = compute_savings(src, chosen)
    facts = {
        "ref": ref,
        "dense": dense,
        "train_s": train_s,
        "reached": max((r["ratio"] for r in ok), default=0.0),
        "picked": picked,
        "savings": savings,
        "weights": weight_params(getattr(models["normal"], task.attr)),
    }
    tables = {
        "Largest compression at <= 1.4% relative loss": summary,
        "Largest compression at <= 1.4% loss relative to each training's own dense model": summary_own,
        "Compression of the recurrent weights vs relative test loss": rows,
        "Latency of the recurrent layer (CPU, unpacked input)": lat,
    }
    extra = {"rank_tuning": tuning, "histories": histories, "facts": facts}
    return tables, facts, extra
