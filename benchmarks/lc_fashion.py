"""Benchmark `lc_fashion`: the learning-compression (LC) algorithm against direct compression plus
fine-tuning, on LeNet300-100 and GaripovNet trained on Fashion-MNIST, for quantization (Q, 1/2/4
bits), pruning (P), low rank (L) and their additive combinations (Q+P, L+P, Q+L, Q+L+P).

Models: the zoo's `lenet300-fashion` (784-300-100-10, Adam, 30 epochs on the 55k training split)
and GaripovNet: `garipov-sgd` (SGD recipe of Schuurmans et al. on the 55k split) when its weights
are cached, else `garipov-fashion` (2 epochs on 15k images); `--garipov` picks one. Every weight
matrix is compressed (all Linear layers; all convolutions and the classifier of GaripovNet), one
spec per layer: Q_b = [quant b bits] (one k-means codebook per layer); the other rows are sized per
layer to the model's matched storage M bits per weight (LeNet300 1.1, GaripovNet 1.5): P = sparse
with M m n / (32 + index bits) nonzeros; L = lowrank with rank M m n / (32 (m + n)); combinations
put 1 bit into quantization and split the rest evenly (a component that would get no rank or no
nonzero in a small layer is left out there). Storage is the plan's: codes, codebooks, sparse values
and positions, factors, and every other parameter and buffer at float32.

Methods, same training data, same number of optimizer steps:
- LC: direct compression, then STEPS LC steps (mu_k = mu0 * growth^k; L step: BATCHES batches of
  SGD with Nesterov momentum 0.9 at lr * lr_decay^k on loss + mu/2 ||w - Delta - lambda/mu||^2;
  C step: exact projection, additive parts by alternation; multiplier update).
- DC+FT: direct compression, then the same STEPS x BATCHES batches of fine-tuning of the
  compressed model's own parameters (codebooks, kept values, low-rank factors, biases, BatchNorm;
  the codes and positions stay: `tensorslim.lc.finetune(how="modules")`) with Adam at the lr below,
  decaying alike. Adam because SGD at the L step's learning rate destroys a codebook (each entry
  gets the summed gradient of all its weights). `--baseline reproject` runs iterated direct
  compression instead (train the dense weights with LC's SGD schedule, project after every chunk).
GaripovNet: BatchNorm statistics of every compressed model (DC, LC, DC+FT) are re-estimated on
RECALIBRATE training batches (`recalibrate=`). Test error on the first EVAL images of the
official test set for the dense reference, after direct compression (no training) and after each
method. Times are wall-clock seconds of each run, one torch thread (two threads on the shared
2-core machine were 40x slower per batch), under whatever else the machine was running.

Run: .venv/bin/python benchmarks/lc_fashion.py [--quick] [--models lenet300,garipov]
     [--rows Q1,Q2,Q4,P,L,Q+P,L+P,Q+L,Q+L+P] [--baseline reproject|modules] [--garipov NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from _common import RESULTS, garipov_name, write_results
from tensorslim import lc, zoo
from tensorslim.core.handler import handler_for
from tensorslim.layers.sparse import index_bits
from tensorslim.report.plots import _pyplot, save_figure
from tensorslim.train import accuracy
from tensorslim.zoo.fashion import load_fashion_mnist

SEED = 0
THREADS = 1
ROWS = ["Q1", "Q2", "Q4", "P", "L", "Q+P", "L+P", "Q+L", "Q+L+P"]
# Per model: zoo name, matched storage (bits per weight), LC schedule and L-step length, eval size.
CONFIG = {
    "lenet300": {
        "zoo": "lenet300-fashion",
        "bpw": 1.1,
        "batch": 128,
        "schedule": {"steps": 20, "batches": 120, "mu0": 1e-3, "growth": 1.45, "lr": 0.05,
                     "lr_decay": 0.95},
        "baseline": {"optimizer": "adam", "lr": 1e-3},
        "recalibrate": 0,
        "eval": 10_000,
        "rows": ROWS,
        "goal": (30.0, 0.5),
    },
    "garipov": {
        "zoo": None,  # garipov-sgd if cached, else garipov-fashion (see --garipov)
        "bpw": 1.5,
        "batch": 32,
        "schedule": {"steps": 8, "batches": 24, "mu0": 0.1, "growth": 1.8, "lr": 0.01,
                     "lr_decay": 0.95},
        "baseline": {"optimizer": "adam", "lr": 2e-4},
        "recalibrate": 20,
        "eval": 2_000,
        "rows": ["Q1", "Q+P"],
        "goal": (16.0, 1.0),
    },
}
QUICK = {
    "lenet300": {"schedule": {"steps": 3, "batches": 20}, "eval": 1000},
    "garipov": {"schedule": {"steps": 2, "batches": 2}, "eval": 200},
}
# Published LC results (MNIST, not Fashion-MNIST), for scale: the LC toolkit's LeNet300 examples
# (Idelbayev & Carreira-Perpinan; reference test error 2.13 %), and the papers' headline claims.
PAPERS = [
    ("LeNet300 / MNIST, LC toolkit", "reference", "2.13 %"),
    ("LeNet300 / MNIST, LC toolkit", "Q 1 bit (k=2 codebook per layer)", "2.56 %"),
    ("LeNet300 / MNIST, LC toolkit", "P 5 % of weights kept", "2.18 %"),
    ("LeNet300 / MNIST, LC toolkit", "Q 1 bit (one codebook) + P 1 %", "2.17 %"),
    ("LeNet300 / MNIST, LC toolkit", "L rank selection alpha=1e-6", "1.90 %"),
    ("Idelbayev & Carreira-Perpinan, ECML-PKDD 2021", "ResNets, AlexNet: Q 1 bit + ~1 % P",
     "no error increase"),
    ("Idelbayev & Carreira-Perpinan, ECML-PKDD 2021", "VGG: L + a few float weights (P)",
     "best combination"),
    ("Idelbayev & Carreira-Perpinan, IJCNN 2021", "Q vs P vs L under LC",
     "model-dependent: VGG16 best pruned, ResNets best quantized"),
]


def matrices(model) -> list[tuple[str, int, int]]:
    """(name, m, n) of every Linear / Conv2d weight matrix."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and handler_for(module):
            w = module.weight
            out.append((name, int(w.shape[0]), int(w[0].numel())))
    return out


