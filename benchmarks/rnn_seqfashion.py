"""Benchmark `rnn_seqfashion`: a bidirectional GRU reads the top 14 rows of a Fashion-MNIST image
(one 28-pixel row per step) and predicts the bottom 14 rows (392 pixels, MSE) - the analogue of the
SequentialMNIST task of Maison et al. 2023 (arXiv 2310.12688): bidirectional GRU, 2 layers, hidden
100, Adam lr 1e-3 x 0.96 per epoch, batch 256. Compressed with every rank-selection strategy after
normal training and after training with the adaptations (nuclear-norm ramp, hard low-rank steps).

Data: Debian's dataset-fashion-mnist (`make bench-deps`), tensorslim.zoo.fashion.load_fashion_mnist:
TRAIN_SIZE training images, VAL_SIZE validation images (Rank-Tuning's metric) and TEST_SIZE test
images (every number in the tables); subsets keep the run near 15 minutes on 2 shared CPU cores.

Every configuration (each training, each strategy setting, each Rank-Tuning variant, the latency
table) is one trial of tensorslim.study.sweep in <zoo cache>/benchmark_trials/rnn_seqfashion[_quick]
.trials.jsonl: a killed run resumes when rerun with the same arguments; `--fresh` starts over.
`--workers N` runs N trials at once in spawned processes, `--ray` on Ray (default 1, serially: the
latency table and the training times are timings). --quick writes results/rnn_seqfashion_quick.*.

Run: .venv/bin/python benchmarks/rnn_seqfashion.py [--quick] [--workers N] [--ray] [--fresh]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
from torch import nn

from _common import add_sweep_args, forget_trials, sweep_note, trials_path, write_results
from _rnn import GOAL_RATIO, Bench, Task, adaptations_json, adaptations_of, run_benchmark
from _rnn import trial as rnn_trial
from tensorslim.train.lowrank import Adaptations, fit_lowrank
from tensorslim.zoo.fashion import load_fashion_mnist

SEED = 0
HIDDEN, LAYERS, EPOCHS = 100, 2, 12
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 10000, 2000, 5000
# Adaptations: nuclear lam 1e-5 (the task loss is an MSE of a few 1e-2, the paper's 1e-3/1e-4 would
# swamp it) with ramp a, b = 2, 8; hard rank-20 truncation every 6 epochs (the last after the final
# epoch). Fewer epochs and images than the paper: the whole run must stay near 15 minutes.
ADAPT = Adaptations(nuclear=(1e-5, 2, 8), hard=(6, 20))
ADAPT_QUICK = Adaptations(nuclear=(1e-5, 1, 2), hard=(2, 8))
TARGETS = [0.0, 0.005, 0.01, 0.014, 0.03]


class HalfImageGRU(nn.Module):
    """(batch, 14, 28) top rows -> (batch, 392) bottom rows in [0, 1], from the last layer's final
    states of both directions."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(28, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 14 * 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        return torch.sigmoid(self.head(torch.cat([h[-2], h[-1]], -1)))


def halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    img = images[:, 0]  # (N, 28, 28)
    return img[:, :14].contiguous(), img[:, 14:].reshape(len(img), -1).contiguous()


@functools.lru_cache(maxsize=2)
def bench(setup_json: str) -> Bench:
    """Data, metric, model and training of a setup (once per process)."""
    setup = json.loads(setup_json)
    data = load_fashion_mnist(seed=setup["seed"])
    x_train, y_train = halves(data.x_train[: setup["n_train"]])
    splits = {
        "val": halves(data.x_val[: setup["n_val"]]),
        "test": halves(data.x_test[: setup["n_test"]]),
    }

    @torch.no_grad()
    def mse(model: nn.Module, split: str) -> float:
        x, y = splits[split]
        model.eval()
        return float(nn.functional.mse_loss(model(x), y))

    def train(model, ad):
        return fit_lowrank(
            model,
            x_train,
            y_train,
            adaptations=ad,
            epochs=setup["epochs"],
            batch_size=256,
            seed=setup["seed"],
            loss_fn=nn.functional.mse_loss,
        )

    return Bench(
        make_model=lambda: HalfImageGRU(setup["hidden"], setup["layers"]),
        train=train,
        adaptations=adaptations_of(setup),
        task=Task("rnn", mse, False, "MSE"),
    )


