"""Benchmark `rnn_vowels`: a bidirectional GRU classifier on JapaneseVowels (speaker of an /ae/
utterance, 9 classes), compressed with every rank-selection strategy, after normal training and
after training with the adaptations of Maison et al. 2023 (arXiv 2310.12688, the paper's classifier
setting: bidirectional GRU, 3 layers, hidden 150; Adam lr 1e-3 x 0.96 per epoch).

Data: aeon's JapaneseVowels (270 train; the 370 official test series split in half, seeded, into
validation - used by Rank-Tuning - and test - every number in the tables). Sequences are packed
(lengths 7..29), so the compressed GRU runs the fused path inside the model; the latency table
times the recurrent layer alone on unpacked input to compare the implementations.

Strategies (each on the GRU's 12 weight matrices): uniform rank; input-to-hidden only; per-matrix
error threshold; the global allocator (tensorslim.compress, include=["rnn"]); Rank-Tuning
(tensorslim.rank_tuning, targets = tolerated relative accuracy losses on the validation half), and
Rank-Tuning with its joint check (joint=True).

Every configuration (each training, each strategy setting, each Rank-Tuning variant, the latency
table) is one trial of tensorslim.study.sweep in <zoo cache>/benchmark_trials/rnn_vowels[_quick]
.trials.jsonl: a killed run resumes when rerun with the same arguments; `--fresh` starts over.
`--workers N` runs N trials at once in spawned processes, `--ray` on Ray (default 1, serially: the
latency table and the training times are timings). --quick writes results/rnn_vowels_quick.*.

Run: .venv/bin/python benchmarks/rnn_vowels.py [--quick] [--workers N] [--ray] [--fresh]
(needs the `bench` extra: aeon)
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
from tensorslim.zoo.vowels import N_CLASSES, N_FEATURES, load_japanese_vowels

SEED = 0
# The paper's classifier: bidirectional GRU, 3 layers, hidden 150.
HIDDEN, LAYERS, EPOCHS = 150, 3, 60
# Adaptations (paper's ranges): nuclear lam 1e-3 with ramp a, b = 5, 25; hard rank-20 truncation
# every 20 epochs (the last one after the final epoch).
ADAPT = Adaptations(nuclear=(1e-3, 5, 25), hard=(20, 20))
ADAPT_QUICK = Adaptations(nuclear=(1e-3, 1, 2), hard=(2, 8))
TARGETS = [0.0, 0.005, 0.01, 0.014, 0.03]


class VowelGRU(nn.Module):
    """Input (batch, time, 13): 12 coefficients + validity flag; packs the sequences by length and
    classifies from the last layer's final states of both directions."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(
            N_FEATURES, hidden, num_layers=layers, bidirectional=True, batch_first=True
        )
        self.head = nn.Linear(2 * hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = x[:, :, N_FEATURES].sum(1).long().clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x[:, :, :N_FEATURES], lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], -1))


@functools.lru_cache(maxsize=2)
def bench(setup_json: str) -> Bench:
    """Data, metric, model and training of a setup (once per process)."""
    setup = json.loads(setup_json)
    data = load_japanese_vowels(seed=setup["seed"])
    splits = {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}

    @torch.no_grad()
    def accuracy(model: nn.Module, split: str) -> float:
        x, y = splits[split]
        model.eval()
        return float((model(x).argmax(-1) == y).float().mean())

    def train(model, ad):
        return fit_lowrank(
            model,
            data.x_train,
            data.y_train,
            adaptations=ad,
            epochs=setup["epochs"],
            batch_size=32,
            seed=setup["seed"],
        )

    return Bench(
        make_model=lambda: VowelGRU(setup["hidden"], setup["layers"]),
        train=train,
        adaptations=adaptations_of(setup),
        task=Task("rnn", accuracy, True, "accuracy"),
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
    hidden, layers, epochs = (32, 2, 4) if args.quick else (HIDDEN, LAYERS, EPOCHS)
    adapt = ADAPT_QUICK if args.quick else ADAPT
    name = "rnn_vowels" + ("_quick" if args.quick else "")
    if args.fresh:
        print(f"{forget_trials(trials_path(name))} earlier trials forgotten", flush=True)
    setup = {
        "name": name, "seed": SEED, "hidden": hidden, "layers": layers, "epochs": epochs,
        "adapt": adaptations_json(adapt), "threads": args.threads,
    }  # fmt: skip
    data = load_japanese_vowels(seed=SEED)
    tables, f, extra = run_benchmark(
        trial_fn=trial,
        bench=lambda: bench(json.dumps(setup, sort_keys=True)),
        setup=setup,
        args=args,
        uniform_ranks=[1, 2, 4, 8, 16, 32, 64],
        thresholds=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        keeps=[0.5, 0.25, 0.15, 0.1, 0.07, 0.05],
        targets=TARGETS,
        latency_batches=[1, 64],
        seq_len=data.x_test.shape[1],
    )
    notes = f"""
Bidirectional GRU ({layers} layers, hidden {hidden}; {f["weights"]} weight-matrix parameters) on
JapaneseVowels: {len(data.x_train)} train / {len(data.x_val)} validation / {len(data.x_test)} test
series. Training {epochs} epochs, Adam lr 1e-3 x 0.96 per epoch, batch 32, {args.threads} thread(s)
(normal: {f["train_s"]["normal"]:.0f}s; adapted: {f["train_s"]["adapted"]:.0f}s). Adaptations:
nuclear norm lam={adapt.nuclear[0]:g} with ramp a,b={adapt.nuclear[1]:g},{adapt.nuclear[2]:g}; hard
rank-{adapt.hard[1]} truncation every {adapt.hard[0]} epochs (the last one after the final epoch).
Dense test accuracy: normal {f["dense"]["normal"]:.4f}, adapted {f["dense"]["adapted"]:.4f}.
Relative loss is against the normally trained dense model on the test half ({len(data.x_test)} series:
one misclassified series = {100 / len(data.x_test):.2f} % absolute). Rank-Tuning tunes on the
validation half (targets {", ".join(f"{100 * t:g}%" for t in TARGETS)}); "Rank-Tuning + joint check" (rank_tuning(joint=True)) then scales every
chosen rank up until the combined model meets the target on validation; the evaluation count is
the metric calls of its bisection, next to the count a scan of every rank would need. Ratios are of
the GRU's weight matrices (biases kept, not counted); the model's Linear head is not compressed.

"vs own dense %" is the loss against each training's own dense model instead (the compression's
damage alone, without what the adaptations cost in training).

{sweep_note(f["trials_file"], f["trials"]["ran"], f["trials"]["reused"], args)}

Goal (paper): >= {GOAL_RATIO:g}x at <= 1.4 % relative loss. Reached here: {f["reached"]:.2f}x
({f["picked"]}). Storage vs compute of that model: {f["savings"]}. The fused implementation saves
storage only (it rebuilds the dense matrices once per call, then runs PyTorch's fused kernel); the
lowrank implementation also saves multiply-adds (per position r(m+n) instead of mn for every
matrix), and the latency table shows what each buys on this CPU. Inside VowelGRU the sequences are
packed, which always takes the fused path.
"""
    write_results(
        name,
        tables,
        command=" ".join(["python benchmarks/rnn_vowels.py", *sys.argv[1:]]),
        seeds={"torch": SEED, "split": SEED},
        notes=notes,
        extra=extra,
    )


if __name__ == "__main__":
    sys.exit(main())
