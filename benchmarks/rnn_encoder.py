"""Benchmark `rnn_encoder`: a pretrained recurrent encoder compressed to keep 0.5 of its weights, with
and without data. Goal: mean cosine >= 0.95 between the original and the compressed embeddings.

Model: a 3-layer LSTM (nn.LSTM(28, 256, num_layers=3, batch_first=True), 1,339,392 weight-matrix
parameters) reads a Fashion-MNIST image row by row (28 steps of 28 pixels); the embedding is the
mean over time of the last layer's outputs (256 numbers); a Linear(256, 10) head on it is trained
with cross-entropy (tensorslim.train.fit, Adam). No pretrained LSTM installs offline, so the
benchmark trains its own once (seeded) and caches the weights (safetensors, written atomically)
under tensorslim.zoo.cache_dir(); a rerun loads them.

Only the LSTM is compressed (include=["encoder.rnn"]; keep is of its parameters, the biases
included, which stay dense), the head is never changed. Rows at keep 0.5: svd (uniform and global
allocation), whitened (SVD-LLM truncation-aware whitening, Wang et al. 2024), whitened + sequential
calibration, fwsvd (Fisher-weighted SVD, Hsu et al. 2022), and each data-aware row followed by
tensorslim.recover (distillation of the original encoder's embeddings into the compressed encoder,
no labels; recover first balances each low-rank matrix's factors, the LSTM's too). Rows at keep 0.7,
0.3 and 0.1: svd, whitened, whitened + sequential, fwsvd (and recover at 0.1).

Data (tensorslim.zoo.fashion.load_fashion_mnist(seed=0), its seeded 55k training split and the
official test set): training = the first 20,000 training images; calibration = the next 512
training images (batches of 64; unlabeled for whitened, labeled for fwsvd's Fisher); recover = the
next 4096 training images (unlabeled); evaluation = the first 2000 test images (mean cosine of the
embeddings and accuracy of model + unchanged head). --quick: a tiny LSTM on a thousand images, for
the smoke test (writes results/rnn_encoder_quick.*).

Run: .venv/bin/python benchmarks/rnn_encoder.py [--quick] [--threads N]
(needs Debian's dataset-fashion-mnist, `make bench-deps`)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tensorslim
from _common import write_results  # noqa: E402  (puts src/ on the path)
from tensorslim.io import atomic_write_file
from tensorslim.train import fit
from tensorslim.zoo import cache_dir
from tensorslim.zoo.fashion import load_fashion_mnist

NAME = "rnn_encoder"
SEED = 0
GOAL_KEEP, GOAL_COSINE = 0.5, 0.95
OTHER_KEEPS = (0.7, 0.3, 0.1)  # cheap rows around the goal's keep (0.1: where the methods differ)
INCLUDE = ["encoder.rnn"]
TABLE = "Embedding fidelity and accuracy per method and keep"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Setup:
    """Everything that decides the trained weights (the cache key) and the measurement sizes."""

    hidden: int = 256
    layers: int = 3
    n_train: int = 20_000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = SEED
    n_calib: int = 512
    calib_batch: int = 64
    n_eval: int = 2000
    recover_images: int = 4096
    recover_batch: int = 64
    recover_steps: int = 200
    recover_lr: float = 1e-4


QUICK = Setup(
    hidden=32, layers=2, n_train=1024, epochs=2, lr=3e-3, n_calib=128, n_eval=128,
    recover_images=128, recover_steps=4,
)  # fmt: skip


class RowLSTMEncoder(nn.Module):
    """Images (N, 1, 28, 28) or (N, 28, 28) -> embeddings (N, hidden): the LSTM reads one 28-pixel
    row per step; the embedding is the mean over the 28 steps of the last layer's outputs."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(28, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], 28, 28))
        return out.mean(1)


