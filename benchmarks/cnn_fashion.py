"""Benchmark `cnn_fashion`: GaripovNet on Fashion-MNIST compressed with every tensor method, next to
TensorLy-Torch's factorized convolutions; and truncation along cuts of a vanilla 4-layer CNN.

Model: the zoo's `garipov-fashion` (trained once, seeded, on the first 15k images of the 55k training
split for 2 epochs; cached). Compressed: conv2..conv6 (the first conv and the Linear classifier stay
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
Run: .venv/bin/python benchmarks/cnn_fashion.py [--quick] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from importlib import metadata

import torch

from _common import RESULTS, write_results
from tensorslim import compress, zoo
from tensorslim.errors import TensorSlimError
from tensorslim.report.truncation_plot import plot_truncation
from tensorslim.study.truncation import truncation_study
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
# --resume: GaripovNet rows of an earlier run of this command, by (library, method, keep); reused as
# they were instead of being measured again (the notes say how many).
PRIOR: dict[tuple, dict] = {}


GARIPOV_TABLE = "GaripovNet: accuracy after compression and fine-tuning"


def prior_key(row: dict) -> tuple:
    lib = row["library"].split()[0]
    return (lib, row["methods used"] if lib == "tltorch" else row["method"], row["keep"])


def conv_names(model):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.startswith("features.") and n != "features.0"
    ]


def finetune_and_eval(model, dense_acc, ft, ev) -> dict:
    """Accuracy before fine-tuning and after each of FT_EPOCHS epochs, and the drops in points."""
    x_ft, y_ft = ft
    out = {"acc before FT": round(accuracy(model, *ev), 4)}
    ft_time = [0.0]
    t0 = [time.time()]

    def after_epoch(epoch, m):
        ft_time[0] += time.time() - t0[0]
        out[f"acc after {epoch} ep"] = round(accuracy(m, *ev), 4)
        t0[0] = time.time()

    fit(model, x_ft, y_ft, epochs=FT_EPOCHS, lr=FT_LR, seed=SEED, on_epoch=after_epoch)
    for e in range(1, FT_EPOCHS + 1):
        out[f"drop after {e} ep (pts)"] = round(100 * (dense_acc - out[f"acc after {e} ep"]), 2)
    out["FT s"] = round(ft_time[0], 1)
    return out


def dense_rows(base, dense_acc, ft, ev, log):
    if ("dense", "-", 1.0) in PRIOR:
        return [PRIOR[("dense", "-", 1.0)]]
    model = copy.deepcopy(base)
    n = sum(model.get_submodule(c).weight.numel() for c in conv_names(model))
    row = {"library": "dense", "method": "-", "keep": 1.0, "achieved keep": 1.0,
           "methods used": "-", "conv params": n, "mean rel. weight error": 0.0}  # fmt: skip
    row.update(finetune_and_eval(model, dense_acc, ft, ev))
    row["compress s"] = 0.0
    log(row)
    return [row]


def tensorslim_rows(base, dense_acc, ft, ev, example, keeps, methods, log):
    rows = []
    for method in methods:
        for keep in keeps:
            if ("tensorslim", method, keep) in PRIOR:
                rows.append(PRIOR[("tensorslim", method, keep)])
                continue
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
            row.update(finetune_and_eval(small, dense_acc, ft, ev))
            row["compress s"] = round(c_s, 1)
            rows.append(row)
            log(row)
    return rows


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


def tltorch_rows(base, dense_acc, ft, ev, keeps, factorizations, log):
    import tltorch

    rows = []
    names = conv_names(base)
    for fact in factorizations:
        for keep in keeps:
            if ("tltorch", fact, keep) in PRIOR:
                rows.append(PRIOR[("tltorch", fact, keep)])
                continue
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
                    kept += sum(p.numel() for p in fc.weight.parameters())
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
            row.update(finetune_and_eval(model, dense_acc, ft, ev))
            row["compress s"] = round(c_s, 1)
            rows.append(row)
            log(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny subsets, one keep (smoke run)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the GaripovNet rows already in results/cnn_fashion.json; measure the missing ones",
    )
    args = ap.parse_args()
    global EVAL_SIZE, FT_SIZE, RETRAIN_SIZE, TRUNC_EVAL_SIZE
    keeps = KEEPS
    if args.quick:
        EVAL_SIZE, FT_SIZE, RETRAIN_SIZE, TRUNC_EVAL_SIZE, keeps = 200, 128, 256, 200, [0.25]

    def log(row):
        print(row, file=sys.stderr, flush=True)

    torch.set_num_threads(THREADS)
    load = os.getloadavg()[0]
    t_start = time.time()
    try:
        data = load_fashion_mnist(seed=SEED)
    except TensorSlimError as exc:
        sys.exit(f"{exc}\n(run `make bench-deps`)")
    name = "cnn_fashion" + ("_quick" if args.quick else "")
    ev = (data.x_test[:EVAL_SIZE], data.y_test[:EVAL_SIZE])
    ft = (
        data.x_train[TRAIN_SUBSET : TRAIN_SUBSET + FT_SIZE],
        data.y_train[TRAIN_SUBSET : TRAIN_SUBSET + FT_SIZE],
    )
    example = data.x_test[:EXAMPLE_BATCH]

    trunc = {"rows": [], "recovery": [], "dense": None, "plot": None}

    def run_truncation() -> None:
        cnn4 = zoo.get("cnn4-fashion").pretrained(seed=SEED, progress=True)
        rt = (
            data.x_train[TRAIN_SUBSET : TRAIN_SUBSET + RETRAIN_SIZE],
            data.y_train[TRAIN_SUBSET : TRAIN_SUBSET + RETRAIN_SIZE],
        )
        study = truncation_study(
            cnn4,
            data.x_test[:TRUNC_EVAL_SIZE],
            data.y_test[:TRUNC_EVAL_SIZE],
            retains=(0.9, 0.5),
            mps_fractions=(0.5,),
            retrain_epochs=RETRAIN_EPOCHS,
            x_train=rt[0],
            y_train=rt[1],
            seed=SEED,
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
            for r in study.rows
        ]
        trunc["recovery"] = study.recovery
        trunc["dense"] = study.dense_accuracy
        trunc["plot"] = plot_truncation(
            study, RESULTS / f"{name}_truncation.png", title="cnn4-fashion"
        ).name
        log({"truncation": "done", "minutes": round((time.time() - t_start) / 60, 1)})

    base = zoo.get("garipov-fashion").pretrained(seed=SEED, progress=True)
    dense_acc = accuracy(base, *ev)
    log({"dense accuracy": dense_acc})
    resumed = ""
    if args.resume and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        if old.get("dense_accuracy") != dense_acc:
            sys.exit("--resume: the earlier run's dense accuracy differs; not mixing the two runs")
        PRIOR.update(
            (prior_key(r), r) for r in old["tables"][GARIPOV_TABLE] if "drop after 1 ep (pts)" in r
        )
        when = old["machine"].get("date_utc", "?")
        resumed = (
            f"{len(PRIOR)} GaripovNet rows were reused from the earlier run of {when} UTC "
            "(`--resume`); the others were measured in this run. "
        )
    rows: list[dict] = []
    baseline_note = "tensorly-torch not run yet."

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
        fresh = [f"{k[0]} {k[1]} keep {k[2]}" for k in map(prior_key, rows) if k not in PRIOR]
        measured = (
            f"GaripovNet rows measured in this run: {', '.join(fresh) or 'none'}. "
            if resumed
            else ""
        )
        notes = f"""
{status}{resumed}{measured}GaripovNet (zoo `garipov-fashion`, trained on {TRAIN_SUBSET} images for 2 epochs, seed {SEED});
dense accuracy {dense_acc:.4f} on the first {EVAL_SIZE} test images. Compressed: conv2..conv6 (first
conv and classifier dense), allocator uniform; "keep" = fraction of those convs' parameters.
compress got an example batch of {EXAMPLE_BATCH} test images, so "auto" measured each option's CPU
latency on the layer's real input shape and avoided options slower than the dense layer.
Fine-tuning: {FT_EPOCHS} epochs, Adam lr {FT_LR}, batch 64, on {FT_SIZE} training images the base never
saw; accuracy after each epoch. "dense" is the uncompressed model fine-tuned identically.
{baseline_note} TensorLy-Torch's `rank=rho` was bisected per keep so its parameter count hits the
keep (its Tucker also compresses the spatial modes).{missed_note} {verdict}