def _rank(m: int, n: int, bits: float) -> int:
    return int(bits // (32 * (m + n)))


def _nonzeros(m: int, n: int, bits: float) -> int:
    return int(bits // (32 + index_bits(m * n)))


def row_specs(row: str, mats: list[tuple[str, int, int]], bpw: float) -> dict[str, list[dict]]:
    """{layer: spec} of a row at `bpw` bits per weight (Q rows at their own bits). A kind that
    gets no rank or nonzero in a layer is left out there, but every kind of the row is kept in
    its largest layer (rank or count 1 at least), so a row is what its name says."""
    specs: dict[str, list[dict]] = {}
    if row in ("Q1", "Q2", "Q4"):
        return {name: [{"kind": "quant", "bits": int(row[1])}] for name, _, _ in mats}
    kinds = row.split("+")
    others = [k for k in kinds if k != "Q"]
    rest = bpw - (1.0 if "Q" in kinds else 0.0)
    largest = max(mats, key=lambda t: t[1] * t[2])[0]
    for name, m, n in mats:
        size = m * n
        spec = [{"kind": "quant", "bits": 1}] if "Q" in kinds else []
        for k in others:
            budget = rest / len(others) * size
            force = name == largest or len(kinds) == 1
            if k == "L":
                r = max(_rank(m, n, budget), 1 if force else 0)
                if r > 0:
                    spec.append({"kind": "lowrank", "rank": min(r, min(m, n))})
            else:
                kappa = max(_nonzeros(m, n, budget), 1 if force else 0)
                if kappa > 0:
                    spec.append({"kind": "sparse", "nonzeros": min(kappa, size)})
        specs[name] = spec
    return specs


def describe(specs: dict[str, list[dict]], mats: list[tuple[str, int, int]]) -> str:
    """A short summary of a row's components: bits, kept fraction, ranks."""
    total = sum(m * n for _, m, n in mats)
    bits = sorted({c["bits"] for s in specs.values() for c in s if c["kind"] == "quant"})
    nz = sum(c["nonzeros"] for s in specs.values() for c in s if c["kind"] == "sparse")
    ranks = [str(c["rank"]) for s in specs.values() for c in s if c["kind"] == "lowrank"]
    parts = []
    if bits:
        parts.append("/".join(map(str, bits)) + " bit")
    if nz:
        parts.append(f"{100 * nz / total:.2g} % nz")
    if ranks:
        parts.append("ranks " + ",".join(ranks))
    return " + ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny schedules and eval sets (smoke)")
    ap.add_argument("--models", default="lenet300,garipov", help="lenet300,garipov")
    ap.add_argument(
        "--rows", default=None,
        help=f"rows for every model ({','.join(ROWS)}); default: all for lenet300, "
        f"{','.join(CONFIG['garipov']['rows'])} for garipov",
    )
    ap.add_argument("--baseline", default="modules", choices=["reproject", "modules"])
    ap.add_argument("--garipov", default=None, help="zoo name of the GaripovNet to compress")
    ap.add_argument(
        "--merge", action="store_true",
        help="keep the rows of the existing results file that this run does not redo "
        "(the models and rows of other runs, with their commands listed)",
    )
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    rows_given = [r for r in args.rows.split(",") if r] if args.rows else None
    bad = [m for m in models if m not in CONFIG] + [r for r in rows_given or [] if r not in ROWS]
    if bad:
        sys.exit(f"unknown model or row: {', '.join(bad)}")
    torch.set_num_threads(THREADS)  # 2 threads on a shared 2-core machine thrash (40x slower)
    load = os.getloadavg()[0]
    t_start = time.time()
    data = load_fashion_mnist(seed=SEED)
    name = "lc_fashion" + ("_quick" if args.quick else "")
    table, dense_rows, configs = [], [], {}
    kept = previous(name, models, rows_given) if args.merge else {"table": [], "dense": [],
                                                                    "configs": {}, "commands": []}

    def log(obj) -> None:
        print(obj, file=sys.stderr, flush=True)

    for key in models:
        cfg = copy.deepcopy(CONFIG[key])
        if args.quick:
            cfg["schedule"].update(QUICK[key]["schedule"])
            cfg["eval"] = QUICK[key]["eval"]
        zoo_name = cfg["zoo"] or garipov_name(args.garipov, SEED)
        entry = zoo.get(zoo_name)
        base = entry.pretrained(seed=SEED, progress=True)
        split = entry.data()
        ev = (data.x_test[: cfg["eval"]], data.y_test[: cfg["eval"]])
        train = (split.x_train, split.y_train)
        mats = matrices(base)
        dense_err = 100 * (1 - accuracy(base, *ev))
        n_weights = sum(m * n for _, m, n in mats)
        configs[key] = {**cfg, "zoo": zoo_name, "weights compressed": n_weights,
                        "train images": len(train[1])}
        dense_rows.append({"model": key, "zoo": zoo_name, "test error %": round(dense_err, 2),
                           "params": sum(p.numel() for p in base.parameters()),
                           "compressed matrices": len(mats), "their weights": n_weights})
        log({"model": key, "zoo": zoo_name, "dense error": dense_err})
        schedule = lc.Schedule(**cfg["schedule"])
        ft_schedule = lc.Schedule(
            **{k: v for k, v in cfg["schedule"].items() if k in ("steps", "batches", "lr_decay")},
            **(cfg["baseline"] if args.baseline == "modules" else
               {k: v for k, v in cfg["schedule"].items() if k in ("lr",)}),
        )

        def err(model, ev=ev) -> float:
            return 100 * (1 - accuracy(model, *ev))

        for row in rows_given or cfg["rows"]:
            specs = row_specs(row, mats, cfg["bpw"])
            kw = dict(batch_size=cfg["batch"], seed=SEED, recalibrate=cfg["recalibrate"])
            results = {}
            for method in ("LC", "DC+FT"):
                t0 = time.time()
                if method == "LC":
                    small, res = lc.compress(base, specs, train, schedule=schedule, **kw)
                else:
                    small, res = lc.finetune(base, specs, train, how=args.baseline,
                                             schedule=ft_schedule, **kw)
                seconds = time.time() - t0
                results[method] = (small, res, seconds)
            plan = results["LC"][1].plan
            bits_layers = sum(lp.bits_after for lp in plan.layers if lp.factorized)
            t0 = time.time()
            dc_model, _ = lc.direct(base, specs, train, batch_size=cfg["batch"],
                                    recalibrate=cfg["recalibrate"])
            dc_err = err(dc_model)
            dc_seconds = time.time() - t0
            for method, (small, res, seconds) in results.items():
                after = err(small)
                out = {
                    "model": key,
                    "row": row,
                    "method": method,
                    "components": describe(specs, mats),
                    "bits/weight": round(bits_layers / n_weights, 3),
                    "ratio vs float32": round(res.compression_ratio, 2),
                    "dense error %": round(dense_err, 2),
                    "DC error %": round(dc_err, 2),
                    "error %": round(after, 2),
                    "delta (pts)": round(after - dense_err, 2),
                    "final rel. violation": (
                        round(res.history[-1]["rel_violation"], 4)
                        if res.history and "rel_violation" in res.history[-1] else "-"
                    ),
                    "time s": round(seconds, 1),
                    "DC time s": round(dc_seconds, 1),
                }
                table.append(out)
                log(out)
            write(name, args, table, dense_rows, configs, load, t_start, False, kept)
    write(name, args, table, dense_rows, configs, load, t_start, True, kept)


def previous(name: str, models: list[str], rows_given: list[str] | None) -> dict:
    """Rows of the existing results file that a run of `models` x rows does not redo."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return {"table": [], "dense": [], "configs": {}, "commands": []}
    old = json.loads(path.read_text())
    tables = old["tables"]

    def redone(r) -> bool:
        rows = rows_given or CONFIG[r["model"]]["rows"] if r["model"] in models else []
        return r["model"] in models and r["row"] in rows

    return {
        "table": [r for r in tables["LC vs direct compression + fine-tuning"] if not redone(r)],
        "dense": [r for r in tables["Reference models"] if r["model"] not in models],
        "configs": {k: v for k, v in old.get("configs", {}).items() if k not in models},
        "commands": old.get("commands", [old["command"]]),
    }


def goal_lines(table, configs) -> list[str]:
    lines = []
    for key, cfg in configs.items():
        ratio, pts = cfg["goal"]
        rows = [r for r in table if r["model"] == key]
        if not rows:
            continue
        ok = [r for r in rows if r["ratio vs float32"] >= ratio and r["delta (pts)"] <= pts]
        best = sorted(ok, key=lambda r: -r["ratio vs float32"])
        lc_wins = []
        for row in {r["row"] for r in rows}:
            pair = {r["method"]: r for r in rows if r["row"] == row}
            if "LC" in pair and "DC+FT" in pair:
                lc_wins.append((row, pair["LC"]["error %"] < pair["DC+FT"]["error %"]))
        won = sum(w for _, w in lc_wins)
        lines.append(
            f"**{key}** goal >= {ratio:g}x at <= {pts:g} point(s) more test error: "
            + (
                "met by " + ", ".join(f"{r['row']} {r['method']} ({r['ratio vs float32']}x, "
                                      f"{r['delta (pts)']:+} pts)" for r in best[:4])
                if best else "not met by any row"
            )
            + f". LC has lower test error than DC+FT in {won} of {len(lc_wins)} rows"
            + (
                " (not in: " + ", ".join(r for r, w in sorted(lc_wins) if not w) + ")."
                if won < len(lc_wins) else "."
            )
        )
    return lines


def plot(table, path) -> str:
    plt = _pyplot()
    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, key in zip(axes[0], models):
        for method, marker in (("LC", "o"), ("DC+FT", "x")):
            rows = [r for r in table if r["model"] == key and r["method"] == method]
            ax.scatter([r["ratio vs float32"] for r in rows], [r["error %"] for r in rows],
                       marker=marker, label=method)
            for r in rows:
                ax.annotate(r["row"], (r["ratio vs float32"], r["error %"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        dense = next(r["dense error %"] for r in table if r["model"] == key)
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio vs float32 (storage bits)")
        ax.set_ylabel("test error (%)")
        ax.set_title(key)
        ax.legend()
    return save_figure(fig, path).name


def write(name, args, table, dense_rows, configs, load, t_start, final: bool, kept) -> None:
    minutes = (time.time() - t_start) / 60
    command = "python benchmarks/lc_fashion.py " + " ".join(sys.argv[1:])
    commands = [*kept["commands"], command] if kept["commands"] else [command]
    order = {k: i for i, k in enumerate(CONFIG)}
    table = sorted(kept["table"] + table,
                   key=lambda r: (order[r["model"]], ROWS.index(r["row"]), r["method"] != "LC"))
    dense_rows = sorted(kept["dense"] + dense_rows, key=lambda r: order[r["model"]])
    configs = {**kept["configs"], **configs}
    png = plot(table, RESULTS / f"{name}.png") if final and table else None
    notes = [
        __doc__.split("Run:")[0].strip(),
        "",
        *(["Rows merged from the runs of: " + "; ".join(f"`{c}`" for c in commands), ""]
          if len(commands) > 1 else []),
        f"Baseline: `{args.baseline}`. Torch threads {THREADS}; 1-minute load average {load:.2f} "
        f"at the start ({os.cpu_count()} cores). Elapsed {minutes:.1f} min"
        + ("" if final else " (partial: still running)") + ".",
        "",
        *(
            f"- {key} (`{c['zoo']}`, {c['weights compressed']} weights compressed, "
            f"{c['train images']} training images): {c['schedule']['steps']} steps x "
            f"{c['schedule']['batches']} batches of {c['batch']}; LC mu0 {c['schedule']['mu0']}, "
            f"growth {c['schedule']['growth']}, SGD lr {c['schedule']['lr']} x "
            f"{c['schedule']['lr_decay']}^k; DC+FT {args.baseline} with "
            + (f"Adam lr {c['baseline']['lr']}" if args.baseline == "modules" else "LC's SGD")
            + f" x {c['schedule']['lr_decay']}^k; BatchNorm recalibration {c['recalibrate']} "
            f"batches; test error on {c['eval']} images; matched storage {c['bpw']} bits/weight."
            for key, c in configs.items()
        ),
        "",
        *goal_lines(table, configs),
    ]
    if png:
        notes += ["", f"Plot: results/{png}."]
    papers = [{"source": s, "setting": k, "test error": e} for s, k, e in PAPERS]
    write_results(
        name,
        {"Reference models": dense_rows, "LC vs direct compression + fine-tuning": table,
         "Published LC results (MNIST and ImageNet/CIFAR; for scale)": papers},
        command=command,
        seeds={"model": SEED, "data_split": SEED, "lc": SEED},
        notes="\n".join(notes),
        extra={"configs": configs, "minutes": round(minutes, 2), "commands": commands},
    )


if __name__ == "__main__":
    main()
