"""Benchmark `cnn_fashion`: GaripovNet on Fashion-MNIST compressed with every tensor method, next to
TensorLy-Torch's factorized convolutions; and truncation along cuts of a vanilla 4-layer CNN.

Model: the zoo's `garipov-sgd` (Schuurmans et al.'s SGD recipe on the 55k training split) when its
weights are cached, else `garipov-fashion` (trained once, seeded, on the first 15k images for 2
epochs; cached); `--garipov NAME` picks one (this benchmark trains garipov-sgd only if named). Compressed: conv2..conv6 (the first conv and the Linear classifier stay
dense, as in Schuurmans et al.), at keep 0.1 / 0.25 / 0.5 / 0.75 of their parameters, with
`allocator="uniform"` (every layer at that keep; for "auto" every layer takes the method with the
lowest relative weight error at its budget, among the options measured faster than the dense layer
on its real input shape: compress gets an example batch of EXAMPLE_BATCH test images).
Fine-tuning: FT_EPOCHS epochs of Adam (lr FT_LR, batch 64) on FT_SIZE training images the base model
never saw, accuracy recorded after each epoch on the full 10k test set; the dense model is fine-tuned
identically as a reference. Baseline: tltorch.FactorizedConv.from_conv(conv, rank=rho,
factorization=cp|tucker|tt, decompose_weights=True) on the same layers, with rho bisected so that
TensorLy-Torch's parameter count hits the keep (its `rank=<keep>` alone misses it: its Tucker also
compresses the spatial modes), fine-tuned and evaluated identically.

Truncation: `cnn4-fashion` (zoo), each conv and all convs truncated along the 7 cuts at norm retention
0.9 / 0.5 and as an MPS with bonds at 50% of full; the worst all-layer truncation is
retrained RETRAIN_EPOCHS epochs on RETRAIN_SIZE images to show recovery.

Needs Debian's dataset-fashion-mnist (`make bench-deps`) and tensorly-torch (`.[bench]` extra).
Every configuration (dense, tensorslim method x keep, TensorLy-Torch factorization x keep, the
truncation study) is one trial of tensorslim.study.sweep, appended to
<zoo cache>/benchmark_trials/cnn_fashion[_quick].trials.jsonl as soon as it is measured: a killed run
resumes when rerun (same arguments); `--fresh` measures everything again. `--workers N` runs N
trials at once in spawned processes, `--ray` / `--ray-address` on Ray (default: 1, serially, since
the table has timing columns). Results are rewritten after every stage (keep 0.25 first).

Run: .venv/bin/python benchmarks/cnn_fashion.py [--quick] [--garipov NAME] [--workers N] [--ray]
     [--fresh]   (--resume is accepted and does nothing more: every run resumes)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
import time
import warnings
from importlib import metadata, util

import torch

from _common import (
    RESULTS,
    add_sweep_args,
    forget_trials,
    garipov_name,
    run_trials,
    sweep_note,
    trials_path,
    write_results,
)
from tensorslim import compress, zoo
from tensorslim.errors import TensorSlimError
from tensorslim.report.truncation_plot import plot_truncation
from tensorslim.study.sweep import grid
from tensorslim.study.truncation import TruncationRow, TruncationStudy, truncation_study
from tensorslim.train import accuracy, fit
from tensorslim.zoo.fashion import load_fashion_mnist
from tensorslim.zoo.fashion_models import TRAIN_SUBSET

SEED = 0
KEEPS = [0.1, 0.25, 0.5, 0.75]
METHODS = ["svd", "cp", "tucker2", "tt", "spatial_svd", "auto"]
TLTORCH = ["cp", "tucker", "tt"]
EXCLUDE = ["features.0", "classifier.*"]
EVAL_SIZE = 10_000  # the full official test set
FT_SIZE = 4000
FT_EPOCHS = 2
FT_LR = 2e-4
EXAMPLE_BATCH = 32
TRUNC_EVAL_SIZE = 2000
RETRAIN_SIZE = 2500
RETRAIN_EPOCHS = 2
THREADS = 2

GARIPOV_TABLE = "GaripovNet: accuracy after compression and fine-tuning"


def conv_names(model):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.startswith("features.") and n != "features.0"
    ]


def finetune_and_eval(model, dense_acc, ft, ev, p) -> dict:
    """Accuracy before fine-tuning and after each of p["ft_epochs"] epochs, and the drops in
    points."""
    x_ft, y_ft = ft
    epochs = p["ft_epochs"]
    out = {"acc before FT": round(accuracy(model, *ev), 4)}
    ft_time = [0.0]
    t0 = [time.time()]

    def after_epoch(epoch, m):
        ft_time[0] += time.time() - t0[0]
        out[f"acc after {epoch} ep"] = round(accuracy(m, *ev), 4)
        t0[0] = time.time()

    fit(model, x_ft, y_ft, epochs=epochs, lr=p["ft_lr"], seed=p["seed"], on_epoch=after_epoch)
    for e in range(1, epochs + 1):
        out[f"drop after {e} ep (pts)"] = round(100 * (dense_acc - out[f"acc after {e} ep"]), 2)
    out["FT s"] = round(ft_time[0], 1)
    return out


# -- per-process shared setup (cached: each worker loads the data and the model once) -----------
@functools.lru_cache(maxsize=1)
def fashion(seed: int):
    """Fashion-MNIST (Debian's dataset-fashion-mnist) with the seeded validation split."""
    return load_fashion_mnist(seed=seed)


@functools.lru_cache(maxsize=2)
def garipov_setup(model: str, seed: int, eval_size: int, ft_size: int, example_batch: int):
    """(base model, its dense accuracy, fine-tuning split, evaluation split, example batch)."""
    data = fashion(seed)
    ev = (data.x_test[:eval_size], data.y_test[:eval_size])
    ft = (
        data.x_train[TRAIN_SUBSET : TRAIN_SUBSET + ft_size],
        data.y_train[TRAIN_SUBSET : TRAIN_SUBSET + ft_size],
    )
    base = zoo.get(model).pretrained(seed=seed, progress=True)
    return base, accuracy(base, *ev), ft, ev, data.x_test[:example_batch]


def trial(p: dict) -> dict:
    """One configuration (a sweep trial, tensorslim.study.sweep): p["kind"] is "dense",
    "tensorslim" (p["method"], p["keep"]), "tltorch" (p["method"] = factorization, p["keep"]) or
    "truncation"; every size, epoch count and seed is in p. Returns the table row (truncation:
    the whole study as JSON). Torch's global generator is seeded first, so a row does not depend
    on the trials run before it in the same process."""
    torch.manual_seed(p["seed"])
    if p["kind"] == "truncation":
        return truncation_trial(p)
    setup = garipov_setup(p["model"], p["seed"], p["eval_size"], p["ft_size"], p["example_batch"])
    base, dense_acc, ft, ev, example = setup
    if p["kind"] == "dense":
        row = dense_row(base, dense_acc, ft, ev, p)
    elif p["kind"] == "tensorslim":
        row = tensorslim_row(base, dense_acc, ft, ev, example, p)
    elif p["kind"] == "tltorch":
        row = tltorch_row(base, dense_acc, ft, ev, p)
    else:
        raise ValueError(f"unknown trial kind {p['kind']!r}")
    print(row, file=sys.stderr, flush=True)
    return row


def dense_row(base, dense_acc, ft, ev, p) -> dict:
    model = copy.deepcopy(base)
    n = sum(model.get_submodule(c).weight.numel() for c in conv_names(model))
    row = {"library": "dense", "method": "-", "keep": 1.0, "achieved keep": 1.0,
           "methods used": "-", "conv params": n, "mean rel. weight error": 0.0}  # fmt: skip
    row.update(finetune_and_eval(model, dense_acc, ft, ev, p))
    row["compress s"] = 0.0
    return row


def tensorslim_row(base, dense_acc, ft, ev, example, p) -> dict:
    method, keep = p["method"], p["keep"]
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        small, plan = compress(
            base, keep, method=method, allocator="uniform", exclude=EXCLUDE,
            example_input=example,
        )  # fmt: skip
    c_s = time.time() - t0
    errs = [lp.rel_error for lp in plan.layers if lp.compressible]
    used = sorted({lp.method for lp in plan.factorized_layers})
    slower = [lp.name for lp in plan.factorized_layers if lp.extra.get("slower_than_dense")]
    row = {
        "library": "tensorslim",
        "method": method,
        "keep": keep,
        "achieved keep": round(plan.achieved_keep, 3),
        "methods used": "+".join(used) if method == "auto" else method,
        "conv params": sum(lp.params_after for lp in plan.layers if lp.compressible),
        "mean rel. weight error": round(sum(errs) / len(errs), 3),
        "layers slower than dense": len(slower),
    }
    row.update(finetune_and_eval(small, dense_acc, ft, ev, p))
    row["compress s"] = round(c_s, 1)
    return row


def _tltorch_params(conv, rho, fact) -> int:
    import tltorch

    # TT-SVD may return smaller ranks than requested, so TT and Tucker are counted after the real
    # decomposition (fast); CP's count depends on the rank alone and its ALS is slow.
    fc = tltorch.FactorizedConv.from_conv(
        conv, rank=rho, factorization=fact, decompose_weights=fact != "cp"
    )
    return sum(p.numel() for p in fc.weight.parameters())


def tltorch_rho(convs, keep, fact) -> float:
    """TensorLy-Torch's `rank=rho` (a float) bisected so that its factorized convs keep `keep` of the
    dense parameters (the largest rho found not above it)."""
    dense = sum(c.weight.numel() for c in convs)
    lo, hi = 1e-3, 16.0
    for _ in range(18):
        mid = (lo + hi) / 2
        if sum(_tltorch_params(c, mid, fact) for c in convs) <= keep * dense:
            lo = mid
        else:
            hi = mid
    return lo


def tltorch_row(base, dense_acc, ft, ev, p) -> dict:
    import tltorch

    fact, keep = p["method"], p["keep"]
    names = conv_names(base)
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    dense_params = sum(modules[n].weight.numel() for n in names)  # convs have no bias
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rho = tltorch_rho([modules[n] for n in names], keep, fact)
        kept, errs = 0, []
        for n in names:
            conv = modules[n]
            fc = tltorch.FactorizedConv.from_conv(
                conv, rank=rho, factorization=fact, decompose_weights=True
            )
            kept += sum(q.numel() for q in fc.weight.parameters())
            w = conv.weight.detach()
            rec = fc.weight.to_tensor().detach()
            if fact == "tt":  # TensorLy-Torch's TT conv tensor is ordered (in, kh, kw, out)
                rec = rec.permute(3, 0, 1, 2)
            rec = rec.reshape(w.shape)
            errs.append(float(torch.linalg.norm(w - rec) / torch.linalg.norm(w)))
            parent, _, child = n.rpartition(".")
            setattr(modules[parent], child, fc)
    c_s = time.time() - t0
    row = {
        "library": f"tltorch {metadata.version('tensorly-torch')}",
        "method": f"{fact} (rank={rho:.3g})",
        "keep": keep,
        "achieved keep": round(kept / dense_params, 3),
        "methods used": fact,
        "conv params": kept,
        "mean rel. weight error": round(sum(errs) / len(errs), 3),
        "layers slower than dense": "-",
    }
    row.update(finetune_and_eval(model, dense_acc, ft, ev, p))
    row["compress s"] = round(c_s, 1)
    return row


def truncation_trial(p: dict) -> dict:
    """The truncation study on `cnn4-fashion` (one trial): its rows, recovery curve and dense
    accuracy as JSON."""
    data = fashion(p["seed"])
    cnn4 = zoo.get("cnn4-fashion").pretrained(seed=p["seed"], progress=True)
    lo, hi = TRAIN_SUBSET, TRAIN_SUBSET + p["retrain_size"]
    study = truncation_study(
        cnn4,
        data.x_test[: p["eval_size"]],
        data.y_test[: p["eval_size"]],
        retains=(0.9, 0.5),
        mps_fractions=(0.5,),
        retrain_epochs=p["retrain_epochs"],
        x_train=data.x_train[lo:hi],
        y_train=data.y_train[lo:hi],
        seed=p["seed"],
    )
    return {
        "dense": study.dense_accuracy,
        "rows": [dataclasses.asdict(r) for r in study.rows],
        "recovery": study.recovery,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny subsets, one keep (smoke run)")
    ap.add_argument(
        "--garipov",
        default=None,
        help="zoo GaripovNet to compress (default: garipov-sgd when its weights are cached, "
        "else garipov-fashion; garipov-sgd is never trained by this benchmark unless named)",
    )
    add_sweep_args(ap)
    args = ap.parse_args()
    eval_size, ft_size, retrain_size, trunc_eval_size, keeps = (
        EVAL_SIZE, FT_SIZE, RETRAIN_SIZE, TRUNC_EVAL_SIZE, KEEPS,
    )  # fmt: skip
    if args.quick:
        eval_size, ft_size, retrain_size, trunc_eval_size, keeps = 200, 128, 256, 200, [0.25]
    model_name = garipov_name(args.garipov, SEED)
    if model_name not in zoo.ZOO:
        ap.error(f"--garipov: unknown zoo model {model_name!r}")

    def log(row):
        print(row, file=sys.stderr, flush=True)

    torch.set_num_threads(THREADS)
    load = os.getloadavg()[0]
    t_start = time.time()
    try:
        fashion(SEED)
    except TensorSlimError as exc:
        sys.exit(f"{exc}\n(run `make bench-deps`)")
    name = "cnn_fashion" + ("_quick" if args.quick else "")
    path = trials_path(name)
    if args.fresh:
        log({"fresh": f"{forget_trials(path)} earlier trials forgotten"})
    dense_acc = garipov_setup(model_name, SEED, eval_size, ft_size, EXAMPLE_BATCH)[1]
    log({"model": model_name, "dense accuracy": dense_acc})

    # Every trial carries all it depends on, so its key changes with any of them.
    fixed = {
        "model": model_name, "seed": SEED, "eval_size": eval_size, "ft_size": ft_size,
        "ft_epochs": FT_EPOCHS, "ft_lr": FT_LR, "example_batch": EXAMPLE_BATCH,
    }  # fmt: skip
    first = [k for k in keeps if k == 0.25] or keeps[:1]
    rest = [k for k in keeps if k not in first]
    have_tltorch = util.find_spec("tltorch") is not None
    tl_version = metadata.version("tensorly-torch") if have_tltorch else None
    # keep 0.25 side by side first (auto first), then the baseline; then the other keeps
    stages = [[{**fixed, "kind": "dense", "method": "-", "keep": 1.0}]]
    for keep_list in (first, rest):
        if not keep_list:
            continue
        stages.append(
            [{**fixed, "kind": "tensorslim", "method": m, "keep": k}
             for m in METHODS[::-1] for k in keep_list]  # fmt: skip
        )
        if have_tltorch:
            stages.append(grid({"method": TLTORCH, "keep": keep_list}, {**fixed, "kind": "tltorch"}))
    trunc_params = {
        "kind": "truncation", "seed": SEED, "eval_size": trunc_eval_size,
        "retrain_size": retrain_size, "retrain_epochs": RETRAIN_EPOCHS,
    }  # fmt: skip
    rows: list[dict] = []
    counts = {"ran": 0, "reused": 0}
    trunc = {"rows": [], "recovery": [], "dense": None, "plot": None}
    baseline_note = (
        f"tensorly-torch {tl_version} imported and ran."
        if have_tltorch
        else "tensorly-torch is not installed (`.[bench]` extra); no baseline rows."
    )

    def write(final: bool) -> None:
        order = {m: i for i, m in enumerate(METHODS)}
        lib_order = {"dense": 0, "tensorslim": 1}
        shown = sorted(
            rows,
            key=lambda r: (
                lib_order.get(r["library"], 2),
                order.get(r["method"], 99),
                r["methods used"],
                r["keep"],
            ),
        )
        missed = [
            f"{r['library']} {r['methods used']} at keep {r['keep']} (achieved {r['achieved keep']})"
            for r in rows
            if abs(r["achieved keep"] - r["keep"]) > 0.03
        ]
        missed_note = f" Keep not reachable within 0.03: {'; '.join(missed)}." if missed else ""
        auto25 = [r for r in rows if r["method"] == "auto" and r["keep"] == 0.25]
        verdict = ""
        if auto25:
            drops = [auto25[0][f"drop after {e} ep (pts)"] for e in range(1, FT_EPOCHS + 1)]
            best = min(drops)
            verdict = (
                f"**auto at keep 0.25**: drop {' / '.join(map(str, drops))} points after "
                f"{' / '.join(str(e) for e in range(1, FT_EPOCHS + 1))} epoch(s) of fine-tuning "
                f"({'meets' if best <= 1.0 else 'misses'} the <= 1.0 target)."
            )
            dense_ft = [r for r in rows if r["library"] == "dense"]
            if dense_ft:
                last = f"acc after {FT_EPOCHS} ep"
                gap = round(100 * (dense_ft[0][last] - auto25[0][last]), 2)
                verdict += (
                    f" Against the dense model fine-tuned identically ({dense_ft[0][last]}), "
                    f"auto at keep 0.25 is {gap} points lower after {FT_EPOCHS} epochs."
                )
        status = (
            "" if final else "PARTIAL RESULTS (the run was still going when this was written). "
        )
        notes = f"""
{status}{sweep_note(path, counts["ran"], counts["reused"], args)}GaripovNet: zoo `{model_name}` ({zoo.get(model_name).description}; seed {SEED}; `--garipov`
picks it, by default `garipov-sgd` when its weights are cached, else `garipov-fashion`);
dense accuracy {dense_acc:.4f} on the first {eval_size} test images. Compressed: conv2..conv6 (first
conv and classifier dense), allocator uniform; "keep" = fraction of those convs' parameters.
compress got an example batch of {EXAMPLE_BATCH} test images, so "auto" measured each option's CPU
latency on the layer's real input shape and avoided options slower than the dense layer.
Fine-tuning: {FT_EPOCHS} epochs, Adam lr {FT_LR}, batch 64, on {ft_size} training images the base never
saw; accuracy after each epoch. "dense" is the uncompressed model fine-tuned identically.
{baseline_note} TensorLy-Torch's `rank=rho` was bisected per keep so its parameter count hits the
keep (its Tucker also compresses the spatial modes).{missed_note} {verdict}

Truncation: `cnn4-fashion` (trained on {TRAIN_SUBSET} images, 3 epochs), dense accuracy
{trunc["dense"] if trunc["dense"] is None else round(trunc["dense"], 4)} on the first {trunc_eval_size} test images; every conv alone and all convs together
truncated along each of the 7 cuts to norm retention 0.9 / 0.5, and as an MPS along (out, in, kh, kw)
with bonds at 50% of full ("mps"). Recovery: the worst all-layer truncation retrained
{RETRAIN_EPOCHS} epoch(s) (Adam 1e-3) on {retrain_size} unseen training images. Plot: results/{trunc["plot"]}.
Torch threads {THREADS} per trial; 1-minute load average {load:.2f} at the start (2 cores).
Elapsed {(time.time() - t_start) / 60:.1f} min.
"""
        write_results(
            name,
            {
                GARIPOV_TABLE: shown,
                "cnn4: truncation recovery by retraining": trunc["recovery"],
                "cnn4: truncation along cuts": trunc["rows"],
            },
            command=" ".join(["python benchmarks/cnn_fashion.py", *sys.argv[1:]]),
            seeds={"model": SEED, "data_split": SEED, "finetune": SEED},
            notes=notes,
            extra={
                "model": model_name,
                "dense_accuracy": dense_acc,
                "truncation_dense_accuracy": trunc["dense"],
            },
        )

    def sweep(trials):
        res = run_trials(trial, trials, path, args, threads=THREADS, description=name)
        counts["ran"] += res.ran
        counts["reused"] += res.reused
        return res.rows

    write(final=False)
    for stage in stages:
        rows.extend(sweep(stage))
        write(final=False)
    study = sweep([trunc_params])[0]
    trunc_study = TruncationStudy(
        study["dense"], [TruncationRow(**r) for r in study["rows"]], study["recovery"]
    )
    trunc["rows"] = [
        {
            "layer": r.layer,
            "cut": r.cut,
            "level": r.level,
            "bond": r.bond,
            "norm loss 1-‖K~‖/‖K‖": round(r.norm_loss, 4),
            "1-‖K~‖²/‖K‖²": round(r.norm_loss_sq, 4),
            "accuracy": round(r.accuracy, 4),
            "drop (pts)": round(r.drop, 2),
        }
        for r in trunc_study.rows
    ]
    trunc["recovery"] = trunc_study.recovery
    trunc["dense"] = trunc_study.dense_accuracy
    trunc["plot"] = plot_truncation(
        trunc_study, RESULTS / f"{name}_truncation.png", title="cnn4-fashion"
    ).name
    log({"truncation": "done", "minutes": round((time.time() - t_start) / 60, 1)})
    write(final=True)


if __name__ == "__main__":
    main()
