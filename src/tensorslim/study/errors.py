"""How informative is the approximation error? The study of Schuurmans, Batselier & Kooij (ICLR
2023, "How informative is the approximation error from tensor decomposition for neural network
compression?"), run as a sweep (study.sweep).

One conv layer of a trained zoo model is compressed at a time, over (layer x method x keep x run).
Each trial (`error_trial`, a pure function of its parameters) records

- the six errors of the paper's Sec. 3 (Frobenius norms): weights absolute ||W - W_hat||,
  relative ||W - W_hat|| / ||W||, scaled ||W - W_hat|| / numel(W); features the same on the
  layer's output F per training sample (batch of one, no augmentation, only this layer replaced),
  averaged over the samples (calibrate.features.feature_errors);
- proxies the project has and the paper lacks: the Fisher-weighted error 1/2 sum I (W - W_hat)^2
  (a second-order estimate of the loss increase, I the empirical Fisher diagonal), the relative
  output error on the calibration inputs ||(W - W_hat) X^T|| / ||W X^T|| (compressors._factors.
  output_facts) and the SVD risk of the layer at the same keep (compressors._factors.risk_facts:
  how much plain SVD's Fisher-weighted error exceeds the weighted solution's);
- the test error before and after fine-tuning the whole network (SGD, momentum 0.9).

The layer is built through core.materialize.build_layer from the spec [{"kind": method, "rank":
R}], R the method's rank for the kept fraction of the layer's parameters (tltorch's rank=<float>
semantics, compressors._tensor). CP: CP-ALS from a random uniform init seeded by the run (so CP
trials vary by run); Tucker-2: HOSVD with the spatial modes at full rank; TT: TT-SVD with cores
ordered (in, kh, kw, out), as in the paper. The layer is built without calibration statistics, so
the decompositions fit the weights only.

`analyse` then gives Kendall's τ between each proxy and the test error in the paper's groupings
(study.tau) and `run_error_study` writes the rows, the τ table and scatter plots.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorSlimError

STUDY = "errors"
VERSION = 1  # part of every trial's parameters: a change of the trial's meaning gets new keys

WEIGHT_ERRORS = ("weights_relative", "weights_scaled", "weights_absolute")
FEATURE_ERRORS = ("features_relative", "features_scaled", "features_absolute")
PAPER_ERRORS = (
    "weights_relative",
    "features_relative",
    "weights_scaled",
    "features_scaled",
    "weights_absolute",
    "features_absolute",
)
EXTRA_PROXIES = ("fisher_weighted", "output_calibration", "svd_risk")
PROXIES = PAPER_ERRORS + EXTRA_PROXIES
TARGETS = {"before": "test_error_before", "after": "test_error_after"}
METHODS = ("cp", "tucker2", "tt")
# The paper's settings of each method (the run's seed is added to CP's).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "cp": {"init": "random"},
    "tucker2": {"algorithm": "hosvd"},
    "tt": {},
}
# Paper's Table 2 (GaripovNet on Fashion-MNIST, kept <= 0.5), tau before -> after fine-tuning.
PAPER_TAU = {
    "weights_relative": (0.78, 0.65),
    "features_relative": (0.62, 0.50),
    "weights_scaled": (0.54, 0.36),
    "features_scaled": (0.55, 0.52),
    "weights_absolute": (0.70, 0.65),
    "features_absolute": (0.70, 0.47),
}


# -- configuration --------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise TensorSlimError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


@dataclass(frozen=True)
class ErrorStudyConfig:
    """What to run. model: a zoo name. layers: conv layer names (default: every 2-D conv with
    groups 1 and a kernel larger than 1x1 but the first, i.e. layers 2..last conv). keeps:
    fractions of each layer's parameters kept, in (0, 1). runs: repetitions (seeds 0..runs-1).
    feature_samples: training images whose layer outputs give the feature errors;
    calibration_samples: training images for the Fisher diagonal and the input Gram of the
    extra proxies (the feature samples are their first ones). test_samples: test images for the
    test error (None: all). Fine-tuning: `finetune_epochs` over `finetune_samples` training
    images (None: all; a seeded subset per run), SGD momentum 0.9, `finetune_lr`, batch
    `finetune_batch` (the paper: 10 epochs of the full split, lr 1e-4, batch 128)."""

    model: str
    layers: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS
    keeps: tuple[float, ...] = (0.1, 0.25, 0.5)
    runs: int = 5
    finetune_epochs: int = 10
    finetune_samples: int | None = None
    finetune_lr: float = 1e-4
    finetune_batch: int = 128
    feature_samples: int = 128
    calibration_samples: int = 256
    test_samples: int | None = None
    model_seed: int = 0

    def check(self) -> ErrorStudyConfig:
        """self, or TensorSlimError naming the first bad setting and what is accepted."""
        from tensorslim import zoo

        if not isinstance(self.model, str) or self.model not in zoo.ZOO:
            raise TensorSlimError(
                f"model must be a zoo name ({', '.join(sorted(zoo.ZOO))}); got {self.model!r}"
            )
        if not self.methods or any(m not in METHOD_OPTIONS for m in self.methods):
            raise TensorSlimError(
                f"methods must be some of {', '.join(METHOD_OPTIONS)}; got {list(self.methods)!r}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise TensorSlimError(f"methods are repeated: {list(self.methods)!r}")
        ok = all(
            isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k < 1
            for k in self.keeps
        )
        if not self.keeps or not ok or len(set(self.keeps)) != len(self.keeps):
            raise TensorSlimError(
                f"keeps must be distinct fractions in (0, 1) of a layer's parameters; got "
                f"{list(self.keeps)!r}"
            )
        _positive_int("runs", self.runs)
        _positive_int("finetune_epochs", self.finetune_epochs, 0)
        _positive_int("finetune_batch", self.finetune_batch)
        _positive_int("feature_samples", self.feature_samples)
        _positive_int("calibration_samples", self.calibration_samples)
        for name in ("finetune_samples", "test_samples"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        lr = self.finetune_lr
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (0 < lr < math.inf):
            raise TensorSlimError(f"finetune_lr must be a positive number; got {lr!r}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise TensorSlimError(f"layers must be distinct layer names; got {self.layers!r}")
        return self

    def trials(self, layers: Sequence[str]) -> list[dict[str, Any]]:
        """The grid: every (layer, method, keep, run), each a JSON object of all it depends on."""
        index = {name: i for i, name in enumerate(layers, start=1)}
        common = {
            "study": STUDY,
            "version": VERSION,
            "model": self.model,
            "model_seed": self.model_seed,
            "feature_samples": self.feature_samples,
            "calibration_samples": max(self.calibration_samples, self.feature_samples),
            "test_samples": self.test_samples,
            "finetune": {
                "epochs": self.finetune_epochs,
                "samples": self.finetune_samples,
                "lr": float(self.finetune_lr),
                "batch": self.finetune_batch,
                "momentum": 0.9,
            },
        }
        out = []
        for layer in layers:
            for method in self.methods:
                for keep in self.keeps:
                    for run in range(self.runs):
                        options = dict(METHOD_OPTIONS[method])
                        if method == "cp":
                            options["seed"] = run
                        out.append(
                            {
                                **common,
                                "layer": layer,
                                "layer_index": index[layer],
                                "method": method,
                                "keep": float(keep),
                                "run": run,
                                "options": options,
                            }
                        )
        return out


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the 2-D convs with groups 1 and a kernel larger than 1x1, in module order."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and math.prod(m.kernel_size) > 1
    ]


def study_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """`layers` checked against the model's convs, or its convs but the first (the paper's
    layers 2..last conv; the classifier is not a conv)."""
    convs = conv_layers(model)
    if layers is None:
        if len(convs) < 2:
            raise TensorSlimError(
                f"the model has {len(convs)} 2-D conv(s) with a kernel larger than 1x1; the study "
                "compresses every conv but the first, so it needs at least 2 (or name --layers)"
            )
        return convs[1:]
    bad = [n for n in layers if n not in convs]
    if bad:
        raise TensorSlimError(
            f"layer {bad[0]!r} is not a 2-D conv (groups 1, kernel larger than 1x1) of the "
            f"model; its convs: {', '.join(convs) or 'none'}"
        )
    order = {n: i for i, n in enumerate(convs)}
    return sorted(layers, key=order.__getitem__)


# -- one trial ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _base(model: str, seed: int) -> tuple[nn.Module, Any]:
    """The trained zoo model (from its cache) and its data, once per process."""
    from tensorslim import zoo

    entry = zoo.get(model)
    return entry.pretrained(seed=seed).eval(), entry.data()


def _test(data: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(data.x_test) if n is None else min(n, len(data.x_test))
    return data.x_test[:n], data.y_test[:n]


@functools.lru_cache(maxsize=2)
def _dense_accuracy(model: str, seed: int, n: int | None) -> float:
    from tensorslim.train import accuracy

    net, data = _base(model, seed)
    return accuracy(net, *_test(data, n))


@functools.lru_cache(maxsize=8)
def _layer_stats(model: str, seed: int, layer: str, samples: int, features: int) -> Any:
    """Calibration statistics of `layer` on the first `samples` training images (eval mode): the
    patch Gram X^T X, the empirical Fisher diagonal of the cross-entropy (batches of 32), and the
    layer's input and output for the first `features` images."""
    from tensorslim.calibrate.collect import calibrate
    from tensorslim.core.surgery import get_submodule

    net, data = _base(model, seed)
    x, y = data.x_train[:samples], data.y_train[:samples]
    xs, ys = list(x.split(32)), list(y.split(32))
    labels = {id(xb): yb for xb, yb in zip(xs, ys)}

    def loss(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:  # labels found by batch identity
        return nn.functional.cross_entropy(m(xb), labels[id(xb)])

    module = get_submodule(net, layer)
    return calibrate(net, {layer: module}, xs, loss=loss, gram=True, max_samples=features)[layer]


def weight_errors(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """Absolute ||W - W_hat||_F, relative (/ ||W||_F) and scaled (/ numel W) errors (float64)."""
    if w.shape != w_hat.shape:
        raise TensorSlimError(f"weights of shapes {tuple(w.shape)} and {tuple(w_hat.shape)} differ")
    w64, h64 = w.detach().to(torch.float64), w_hat.detach().to(torch.float64)
    absolute = float(torch.linalg.norm(w64 - h64))
    norm = float(torch.linalg.norm(w64))
    return {
        "absolute": absolute,
        "relative": absolute / norm if norm > 0 else (0.0 if absolute == 0 else math.inf),
        "scaled": absolute / w.numel(),
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _svd_rank(m: int, n: int, keep: float) -> int:
    """The matrix rank whose r(m + n) parameters are within `keep` of m n (at least 1)."""
    return max(1, min(min(m, n), math.floor(keep * m * n / (m + n))))


def error_trial(params: dict[str, Any]) -> dict[str, Any]:
    """One trial of the study (parameters from ErrorStudyConfig.trials): compress the layer, measure
    its errors and the test error before and after fine-tuning; one row (plain JSON)."""
    from tensorslim.calibrate.features import feature_errors
    from tensorslim.compressors._factors import fisher_of, output_facts, risk_facts
    from tensorslim.core.compressor import get_compressor
    from tensorslim.core.cost import layer_dense_cost
    from tensorslim.core.handler import handler_for
    from tensorslim.core.materialize import build_layer, reconstructed, spec_cost
    from tensorslim.core.spec import Component
    from tensorslim.core.surgery import get_submodule, replace_at
    from tensorslim.core.target import LayerSite
    from tensorslim.decompose import weighted_error
    from tensorslim.train import accuracy, fit

    if params.get("study") != STUDY or params.get("version") != VERSION:
        raise TensorSlimError(f"not a trial of study {STUDY!r} version {VERSION}: {params!r:.200}")
    model_name, seed = params["model"], int(params["model_seed"])
    layer, method, keep, run = params["layer"], params["method"], float(params["keep"]), params["run"]
    base, data = _base(model_name, seed)
    net = copy.deepcopy(base).eval()
    module = get_submodule(net, layer)
    handler = handler_for(module)
    if handler is None or layer not in conv_layers(net):
        raise TensorSlimError(f"layer {layer!r} of {model_name!r} is not a 2-D conv")
    site = LayerSite(layer)
    options = {method: dict(params["options"])}
    kernel = handler.kernel(module)
    extra = 0 if module.bias is None else module.bias.numel()
    comp = get_compressor(method, options[method])
    rank = comp.rank_for_keep(tuple(kernel.shape), keep, extra)
    if rank is None:
        raise TensorSlimError(
            f"{method!r} has no rank within keep {keep} of layer {layer!r} {tuple(kernel.shape)}"
        )
    rank = [int(r) for r in rank] if isinstance(rank, (list, tuple)) else int(rank)
    spec = [Component(method, {"rank": rank})]
    new, facts = build_layer(module, handler, spec, site, options=options)
    new = new.eval()
    dense_params = layer_dense_cost(module, handler, site).params
    layer_params = spec_cost(module, handler, spec, site, options).params

    w = handler.matrices(module)[""].to(torch.float64)  # (out, in kh kw)
    w_hat = reconstructed(module, handler, new)[""].to(torch.float64)
    werr = weight_errors(w, w_hat)
    st = _layer_stats(
        model_name, seed, layer, int(params["calibration_samples"]), int(params["feature_samples"])
    )
    ferr = feature_errors(new, st.inputs, st.outputs)
    fisher = fisher_of(st, w.shape)
    risk = risk_facts(w, st, _svd_rank(*w.shape, keep), w_hat)
    out_err = output_facts(w, st, w_hat).get("rel_output_error")

    x_test, y_test = _test(data, params["test_samples"])
    dense_acc = _dense_accuracy(model_name, seed, params["test_samples"])
    compressed = replace_at(net, [layer], new)
    acc_before = accuracy(compressed, x_test, y_test)
    ft = params["finetune"]
    acc_after = acc_before
    if int(ft["epochs"]) > 0:
        x, y = data.x_train, data.y_train
        if ft["samples"] is not None and int(ft["samples"]) < len(x):
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(run))
            pick = pick[: int(ft["samples"])]
            x, y = x[pick], y[pick]
        fit(
            compressed, x, y, epochs=int(ft["epochs"]), lr=float(ft["lr"]),
            batch_size=int(ft["batch"]), seed=run, optimizer="sgd", momentum=float(ft["momentum"]),
        )
        acc_after = accuracy(compressed, x_test, y_test)
    return {
        "layer": layer,
        "layer_index": params["layer_index"],
        "method": method,
        "keep": keep,
        "run": run,
        "rank": rank,
        "achieved_keep": layer_params / dense_params,
        "weights_absolute": werr["absolute"],
        "weights_relative": _finite(werr["relative"]),
        "weights_scaled": werr["scaled"],
        "features_absolute": ferr["absolute"],
        "features_relative": _finite(ferr["relative"]),
        "features_scaled": ferr["scaled"],
        "fisher_weighted": 0.5 * weighted_error(w, w_hat, fisher),
        "output_calibration": _finite(out_err),
        "svd_risk": _finite(risk.get("svd_risk")),
        "kernel_rel_error": _finite(facts.get("kernel_rel_error")),
        "dense_accuracy": dense_acc,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "test_error_before": 1.0 - acc_before,
        "test_error_after": 1.0 - acc_after,
        "drop_before": 100.0 * (dense_acc - acc_before),
        "drop_after": 100.0 * (dense_acc - acc_after),
        "test_samples": len(x_test),
    }


# -- the study ------------------------------------------------------------------------------------
def analyse(rows: Sequence[dict[str, Any]], proxies: Sequence[str] = PROXIES) -> dict[str, Any]:
    """τ of every proxy against the test error before and after fine-tuning, in every grouping:
    {proxy: {grouping: {"before": {...}, "after": {...}}}} (study.tau.grouped_tau), with τ-a of
    the "all" grouping beside it."""
    from tensorslim.study.tau import GROUPINGS, grouped_tau, tau_a

    out: dict[str, Any] = {}
    for proxy in proxies:
        out[proxy] = {}
        for grouping in GROUPINGS:
            out[proxy][grouping] = {
                when: grouped_tau(rows, proxy, target, grouping)
                for when, target in TARGETS.items()
            }
        out[proxy]["all_tau_a"] = {
            when: grouped_tau(rows, proxy, target, "all", tau=tau_a)
            for when, target in TARGETS.items()
        }
    return out


@dataclass
class ErrorStudy:
    """The rows (one per trial, grid order), the τ analysis, what the sweep did and the files."""

    config: ErrorStudyConfig
    layers: list[str]
    rows: list[dict[str, Any]]
    taus: dict[str, Any]
    ran: int
    reused: int
    seconds: float
    trial_seconds: list[float]
    trial_cpu_seconds: list[float | None]
    files: dict[str, Path] = field(default_factory=dict)


def run_error_study(
    config: ErrorStudyConfig,
    out: str | Path,
    *,
    executor: str = "process",
    workers: int | None = None,
    threads: int = 1,
    ray_address: str | None = None,
    progress: bool = False,
) -> ErrorStudy:
    """Run (or resume) the study into folder `out`: trials.jsonl (the sweep's results file,
    resumable), rows.json, tau.json, tau.md and scatter.png. The model is trained (or read from
    the zoo cache) here, once, before any trial starts."""
    from tensorslim import zoo
    from tensorslim.study.error_report import plot_scatter, tau_markdown, write_json, write_text
    from tensorslim.study.sweep import run_sweep

    config.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TensorSlimError(f"--out {str(out)!r} exists and is not a folder")
    net = zoo.get(config.model).pretrained(seed=config.model_seed, progress=progress)
    layers = study_layers(net, config.layers)
    trials = config.trials(layers)
    out.mkdir(parents=True, exist_ok=True)
    res = run_sweep(
        error_trial, trials, out / "trials.jsonl", executor=executor, workers=workers,
        threads=threads, ray_address=ray_address, progress=progress, description="Error study",
    )
    taus = analyse(res.rows)
    study = ErrorStudy(
        config, layers, res.rows, taus, res.ran, res.reused, res.seconds, res.trial_seconds(),
        res.trial_cpu_seconds(),
    )
    study.files = {
        "trials": out / "trials.jsonl",
        "rows": write_json(out / "rows.json", res.rows),
        "tau_json": write_json(out / "tau.json", taus),
        "tau_md": write_text(out / "tau.md", tau_markdown(taus, title=f"{config.model}") + "\n"),
        "scatter": plot_scatter(res.rows, out / "scatter.png", title=config.model),
    }
    return study
