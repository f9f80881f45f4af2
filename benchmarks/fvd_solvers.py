"""Which element-wise FVD solver (EM, weighted ALS, Adam) reaches the weighted optimum fastest on
real layers: Linear layers of all-MiniLM-L6-v2 with their Fisher diagonal measured on real sentences.

For each layer the rank is the one keeping half of its parameters. Every solver starts from the FWSVD
closed form and runs for a fixed wall-time budget; the table gives the objective reached (relative
Fisher-weighted error, sum I (W - AB)^2 / sum I W^2), and the time each solver needed to come within 1%
of the best objective any solver found on that layer, and to close 99% of the gap between the FWSVD
start and that best. The default solver of `fvd` (decompose/weighted.py DEFAULT_SOLVER) is the one
with the smallest total time to 1% over these layers.

Run: .venv/bin/python benchmarks/fvd_solvers.py   (needs the `transformers` extra and `fortunes`)
"""

from __future__ import annotations

import sys
import time

import torch

from _common import write_results  # noqa: E402  (puts src/ on the path)
from tensorslim.calibrate import calibrate
from tensorslim.decompose import SOLVERS, fvd, rank_for_keep
from tensorslim.zoo.minilm import load_minilm, sentence_embedding, tokenize
from tensorslim.zoo.text import load_fortune_sentences

SEED = 0
LAYERS = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.2.attention.output.dense",
    "encoder.layer.1.intermediate.dense",
    "encoder.layer.4.output.dense",
]
N_CALIB = 64
BUDGET_S = {"em": 25.0, "als": 25.0, "adam": 25.0}
ITERS = {"em": 400, "als": 100, "adam": 3000}
LR = 3e-3


def gaussian_fisher_loss(seed: int):
    """loss(model, batch) = sum_i r_i . f(x_i) with fresh r_i ~ N(0, I) per sentence: its squared
    gradient is an unbiased Monte-Carlo estimate of the Fisher diagonal of a Gaussian observation
    model on the normalised sentence embeddings f (sum_i sum_k (d f_ik / d W)^2), i.e. of how much
    each weight moves the embeddings."""
    gen = torch.Generator().manual_seed(seed)

    def loss(model, batch):
        emb = sentence_embedding(model, batch)
        r = torch.randn(emb.shape, generator=gen)
        return (emb * r).sum()

    return loss


def main() -> None:
    torch.manual_seed(SEED)
    model, tok = load_minilm()
    sents = load_fortune_sentences(seed=SEED)[-N_CALIB:]
    batches = list(tokenize(tok, sents, batch_size=16, max_length=64))
    layers = {n: model.get_submodule(n) for n in LAYERS}
    stats = calibrate(model, layers, batches, loss=gaussian_fisher_loss(SEED), gram=False)
    rows, totals = [], {s: 0.0 for s in SOLVERS}
    for name in LAYERS:
        w = layers[name].weight.detach()
        m, n = w.shape
        rank = rank_for_keep(m, n, 0.5)
        fisher = stats[name].fisher
        results = {}
        for solver in SOLVERS:
            t0 = time.perf_counter()
            results[solver] = fvd(
                w,
                fisher,
                rank,
                solver=solver,
                iters=ITERS[solver],
                tol=0.0,
                lr=LR,
                time_limit=BUDGET_S[solver],
            )
            print(f"{name} {solver}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        start = results["em"].history[0]
        best = min(r.objective for r in results.values())
        for solver, r in results.items():
            t1 = r.time_to(best * 1.01)
            t99 = r.time_to(start - 0.99 * (start - best))
            totals[solver] += t1 if t1 is not None else float("inf")
            rows.append(
                {
                    "layer": name.replace("encoder.layer.", "L"),
                    "shape": f"{m}x{n}",
                    "rank": rank,
                    "solver": solver,
                    "FWSVD start": f"{start:.5f}",
                    "final": f"{r.objective:.5f}",
                    "best (any)": f"{best:.5f}",
                    "iterations": r.iterations,
                    "s/iter": f"{r.seconds[-1] / max(1, r.iterations):.3f}",
                    "s to 1% of best": "never" if t1 is None else f"{t1:.2f}",
                    "s to 99% of gap": "never" if t99 is None else f"{t99:.2f}",
                }
            )
    fastest = min(totals, key=totals.get)
    summary = [
        {"solver": s, "total s to 1% of best": "never" if v == float("inf") else f"{v:.2f}"}
        for s, v in totals.items()
    ]
    notes = (
        f"Fisher: Monte-Carlo Gaussian-embedding Fisher on {N_CALIB} fortune sentences (see "
        f"gaussian_fisher_loss). Budget per solver and layer: {BUDGET_S}; max iterations {ITERS}; "
        f"Adam lr {LR} (relative to the factors' RMS). Fastest to 1% of the best objective in "
        f"total: **{fastest}**."
    )
    write_results(
        "fvd_solvers",
        {"Solvers per layer": rows, "Total time to 1% of the best objective": summary},
        command=".venv/bin/python benchmarks/fvd_solvers.py",
        seeds={"torch": SEED, "fisher_probe": SEED},
        notes=notes,
        extra={"fastest": fastest},
    )
    print(f"fastest: {fastest}")


if __name__ == "__main__":
    main()