Truncation: `cnn4-fashion` (trained on {TRAIN_SUBSET} images, 3 epochs), dense accuracy
{trunc["dense"] if trunc["dense"] is None else round(trunc["dense"], 4)} on the first {TRUNC_EVAL_SIZE} test images; every conv alone and all convs together
truncated along each of the 7 cuts to norm retention 0.9 / 0.5, and as an MPS along (out, in, kh, kw)
with bonds at 50% of full ("mps"). Recovery: the worst all-layer truncation retrained
{RETRAIN_EPOCHS} epoch(s) (Adam 1e-3) on {RETRAIN_SIZE} unseen training images. Plot: results/{trunc["plot"]}.
Torch threads {THREADS}; 1-minute load average {load:.2f} at the start (2 cores).
Elapsed {(time.time() - t_start) / 60:.1f} min.
"""
        write_results(
            name,
            {
                GARIPOV_TABLE: shown,
                "cnn4: truncation recovery by retraining": trunc["recovery"],
                "cnn4: truncation along cuts": trunc["rows"],
            },
            command="python benchmarks/cnn_fashion.py"
            + (" --quick" if args.quick else "")
            + (" --resume" if resumed else ""),
            seeds={"model": SEED, "data_split": SEED, "finetune": SEED},
            notes=notes,
            extra={"dense_accuracy": dense_acc, "truncation_dense_accuracy": trunc["dense"]},
        )

    def add(new_rows):
        rows.extend(new_rows)
        write(final=False)

    def tl(keep_list):
        nonlocal baseline_note
        try:
            add(tltorch_rows(base, dense_acc, ft, ev, keep_list, TLTORCH, log))
            baseline_note = f"tensorly-torch {metadata.version('tensorly-torch')} imported and ran."
        except ImportError as exc:
            baseline_note = f"tensorly-torch could not be imported ({exc}); no baseline rows."

    write(final=False)
    add(dense_rows(base, dense_acc, ft, ev, log))
    first = [k for k in keeps if k == 0.25] or keeps[:1]
    rest = [k for k in keeps if k not in first]
    for method in METHODS[::-1]:  # keep 0.25 side by side first (auto first), then the baseline
        add(tensorslim_rows(base, dense_acc, ft, ev, example, first, [method], log))
    tl(first)
    for method in METHODS[::-1]:
        add(tensorslim_rows(base, dense_acc, ft, ev, example, rest, [method], log))
    tl(rest)
    run_truncation()
    write(final=True)


if __name__ == "__main__":
    main()