def trial(p: dict) -> dict:
    """One trial of the sweep (module level, so worker processes find it)."""
    return rnn_trial(p, bench(json.dumps(p["setup"], sort_keys=True)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not for results)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    add_sweep_args(ap)
    args = ap.parse_args()
    # One thread: on 2 cores shared with other jobs, more threads made training 20x slower.
    torch.set_num_threads(args.threads)
    if args.quick:
        hidden, layers, epochs, n_train, n_val, n_test = 32, 2, 3, 2000, 500, 500
        adapt = ADAPT_QUICK
    else:
        hidden, layers, epochs, n_train, n_val, n_test = (
            HIDDEN,
            LAYERS,
            EPOCHS,
            TRAIN_SIZE,
            VAL_SIZE,
            TEST_SIZE,
        )
        adapt = ADAPT
    name = "rnn_seqfashion" + ("_quick" if args.quick else "")
    if args.fresh:
        print(f"{forget_trials(trials_path(name))} earlier trials forgotten", flush=True)
    setup = {
        "name": name, "seed": SEED, "hidden": hidden, "layers": layers, "epochs": epochs,
        "n_train": n_train, "n_val": n_val, "n_test": n_test, "adapt": adaptations_json(adapt),
        "threads": args.threads,
    }  # fmt: skip
    tables, f, extra = run_benchmark(
        trial_fn=trial,
        bench=lambda: bench(json.dumps(setup, sort_keys=True)),
        setup=setup,
        args=args,
        uniform_ranks=[1, 2, 4, 8, 16, 32, 64],
        thresholds=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        keeps=[0.5, 0.25, 0.15, 0.1, 0.07, 0.05],
        targets=TARGETS,
        latency_batches=[1, 256],
        seq_len=14,
    )
    notes = f"""
Bidirectional GRU ({layers} layers, hidden {hidden}; {f["weights"]} weight-matrix parameters) reading
the top 14 rows of Fashion-MNIST images and predicting the bottom 14 (MSE on pixels in [0, 1]).
{n_train} training / {n_val} validation / {n_test} test images. Training {epochs} epochs, Adam lr
1e-3 x 0.96 per epoch, batch 256, {args.threads} thread(s) (normal: {f["train_s"]["normal"]:.0f}s;
adapted: {f["train_s"]["adapted"]:.0f}s). Adaptations: nuclear norm lam={adapt.nuclear[0]:g} with
ramp a,b={adapt.nuclear[1]:g},{adapt.nuclear[2]:g}; hard rank-{adapt.hard[1]} truncation every
{adapt.hard[0]} epochs (the last one after the final epoch). Dense test MSE: normal
{f["dense"]["normal"]:.5f}, adapted {f["dense"]["adapted"]:.5f}. Relative loss = (MSE - MSE_ref) /
MSE_ref against the normally trained dense model, on the test images. Rank-Tuning tunes on the
validation images (targets {", ".join(f"{100 * t:g}%" for t in TARGETS)} relative MSE increase);
"Rank-Tuning + joint check" (rank_tuning(joint=True)) then scales every
chosen rank up until the combined model meets the target on validation; the evaluation count is the metric calls of its bisection, next to the count a scan of every rank
would need. Ratios are of the GRU's weight matrices (biases kept, not counted); the Linear head is
not compressed.

"vs own dense %" is the loss against each training's own dense model instead (the compression's
damage alone, without what the adaptations cost in training).

{sweep_note(f["trials_file"], f["trials"]["ran"], f["trials"]["reused"], args)}

Goal (paper): >= {GOAL_RATIO:g}x at <= 1.4 % relative loss. Reached here: {f["reached"]:.2f}x
({f["picked"]}). Storage vs compute of that model: {f["savings"]}. The fused implementation saves
storage only (it rebuilds the dense matrices once per call, then runs PyTorch's fused kernel); the
lowrank implementation also saves multiply-adds, and the latency table shows what each buys on this
CPU.
"""
    write_results(
        name,
        tables,
        command=" ".join(["python benchmarks/rnn_seqfashion.py", *sys.argv[1:]]),
        seeds={"torch": SEED, "split": SEED},
        notes=notes,
        extra=extra,
    )


if __name__ == "__main__":
    sys.exit(main())