class RowLSTMClassifier(nn.Module):
    """RowLSTMEncoder + Linear(hidden, 10) -> logits (N, 10). forward(x, labels=None): labels are
    accepted and ignored, so labeled calibration batches (x, y) can be passed as positional
    inputs; fwsvd's loss reads them."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.encoder = RowLSTMEncoder(hidden, layers)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x))


def lstm_weights(model: nn.Module) -> int:
    """Weight-matrix parameters of the (possibly compressed) LSTM: dense matrices and low-rank
    factors (weight_*_u, weight_*_v) counted, biases not."""
    rnn = model.encoder.rnn
    return sum(p.numel() for n, p in rnn.named_parameters() if n.startswith("weight_"))


def cache_path(s: Setup) -> Path:
    key = (
        f"rnn-encoder-lstm{s.layers}x{s.hidden}-n{s.n_train}-e{s.epochs}-b{s.batch_size}"
        f"-lr{s.lr:g}-seed{s.seed}-v{CACHE_FORMAT}"
    )
    return cache_dir() / f"{key}.safetensors"


def pretrained(s: Setup, x: torch.Tensor, y: torch.Tensor) -> tuple[RowLSTMClassifier, dict]:
    """The trained classifier for setup `s` (from the cache, else trained now, seeded, and cached
    atomically) and its training record {"train_s", "losses", "cached"}."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = cache_path(s)
    model = RowLSTMClassifier(s.hidden, s.layers)
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["record"])
            return model.eval(), {**meta, "cached": True}
        except Exception:  # a corrupt or stale cache entry is simply retrained
            pass
    torch.manual_seed(s.seed)
    model = RowLSTMClassifier(s.hidden, s.layers)
    t0 = time.perf_counter()
    losses = fit(
        model, x, y, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, seed=s.seed,
        progress=sys.stderr.isatty(), description="Training the LSTM encoder",
    )  # fmt: skip
    record = {
        "train_s": round(time.perf_counter() - t0, 1),
        "losses": [round(v, 4) for v in losses],
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_file(
        path, lambda tmp: save_file(state, str(tmp), metadata={"record": json.dumps(record)})
    )
    return model.eval(), {**record, "cached": False}


@torch.no_grad()
def embed_and_predict(model: RowLSTMClassifier, x: torch.Tensor, batch: int = 500):
    """(embeddings (N, hidden), predicted classes (N,)) in eval mode."""
    model.eval()
    embs, preds = [], []
    for i in range(0, len(x), batch):
        e = model.encoder(x[i : i + batch])
        embs.append(e)
        preds.append(model.head(e).argmax(-1))
    return torch.cat(embs), torch.cat(preds)


def row_label(method: str, variant: str) -> str:
    return method + "".join(f" + {v}" for v in variant.split("+") if v)


def ranks_of(plan: Any) -> str:
    """Per gate matrix of the LSTM, its rank ("d" = dense), in the LSTM's matrix order."""
    out = []
    for layer in plan.layers:
        for comp in layer.spec:
            rank = comp.get("rank")
            if isinstance(rank, dict):
                out += ["d" if r is None else str(r) for r in rank.values()]
            elif isinstance(rank, list):
                out += ["d" if r is None else str(r) for r in rank]
            elif rank is not None:
                out.append(str(rank))
    return " ".join(out) if out else "dense"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny LSTM, few images (smoke test)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default (the machine's 2 cores are shared with other jobs)",
    )
    ap.add_argument("--recover-steps", type=int, default=None, help="Adam steps of recover")
    ap.add_argument("--recover-lr", type=float, default=None, help="Adam learning rate of recover")
    ap.add_argument("--no-recover", action="store_true", help="skip the recover rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Setup()
    if args.recover_steps is not None or args.recover_lr is not None:
        s = Setup(**{
            **asdict(s),
            "recover_steps": args.recover_steps or s.recover_steps,
            "recover_lr": args.recover_lr or s.recover_lr,
        })  # fmt: skip
    name = NAME + ("_quick" if args.quick else "")
    t_start = time.time()

    data = load_fashion_mnist(seed=s.seed)
    x_train, y_train = data.x_train[: s.n_train], data.y_train[: s.n_train]
    c0, c1 = s.n_train, s.n_train + s.n_calib
    r1 = c1 + s.recover_images
    if r1 > len(data.x_train):
        raise SystemExit(f"need {r1} training images, the split has {len(data.x_train)}")
    x_cal, y_cal = data.x_train[c0:c1], data.y_train[c0:c1]
    calib = [x_cal[i : i + s.calib_batch] for i in range(0, len(x_cal), s.calib_batch)]
    calib_labeled = [
        (x_cal[i : i + s.calib_batch], y_cal[i : i + s.calib_batch])
        for i in range(0, len(x_cal), s.calib_batch)
    ]
    x_rec = data.x_train[c1:r1]
    rec_batches = [x_rec[i : i + s.recover_batch] for i in range(0, len(x_rec), s.recover_batch)]
    x_eval, y_eval = data.x_test[: s.n_eval], data.y_test[: s.n_eval]

    model, record = pretrained(s, x_train, y_train)
    e0, p0 = embed_and_predict(model, x_eval)
    acc0 = float((p0 == y_eval).float().mean())
    n_weights = lstm_weights(model)
    total_params = sum(p.numel() for p in model.parameters())
    print(
        f"LSTM encoder: {n_weights} weight-matrix parameters; "
        + ("loaded from cache" if record["cached"] else f"trained in {record['train_s']:.0f}s")
        + f"; test accuracy {acc0:.4f} on {s.n_eval} test images",
        file=sys.stderr, flush=True,
    )  # fmt: skip

    def fisher_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        """Cross-entropy of the (fixed) head on a labeled calibration batch (x, y)."""
        xb, yb = batch
        return nn.functional.cross_entropy(m(xb), yb)

    rows: list[dict[str, Any]] = [
        {
            "method": "original", "keep": 1.0, "allocator": "-", "achieved keep": 1.0,
            "LSTM weights": n_weights, "model params": total_params, "ranks": "dense",
            "mean cosine": 1.0, "min cosine": 1.0, "accuracy": round(acc0, 4),
            "compress s": 0.0, "recover s": None,
        }
    ]  # fmt: skip

    def measure(method: str, keep: float, allocator: str, variant: str = "") -> None:
        kw: dict[str, Any] = {}
        if method == "whitened":
            kw["calibration"] = calib
        elif method == "fwsvd":
            kw["calibration"] = calib_labeled
            kw["loss"] = fisher_loss
        # explicit: compress's default is on for whitened with a list of batches
        kw["sequential"] = "sequential" in variant
        torch.manual_seed(s.seed)
        t0 = time.perf_counter()
        small, plan = tensorslim.compress(
            model, keep, method=method, allocator=allocator, include=INCLUDE, **kw
        )
        secs = time.perf_counter() - t0
        recover_s = None
        if "recover" in variant:
            t0 = time.perf_counter()
            tensorslim.recover(
                small.encoder, model.encoder, rec_batches, steps=s.recover_steps,
                lr=s.recover_lr, seed=s.seed,
            )  # fmt: skip
            recover_s = time.perf_counter() - t0
        e, p = embed_and_predict(small, x_eval)
        cos = nn.functional.cosine_similarity(e, e0, dim=1)
        after = lstm_weights(small)
        row = {
            "method": row_label(method, variant),
            "keep": keep,
            "allocator": allocator,
            "achieved keep": round(plan.achieved_keep, 4),
            "LSTM weights": after,
            "model params": sum(q.numel() for q in small.parameters()),
            "ranks": ranks_of(plan),
            "mean cosine": round(float(cos.mean()), 4),
            "min cosine": round(float(cos.min()), 4),
            "accuracy": round(float((p == y_eval).float().mean()), 4),
            "compress s": round(secs, 1),
            "recover s": None if recover_s is None else round(recover_s, 1),
        }
        print(row, f"[{time.time() - t_start:.0f}s]", file=sys.stderr, flush=True)
        rows.append(row)

    configs: list[tuple[str, float, str, str]] = [
        ("svd", GOAL_KEEP, "uniform", ""),
        ("svd", GOAL_KEEP, "global", ""),
        ("whitened", GOAL_KEEP, "uniform", ""),
        ("whitened", GOAL_KEEP, "global", ""),
        ("whitened", GOAL_KEEP, "global", "sequential"),
        ("fwsvd", GOAL_KEEP, "uniform", ""),
        ("fwsvd", GOAL_KEEP, "global", ""),
    ]
    if not args.no_recover:
        for method, variant in (("whitened", ""), ("whitened", "sequential+"), ("fwsvd", "")):
            configs += [(method, GOAL_KEEP, "global", variant + "recover")]
    if not args.quick:
        for k in OTHER_KEEPS:
            configs += [
                ("svd", k, "uniform", ""),
                ("svd", k, "global", ""),
                ("whitened", k, "global", ""),
                ("whitened", k, "global", "sequential"),
                ("fwsvd", k, "global", ""),
            ]
            if k == min(OTHER_KEEPS) and not args.no_recover:
                configs += [("whitened", k, "global", "recover")]
    for c in configs:
        measure(*c)
        flush(name, args, argv, s, record, rows, acc0, n_weights, len(configs) + 1)
    return rows


GOAL_COL = f"cosine >= {GOAL_COSINE}"


def _name(r: dict[str, Any]) -> str:
    return f"{r['method']} / {r['allocator']}"


def goal_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per keep: the best row by mean cosine, whether it meets the goal's cosine, how many rows
    do, and the best row without data (svd) for comparison."""
    out = []
    for keep in sorted({r["keep"] for r in rows if r["method"] != "original"}, reverse=True):
        at = [r for r in rows if r["keep"] == keep and r["method"] != "original"]
        best = max(at, key=lambda r: r["mean cosine"])
        plain = [r for r in at if r["method"] == "svd"]
        best_svd = max(plain, key=lambda r: r["mean cosine"]) if plain else None
        met = [r for r in at if r["mean cosine"] >= GOAL_COSINE]
        out.append(
            {
                "keep": keep,
                "best (by mean cosine)": _name(best),
                "mean cosine": best["mean cosine"],
                "accuracy": best["accuracy"],
                GOAL_COL: "yes" if met else "no",
                "rows meeting it": f"{len(met)} of {len(at)}",
                "best svd (no data)": "-" if best_svd is None else _name(best_svd),
                "its mean cosine": None if best_svd is None else best_svd["mean cosine"],
            }
        )
    return out


def _variants(by: dict[tuple, dict[str, Any]], suffix: str):
    """(keep, base row, row) for every row whose method is a measured base method + `suffix`."""
    for (m, k, a), r in by.items():
        if m.endswith(suffix):
            base = by.get((m.removesuffix(suffix), k, a))
            if base is not None:
                yield k, base, r


def observations(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences computed from the rows: sequential vs not, before and after recover, uniform vs
    global allocation of svd."""
    by = {(r["method"], r["keep"], r["allocator"]): r for r in rows}
    out = []
    for k, base, r in sorted(_variants(by, " + sequential"), key=lambda item: -item[0]):
        out.append(
            f"{r['method']} vs {base['method']} at keep {k}: mean cosine {base['mean cosine']} "
            f"-> {r['mean cosine']}, min cosine {base['min cosine']} -> {r['min cosine']}, "
            f"accuracy {base['accuracy']} -> {r['accuracy']} (the 3-layer nn.LSTM is built "
            "layer by layer, each inner layer from the compressed lower layers' outputs)."
        )
    for k, start, r in _variants(by, " + recover"):
        out.append(
            f"{start['method']} at keep {k}: mean cosine {start['mean cosine']} after compress "
            f"(min {start['min cosine']}), {r['mean cosine']} after recover "
            f"(min {r['min cosine']})."
        )
    for k in sorted({r["keep"] for r in rows}, reverse=True):
        u, g = by.get(("svd", k, "uniform")), by.get(("svd", k, "global"))
        if u is not None and g is not None:
            out.append(
                f"svd at keep {k}: uniform {u['mean cosine']} (ranks {u['ranks']}), global "
                f"{g['mean cosine']} (ranks {g['ranks']})."
            )
    return out


def flush(name, args, argv, s: Setup, record, rows, acc0, n_weights, n_rows) -> None:
    """Write results/<name>.md and .json with the rows measured so far."""
    goal = goal_rows(rows)
    n_bias = 2 * s.layers * 4 * s.hidden
    at_goal = next((g for g in goal if g["keep"] == GOAL_KEEP), None)
    if at_goal is None:
        verdict = "not measured yet"
    else:
        svd_cos = at_goal["its mean cosine"]
        verdict = (
            f"{'MET' if at_goal[GOAL_COL] == 'yes' else 'NOT met'}: best at keep {GOAL_KEEP} is "
            f"{at_goal['best (by mean cosine)']} with mean cosine {at_goal['mean cosine']:.4f}; "
            f"{at_goal['rows meeting it']} rows meet it"
        )
        if svd_cos is not None:
            verdict += (
                f"; the best row without data, {at_goal['best svd (no data)']}, has {svd_cos}"
                + (" (the goal is met without data too)" if svd_cos >= GOAL_COSINE else "")
            )
    train = (
        f"trained in {record['train_s']:.0f} s"
        + (" (an earlier run; loaded from the cache in this one)" if record["cached"] else "")
        + f", mean training loss per epoch {record['losses']}"
    )
    notes = f"""
Goal: a pretrained recurrent encoder at keep {GOAL_KEEP} keeps mean cosine >= {GOAL_COSINE} with
data-aware compression. **{verdict}.**

Model: nn.LSTM(28, {s.hidden}, num_layers={s.layers}, batch_first=True) ({n_weights:,} weight-matrix
parameters) reading Fashion-MNIST images row by row (28 steps x 28 pixels); embedding = mean over
the 28 steps of the last layer's outputs ({s.hidden} numbers); a Linear({s.hidden}, 10) head trained
with it by cross-entropy (tensorslim.train.fit, Adam lr {s.lr:g}, batch {s.batch_size},
{s.epochs} epochs on the first {s.n_train:,} images of load_fashion_mnist(seed={s.seed})'s training
split, seeded; {train}; cached under tensorslim.zoo.cache_dir() as {cache_path(s).name}). Original
accuracy {acc0:.4f} on the {s.n_eval} evaluation images.

Compressed: only the LSTM (include={INCLUDE}); keep and "achieved keep" are tensorslim's: of the
LSTM's parameters, its {n_bias:,} biases included (they stay dense); "LSTM weights" counts the gate
matrices' parameters (low-rank factors for a compressed matrix) after compression; "ranks" lists each gate matrix's rank in the LSTM's order (weight_ih_l0,
weight_hh_l0, weight_ih_l1, ...; d = dense). The head is never changed. Evaluation: the first
{s.n_eval} official test images; "mean cosine" / "min cosine" between the compressed and the
original embeddings of each image, "accuracy" of the compressed encoder with the original head.
Calibration (whitened, fwsvd): {s.n_calib} training images after the training subset, in batches of
{s.calib_batch}; whitened reads them unlabeled; fwsvd's Fisher needs loss=, here the
cross-entropy of the model's (fixed) head on the calibration batches with their labels. Each
method's default allocator objective (svd: weight error; whitened: output error on the calibration
inputs; fwsvd: Fisher-estimated loss increase). "+ sequential": compress(..., sequential=True).
"+ recover": tensorslim.recover(compressed.encoder, original.encoder, ...) - distillation of the
original encoder's embeddings (relative squared error, no labels) - for {s.recover_steps} Adam
steps (lr {s.recover_lr:g}) on batches of {s.recover_batch} of {s.recover_images} further unlabeled
training images (disjoint from training, calibration and evaluation images); recover first
balances every factorized gate matrix's U, V to equal norms per rank index (without it a whitened
LSTM's U, norms ~1e3, and V, norms ~1, reached Adam unbalanced and recover lowered the cosine).
compress s: wall time
of tensorslim.compress including calibration; recover s: wall time of recover. {args.threads} torch
thread(s), run under `nice` while other jobs shared the machine's 2 cores: times are inflated and
noisy. Rows so far: {len(rows)} of {n_rows}.

Observations (computed from the rows):
""" + "".join(f"\n- {o}" for o in observations(rows))
    write_results(
        name,
        {TABLE: rows, f"Goal: mean cosine >= {GOAL_COSINE} (best row per keep)": goal},
        command=" ".join(
            [".venv/bin/python", "benchmarks/rnn_encoder.py", *(argv or sys.argv[1:])]
        ),
        seeds={"torch": s.seed, "split": s.seed, "training": s.seed, "recover": s.seed},
        notes=notes,
        extra={"setup": asdict(s), "training": record},
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
