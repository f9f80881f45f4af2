"""The command line: a thin face over the Python API. User mistakes print one line and exit 2."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape

from tensorslim.errors import TensorSlimError

app = typer.Typer(
    help="Make trained PyTorch networks smaller and faster with low-rank decompositions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the tables when output goes to a file or a CI log (rich defaults to 80 there).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _print_error(message: str) -> None:
    """One `error:` line on stderr; the message is printed literally (no rich markup)."""
    text = " ".join(message.split())
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def user_errors(fn):
    """Turn TensorSlimError (and an OSError from the file system) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TensorSlimError as exc:
            _print_error(str(exc))
        except OSError as exc:  # reading or writing a path outside tensorslim.io's care
            where = f"{str(exc.filename)!r}: " if exc.filename else ""
            _print_error(f"{where}{exc.strerror or exc}")
        raise typer.Exit(code=2)

    return wrapper


# Bounds of an example input shape (--input-shape, or example_input_shape in a plan).
MAX_SHAPE_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**28  # 1 GiB of float32
_SHAPE_RULE = (
    f"1 to {MAX_SHAPE_DIMS} positive integers (e.g. 1,3,32,32), each at most {MAX_DIM}, "
    f"at most {MAX_ELEMENTS} elements in all"
)


def check_example_shape(value: Any, source: str, shown: str | None = None) -> tuple[int, ...]:
    """`value` as an example input shape, or TensorSlimError naming `source` and the value
    (`shown`: the text the user typed, if any)."""
    got = shown if shown is not None else repr(value)
    if not isinstance(value, (list, tuple)) or not all(type(d) is int for d in value):
        raise TensorSlimError(f"{source} must be {_SHAPE_RULE}; got {got}")
    if not 1 <= len(value) <= MAX_SHAPE_DIMS or any(not 1 <= d <= MAX_DIM for d in value):
        raise TensorSlimError(f"{source} must be {_SHAPE_RULE}; got {got}")
    n = 1
    for d in value:
        n *= d
    if n > MAX_ELEMENTS:
        raise TensorSlimError(f"{source} must be {_SHAPE_RULE}; got {got} ({n} elements)")
    return tuple(value)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    """--input-shape "1,3,32,32" (or 1x3x32x32) as a checked shape; None if not given."""
    if text is None:
        return None
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if not all(re.fullmatch(r"[0-9]{1,19}", p, re.ASCII) for p in parts):
        raise TensorSlimError(f"--input-shape must be {_SHAPE_RULE}; got {text!r}")
    return check_example_shape([int(p) for p in parts], "--input-shape", repr(text))


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _example_for(model: torch.nn.Module, shape: tuple[int, ...] | None, example: Any) -> Any:
    """A seeded random input of `shape` in the model's dtype, else `example` cast to that dtype."""
    dtype = _float_dtype(model)
    if shape is not None:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    if isinstance(example, torch.Tensor) and example.is_floating_point():
        return example.to(dtype)
    return example


def _spec_paths(spec: str | None) -> list[Path]:
    """The files a model spec reads: a pickled model or the .py file of `file.py:factory`."""
    if not spec:
        return []
    if Path(spec).exists():
        return [Path(spec)]
    module = spec.partition(":")[0]
    return [Path(module)] if module.endswith(".py") else []


def resolve_model(
    spec: str | None,
    weights: Path | None = None,
    trust_pickle: bool = False,
    input_shape: str | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, Any, str]:
    """A model and an example input (or None) from a zoo name, a factory spec or a pickled file."""
    from tensorslim import zoo
    from tensorslim.io import load_pickled_model, load_weights
    from tensorslim.modelspec import model_from_factory

    if not spec:
        raise TensorSlimError(
            "name a model: a zoo name (" + ", ".join(sorted(zoo.ZOO)) + "), "
            "--model package.module:factory, or a pickled model file with --trust-pickle"
        )
    shape = _parse_shape(input_shape)
    example = None
    if spec in zoo.ZOO:
        entry = zoo.get(spec)
        model = entry.build() if weights else entry.pretrained(progress=progress)
        example = entry.example_input()
    elif ":" in spec and not Path(spec).is_file():
        model = model_from_factory(spec)
    elif Path(spec).suffix in (".pt", ".pth", ".pkl", ".bin"):
        model = load_pickled_model(spec, trust_pickle=trust_pickle)
        if weights:
            raise TensorSlimError("--weights is for --model factory specs, not for pickled models")
    else:
        raise TensorSlimError(
            f"unknown model {spec!r}: not a zoo name ({', '.join(sorted(zoo.ZOO))}), not "
            "'package.module:factory' and not a .pt/.pth file"
        )
    if weights:
        load_weights(model, weights)
    if shape is not None:
        example = _example_for(model, shape, None)
    return model.eval(), example, spec


def _parse_keep(text: str) -> float:
    """--keep as a number in (0, 1] (parsed here so a non-number is one `error:` line too)."""
    from tensorslim.errors import InvalidKeepError, check_keep

    try:
        value = float(text)
    except ValueError:
        raise InvalidKeepError(f"--keep must be a number in (0, 1]; got {text!r}") from None
    return check_keep(value)


def _parse_speedup(text: str) -> float:
    """--speedup as a finite number > 1 (one `error:` line otherwise)."""
    from tensorslim.speed.target import check_speedup

    try:
        value = float(text)
    except ValueError:
        raise TensorSlimError(f"--speedup must be a number > 1, e.g. 2; got {text!r}") from None
    return check_speedup(value)


def _check_data_needs(method: str, objective: str | None, calibration: Path | None) -> None:
    """Refuse, in command-line terms, a method or objective that needs data the command cannot
    give: a loss (Fisher information) never, calibration inputs without --calibration."""
    from tensorslim.core.objective import OBJECTIVE_NEEDS
    from tensorslim.search.methods import method_compressor

    try:
        compressor = method_compressor(method)
        needs = set(OBJECTIVE_NEEDS[objective or compressor.objective])
    except (TensorSlimError, KeyError):
        return  # compress() reports an unknown method or objective
    needs |= set(getattr(compressor, "needs", frozenset()))
    if "fisher" in needs:
        what = f"--objective {objective}" if objective == "fisher" else f"--method {method}"
        raise TensorSlimError(
            f"{what} needs the Fisher information of a loss, which the command line cannot "
            "give; use tensorslim.compress(..., calibration=batches, loss=fn) in Python, or "
            "--method whitened / --objective feature with --calibration FILE"
        )
    if "gram" in needs and calibration is None:
        what = f"--objective {objective}" if objective == "feature" else f"--method {method}"
        raise TensorSlimError(
            f"{what} needs calibration inputs: pass --calibration FILE (a .safetensors or .npy "
            "file of model inputs along dim 0, or a data set name)"
        )


def _calibration_batches(
    path: Path,
    key: str | None,
    samples: int,
    batch: int,
    dtype: torch.dtype,
    input_shape: tuple[int, ...] | None,
) -> list[torch.Tensor]:
    """`compress --calibration`: the first `samples` inputs of the file, checked (not empty,
    finite, shaped like --input-shape's samples) and split into batches of `batch`; floating-point
    data is cast to the model's dtype."""
    from tensorslim.input_files import checked_inputs, read_inputs

    data, name = read_inputs(
        str(path), flag="--calibration", key=key, samples=samples, several=False
    )
    assert isinstance(data, torch.Tensor)  # several=False: one tensor
    if input_shape is not None and tuple(data.shape[1:]) != input_shape[1:]:
        raise TensorSlimError(
            f"{name} holds samples of shape {tuple(data.shape[1:])} (shape "
            f"{tuple(data.shape)}), but --input-shape {','.join(map(str, input_shape))} "
            f"describes samples of shape {tuple(input_shape[1:])}"
        )
    data = checked_inputs(data, name, dtype)
    return list(data.split(batch))


MODEL_ARG = typer.Argument(
    None,
    help="Zoo name (digits-cnn, digits-mlp), package.module:factory, file.py:factory, "
    "or a pickled model .pt (needs --trust-pickle).",
)
MODEL_OPT = typer.Option(None, "--model", "-m", help="Same as MODEL: package.module:factory, ...")
WEIGHTS_OPT = typer.Option(
    None,
    "--weights",
    "-w",
    help="Weights for a factory model: .safetensors, or a state_dict "
    ".pt read with weights_only=True.",
)
TRUST_OPT = typer.Option(
    False, "--trust-pickle", help="Allow unpickling a whole model file (runs code from the file)."
)
SHAPE_OPT = typer.Option(
    None,
    "--input-shape",
    help="Example input shape, e.g. 1,3,32,32 (needed for FLOPs of non-zoo models).",
)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("tensorslim-demo"), "--out", "-o", help="Output folder."),
    keeps: str = typer.Option("0.5,0.3,0.2,0.1", help="Comma-separated keep values."),
    finetune_epochs: int = typer.Option(2, help="Fine-tuning epochs after compression (0: none)."),
    seed: int = typer.Option(0, help="Seed for data split, training and fine-tuning."),
) -> None:
    """Train (cached) a small CNN on sklearn digits, compress it at several budgets with the
    uniform and global allocators, and print params, FLOPs, accuracy and latency."""
    from tensorslim.demo import rows_for_display, run_demo
    from tensorslim.errors import check_keep
    from tensorslim.report import rich_table

    try:
        keep_values = tuple(check_keep(float(k)) for k in keeps.split(",") if k.strip())
    except ValueError:
        raise TensorSlimError(f"--keeps must be numbers in (0, 1]; got {keeps!r}") from None
    rows, plot = run_demo(out, keep_values, finetune_epochs, seed, progress=True)
    console.print(
        rich_table(
            rows_for_display(rows),
            title="digits-cnn compressed with SVD, keep = fraction of the FLOPs (test set of 450 "
            f"images; whole-model latency: batch 256, {torch.get_num_threads()} CPU threads, "
            "median; speedup vs dense, and vs dense with the same inference levers)",
        )
    )
    console.print(f"Plot: {plot}\nResults: {Path(out) / 'results.json'}")


@app.command(name="compress")
@user_errors
def compress_cmd(
    model_arg: str | None = MODEL_ARG,
    model: str | None = MODEL_OPT,
    weights: Path | None = WEIGHTS_OPT,
    trust_pickle: bool = TRUST_OPT,
    keep: str | None = typer.Option(
        None, "--keep", "-k", help="Fraction of the compressible cost kept (default 0.5)."
    ),
    speedup: str | None = typer.Option(
        None,
        "--speedup",
        help="Whole-model latency target instead of --keep, e.g. 2 (dense ms / compressed ms, "
        "measured on the example input; searches the latency budget).",
    ),
    measure: bool = typer.Option(
        False, "--measure", help="With --keep: also time the whole model, dense vs compressed."
    ),
    cost: str | None = typer.Option(
        None,
        help="Budget unit: params (default), bits (storage), flops or latency (measured ms; the "
        "default with --speedup).",
    ),
    method: str = typer.Option(
        "svd", help="Compressor (svd, fwsvd, fvd, whitened, cp, tucker2, tt, spatial) or auto."
    ),
    allocator: str = typer.Option("global", help="global or uniform."),
    include: list[str] | None = typer.Option(None, help="Only layers matching this pattern."),
    exclude: list[str] | None = typer.Option(None, help="Skip layers matching this pattern."),
    input_shape: str | None = SHAPE_OPT,
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Calibration inputs for data-aware compression (whitened, --objective feature, "
        "--sequential): a .safetensors file (samples along dim 0), a .npy array (read with "
        "allow_pickle=False), or a data set name (digits, fashion, or a zoo model's).",
    ),
    calibration_key: str | None = typer.Option(
        None,
        "--calibration-key",
        help="The tensor of a .safetensors --calibration file holding several tensors.",
    ),
    calibration_samples: int = typer.Option(
        256, "--calibration-samples", min=1, help="Use the first N samples of --calibration."
    ),
    calibration_batch: int = typer.Option(
        32, "--calibration-batch", min=1, help="Samples per calibration batch."
    ),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="What the allocator minimises per layer: weight, feature (output error on "
        "--calibration) or fisher (needs a loss: Python API only); default per method.",
    ),
    sequential: bool | None = typer.Option(
        None,
        "--sequential/--no-sequential",
        help="With --calibration: build the layers in execution order, each from the inputs the "
        "compressed earlier layers give it, refitting each to the original outputs. Default: on "
        "for --method whitened with --calibration.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
) -> None:
    """Compress a model to a budget and save plan.json + model.safetensors."""
    from tensorslim import zoo
    from tensorslim.api import compress
    from tensorslim.io import check_output_dir, save

    if keep is not None and speedup is not None:
        raise TensorSlimError(
            "give --keep or --speedup, not both: --keep is a cost budget, --speedup a measured "
            "whole-model latency target"
        )
    target = _parse_speedup(speedup) if speedup is not None else None
    keep_value = None
    if target is None:
        keep_value = _parse_keep(keep) if keep is not None else 0.5
    spec_arg = model or model_arg
    _check_data_needs(method, objective, calibration)
    if sequential and calibration is None:
        raise TensorSlimError("--sequential needs --calibration FILE")
    check_output_dir(
        out,
        [
            *_spec_paths(spec_arg),
            *([weights] if weights else []),
            *([calibration] if calibration else []),
        ],
    )
    net, example, spec = resolve_model(spec_arg, weights, trust_pickle, input_shape)
    batches = None
    if calibration is not None:
        batches = _calibration_batches(
            calibration,
            calibration_key,
            calibration_samples,
            calibration_batch,
            _float_dtype(net),
            _parse_shape(input_shape),
        )
    options = dict(
        method=method,
        allocator=allocator,
        include=include or None,
        exclude=exclude or None,
        progress=True,
        calibration=batches,
        objective=objective,
        sequential=sequential,
    )
    if target is not None:
        from tensorslim.speed.target import search_speedup

        if example is None:
            raise TensorSlimError(
                "--speedup times the whole model on an example input: pass --input-shape "
                "(e.g. 16,3,32,32, the batch you will serve)"
            )
        res = search_speedup(net, target, example, cost=cost or "latency", **options)
        small, plan = res.base, res.plan  # saved: the compression before the inference levers
    else:
        small, plan = compress(
            net, keep_value, cost=cost or "params", example_input=example, measure=measure,
            **options,
        )  # fmt: skip
    # a hint for `export`, which rebuilds zoo models only: other specs would run code
    plan.meta["model_spec"] = spec if spec in zoo.ZOO else None
    save(small, plan, out)
    console.print(str(plan), highlight=False, soft_wrap=True)
    console.print(f"Saved to {out}/ (plan.json, model.safetensors)")


@app.command()
@user_errors
def inspect(
    model_arg: str | None = MODEL_ARG,
    model: str | None = MODEL_OPT,
    weights: Path | None = WEIGHTS_OPT,
    trust_pickle: bool = TRUST_OPT,
    input_shape: str | None = SHAPE_OPT,
    plot: Path | None = typer.Option(None, "--plot", help="Write the spectra to this PNG."),
) -> None:
    """Per-layer shapes, params, FLOPs and spectrum summary (ranks for 90% / 99% of the energy)."""
    from tensorslim.api import analyze
    from tensorslim.plan.render import human
    from tensorslim.report import plot_spectra, rich_table

    net, example, _ = resolve_model(model or model_arg, weights, trust_pickle, input_shape)
    reports = analyze(net, example, progress=True)
    rows = [
        {
            "layer": r.name,
            "type": r.type,
            "shape": "×".join(map(str, r.shape)),
            "params": human(r.params),
            "FLOPs": human(r.flops),
            "full rank": min(r.shape[0], int(torch.tensor(r.shape[1:]).prod()))
            if r.rank90 is not None
            else None,
            "rank 90%": r.rank90,
            "rank 99%": r.rank99,
            "max useful rank": r.max_useful_rank,
            "note": r.reason or "",
        }
        for r in reports
    ]
    console.print(rich_table(rows, title="Layers (energy = squared singular values)"))
    if plot is not None:
        spectra = {r.name: r.singular_values for r in reports if r.singular_values}
        console.print(f"Spectra plot: {plot_spectra(spectra, plot)}")


@app.command()
@user_errors
def export(
    folder: Path = typer.Argument(..., help="A folder written by `tensorslim compress`."),
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="The original architecture (zoo name or factory spec); default: the zoo model "
        "recorded in the plan (a folder never names code to import).",
    ),
    input_shape: str | None = SHAPE_OPT,
    check: bool = typer.Option(True, help="Compare onnxruntime's output with PyTorch's."),
    time: bool = typer.Option(
        True,
        "--time/--no-time",
        help="Also export the dense architecture to a temporary file and time both in ONNX "
        "Runtime (alternately, medians, torch's thread count).",
    ),
) -> None:
    """Export a compressed model folder to ONNX, loaded back with onnxruntime (and with --check
    compared with PyTorch) before it replaces the --onnx file; with --time, report dense and
    compressed latency in ONNX Runtime."""
    from tensorslim.io import (
        MARKER_FILE,
        PLAN_FILE,
        WEIGHTS_FILE,
        check_output_file,
        export_onnx_checked,
        load,
    )
    from tensorslim.modelspec import zoo_name_from_plan
    from tensorslim.plan import Plan

    plan_path = folder / PLAN_FILE
    plan = Plan.from_json(plan_path)
    inputs = [plan_path, folder / WEIGHTS_FILE, folder / MARKER_FILE, *_spec_paths(model)]
    check_output_file(onnx, inputs)
    shape = _parse_shape(input_shape)
    spec = model or zoo_name_from_plan(plan.meta, plan_path)
    base, example = _architecture(spec)
    if shape is None and example is None:
        meta = plan.meta if isinstance(plan.meta, dict) else {}
        recorded = meta.get("example_input_shape")
        if recorded is None:
            raise TensorSlimError("pass --input-shape to trace the model for ONNX")
        shape = check_example_shape(recorded, f"example_input_shape in {str(plan_path)!r}")
    small = load(base, folder).eval()
    example = _example_for(small, shape, example)
    _, diff = export_onnx_checked(small, example, onnx, check=check)
    console.print(f"Wrote {onnx} (loads in onnxruntime)")
    if diff is not None:
        console.print(f"onnxruntime vs PyTorch: max abs difference {diff:.3g}")
    if time:
        _print_onnx_speed(base, example, onnx)


def _print_onnx_speed(dense: torch.nn.Module, example: Any, onnx: Path) -> None:
    """Export the dense architecture (its freshly built weights) to a temporary file and print
    dense and compressed ONNX Runtime latency and the speedup."""
    import tempfile

    from tensorslim.io import export_onnx_checked
    from tensorslim.speed.onnx_time import compare_onnx

    with tempfile.TemporaryDirectory(prefix="tensorslim-dense-") as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx_checked(dense.eval(), example, dense_path, check=False)
        r = compare_onnx(dense_path, onnx, example)
    shapes = ", ".join("x".join(str(d) for d in s) for s in r["input_shapes"])
    console.print(
        f"ONNX Runtime {r['onnxruntime']} ({r['threads']} threads, input {shapes}, best of "
        f"{r['rounds']} alternating medians): dense {r['dense_ms']:.3f} ms, compressed "
        f"{r['compressed_ms']:.3f} ms, speedup {r['speedup']:.2f}x (dense: the same architecture "
        "with freshly initialized weights)"
    )


def _architecture(spec: str) -> tuple[torch.nn.Module, Any]:
    """The untrained architecture named by `spec` (its weights are replaced) and its example."""
    from tensorslim import zoo

    if spec in zoo.ZOO:
        entry = zoo.get(spec)
        return entry.build(), entry.example_input()
    base, example, _ = resolve_model(spec, None, False, None, progress=False)
    return base, example


def _fractions(text: str, option: str) -> list[float]:
    """Comma-separated numbers in (0, 1], else TensorSlimError naming the option and value."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = [float("nan")]
    if not all(0 < v <= 1 for v in values):  # also rejects NaN
        raise TensorSlimError(f"{option} must be comma-separated numbers in (0, 1]; got {text!r}")
    return values


def _positive_ints(text: str, option: str) -> list[int]:
    """Comma-separated integers >= 1, else TensorSlimError naming the option and value."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(re.fullmatch(r"[0-9]{1,9}", p, re.ASCII) and int(p) >= 1 for p in parts):
        raise TensorSlimError(f"{option} must be comma-separated integers >= 1; got {text!r}")
    return [int(p) for p in parts]


@app.command()
@user_errors
def truncate(
    model_arg: str | None = typer.Argument(
        None, help="A zoo model with labelled data (e.g. cnn4-fashion, digits-cnn)."
    ),
    cuts: str = typer.Option(
        "all", help="'all' or cuts separated by ';', e.g. 'out|in,kh,kw;out,in|kh,kw'."
    ),
    retain: str = typer.Option("0.9,0.7,0.5", help="Norm-retention targets ||K~||/||K||."),
    chi: str = typer.Option("", help="Bond dimensions χ to truncate to (comma-separated)."),
    mps: str = typer.Option("0.5,0.25", help="MPS bond fractions for sequential truncation."),
    layers: list[str] | None = typer.Option(None, "--layer", help="Only these conv layers."),
    test_size: int = typer.Option(2000, help="Test images used for accuracy (0: all)."),
    retrain_epochs: int = typer.Option(0, help="Retrain the worst all-layer truncation N epochs."),
    out: Path = typer.Option(Path("tensorslim-truncate"), "--out", "-o", help="Output folder."),
) -> None:
    """Truncate conv kernels along cuts (bipartitions of out, in, kh, kw) and report kernel-norm
    loss against accuracy, per layer and for all layers; writes truncation.json and .png."""
    import json

    from tensorslim import zoo
    from tensorslim.io import atomic_write_file
    from tensorslim.report import rich_table
    from tensorslim.report.truncation_plot import plot_truncation
    from tensorslim.study.truncation import truncation_study

    if not model_arg or model_arg not in zoo.ZOO:
        raise TensorSlimError(
            "truncate needs a zoo model with labelled data: " + ", ".join(sorted(zoo.ZOO))
        )

    retains = _fractions(retain, "--retain")
    chis = _positive_ints(chi, "--chi")
    mps_fractions = _fractions(mps, "--mps")
    entry = zoo.get(model_arg)
    net = entry.pretrained(progress=True)
    data = entry.data()
    n = len(data.x_test) if test_size <= 0 else min(test_size, len(data.x_test))
    try:
        study = truncation_study(
            net,
            data.x_test[:n],
            data.y_test[:n],
            cuts=None if cuts == "all" else [c for c in cuts.split(";") if c.strip()],
            retains=retains,
            chis=chis,
            mps_fractions=mps_fractions,
            layers=layers or None,
            retrain_epochs=retrain_epochs,
            x_train=data.x_train,
            y_train=data.y_train,
            progress=True,
        )
    except ValueError as exc:
        raise TensorSlimError(str(exc)) from None
    rows = [
        {
            "layer": r.layer,
            "cut": r.cut,
            "level": r.level,
            "bond": r.bond,
            "norm loss": round(r.norm_loss, 4),
            "norm² loss": round(r.norm_loss_sq, 4),
            "accuracy": round(r.accuracy, 4),
            "drop (pts)": round(r.drop, 2),
        }
        for r in study.rows
    ]
    console.print(
        rich_table(rows, title=f"{model_arg}: dense accuracy {study.dense_accuracy:.4f} on {n}")
    )
    if study.recovery:
        console.print(rich_table(study.recovery, title="Recovery by retraining"))
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_arg,
        "test_size": n,
        "dense_accuracy": study.dense_accuracy,
        "rows": study.table(),
        "recovery": study.recovery,
    }
    atomic_write_file(
        out / "truncation.json", lambda p: p.write_text(json.dumps(payload, indent=2))
    )
    plot = plot_truncation(study, out / "truncation.png", title=f"{model_arg}: truncation")
    console.print(f"Results: {out / 'truncation.json'}; plot: {plot}")


def _recover_inputs(text: str, dtype: torch.dtype) -> Any:
    """`recover --data`: a tensor, or a dict of tensors (keyword inputs), of unlabeled inputs
    along dim 0, checked and cast to the model's dtype (tensorslim.input_files)."""
    from tensorslim.input_files import checked_inputs, read_inputs

    data, name = read_inputs(text, flag="--data")
    return checked_inputs(data, name, dtype)


@app.command(name="recover")
@user_errors
def recover_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `tensorslim compress`."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="The original architecture (zoo name or factory spec); default: the zoo model "
        "recorded in the plan (a folder never names code to import).",
    ),
    weights: Path | None = WEIGHTS_OPT,
    trust_pickle: bool = TRUST_OPT,
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Unlabeled inputs: a .safetensors file (tensors along dim 0; several tensors are "
        "keyword inputs), a .npy array (read with allow_pickle=False), or a data set name "
        "(digits, fashion, or a zoo model's).",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the data."),
    steps: int | None = typer.Option(
        None, "--steps", help="Optimizer steps (instead of --epochs)."
    ),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    features: str | None = typer.Option(
        None, "--features", help="Comma-separated module names whose outputs are matched too."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Inputs per step."),
    seed: int = typer.Option(0, help="Seed for the data order and dropout."),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="Folder for a resumable checkpoint (after every epoch); rerun the same command to "
        "continue an interrupted run.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: replace FOLDER, written atomically)."
    ),
) -> None:
    """Recover accuracy without labels: train the compressed model in FOLDER to reproduce the
    original model's outputs on unlabeled inputs (distillation), then save it with the plan."""
    import copy
    import os

    from tensorslim.io import PLAN_FILE, check_not_inputs, check_output_dir, load, save
    from tensorslim.modelspec import zoo_name_from_plan
    from tensorslim.plan import Plan
    from tensorslim.train.distill import recover

    plan_path = folder / PLAN_FILE
    plan = Plan.from_json(plan_path)
    in_place = out is None or Path(os.path.realpath(out)) == Path(os.path.realpath(folder))
    target = folder if in_place else out
    inputs = [*_spec_paths(model), *([weights] if weights else []), Path(data)]
    inputs = [p for p in inputs if p.exists()]
    # in place is allowed: FOLDER carries the .tensorslim marker (check_output_dir checks it)
    check_output_dir(target, inputs if in_place else [*inputs, folder])
    if checkpoint is not None:
        check_not_inputs(checkpoint, [*inputs, folder, target])
    names = [n.strip() for n in features.split(",") if n.strip()] if features else None
    spec = model or zoo_name_from_plan(plan.meta, plan_path)
    original, _, _ = resolve_model(spec, weights, trust_pickle, None)
    compressed = load(copy.deepcopy(original), folder)
    inputs_data = _recover_inputs(data, _float_dtype(original))
    result = recover(
        compressed,
        original,
        inputs_data,
        epochs=epochs,
        steps=steps,
        lr=lr,
        features=names,
        batch_size=batch_size,
        progress=True,
        checkpoint=checkpoint,
        seed=seed,
        plan=plan,
    )
    save(compressed.eval(), plan, target)
    if result.resumed_at:
        console.print(f"Resumed from {checkpoint} at step {result.resumed_at}")
    console.print(
        f"distillation loss {result.loss_before:.4g} -> {result.loss_after:.4g}; "
        f"output cosine {result.cosine_before:.4f} -> {result.cosine_after:.4f} "
        f"({result.steps} steps, {result.seconds:.1f} s)",
        highlight=False,
    )
    console.print(f"Saved to {target}/ (plan.json, model.safetensors)")


# -- lc: the learning-compression algorithm --------------------------------------------------------
def _lc_specs(specs: list[str], specs_file: Path | None) -> Any:
    """`lc --spec`: one JSON spec for every compressible layer, or PATTERN=JSON (repeatable);
    `--specs-file`: a JSON file holding either form ({pattern: spec} or a spec)."""
    import json

    def parse(text: str, where: str) -> Any:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise TensorSlimError(f"{where} is not valid JSON: {exc}") from None

    if specs_file is not None:
        if specs:
            raise TensorSlimError("give --spec or --specs-file, not both")
        if not specs_file.is_file():
            raise TensorSlimError(f"--specs-file {str(specs_file)!r} is not a file")
        return parse(specs_file.read_text(), f"--specs-file {str(specs_file)!r}")
    if not specs:
        raise TensorSlimError(
            'give --spec: a JSON spec for every layer (e.g. \'[{"kind": "lowrank", "rank": 8}]\') '
            "or PATTERN=JSON per layer (repeatable)"
        )
    if len(specs) == 1 and specs[0].lstrip()[:1] in ("[", "{"):
        return parse(specs[0], "--spec")
    out: dict[str, Any] = {}
    for text in specs:
        pattern, sep, value = text.partition("=")
        if not sep or not pattern.strip() or value.lstrip()[:1] not in ("[", "{"):
            raise TensorSlimError(
                f"--spec {text!r}: several --spec options each take PATTERN=JSON (e.g. "
                '\'features.*=[{"kind": "lowrank", "rank": 8}]\')'
            )
        out[pattern.strip()] = parse(value, f"--spec {pattern.strip()!r}")
    return out


def _lc_data(text: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """`lc --data`: ((x, y) training tensors, the zoo Split for test accuracy or None): a data
    set name, or a .safetensors file holding the tensors 'inputs' and 'targets'."""
    from tensorslim.input_files import checked_inputs, data_set, read_inputs

    split = data_set(text)
    if split is not None:
        x, y = split.x_train, split.y_train
        return (x.to(dtype) if x.is_floating_point() else x, y), split
    found, name = read_inputs(text, flag="--data")
    if not isinstance(found, dict) or set(found) != {"inputs", "targets"}:
        held = ", ".join(map(repr, found)) if isinstance(found, dict) else "one tensor"
        raise TensorSlimError(
            f"--data {text!r} must be a .safetensors file holding exactly the tensors 'inputs' "
            f"and 'targets' (along dim 0), or a data set name; it holds {held}"
        )
    x = checked_inputs(found["inputs"], f"tensor 'inputs' of {name}", dtype)
    return (x, found["targets"]), None


@app.command(name="lc")
@user_errors
def lc_cmd(
    model_arg: str | None = MODEL_ARG,
    model: str | None = MODEL_OPT,
    weights: Path | None = WEIGHTS_OPT,
    trust_pickle: bool = TRUST_OPT,
    spec: list[str] | None = typer.Option(
        None,
        "--spec",
        "-s",
        help='A JSON spec for every compressible layer (\'[{"kind": "quant", "bits": 2}]\'), '
        "or PATTERN=JSON for the layers matching an fnmatch pattern (repeatable).",
    ),
    specs_file: Path | None = typer.Option(
        None, "--specs-file", help="A JSON file: a spec, or an object {pattern: spec}."
    ),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Labeled training data: a data set name (digits, fashion, or a zoo model's) or a "
        ".safetensors file with tensors 'inputs' and 'targets'.",
    ),
    steps: int = typer.Option(20, "--steps", min=1, help="LC steps (values of mu)."),
    mu0: float = typer.Option(1e-3, "--mu0", help="First mu (mu_k = mu0 * growth^k)."),
    growth: float = typer.Option(1.1, "--growth", help="Growth of mu per step (> 1)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs per L step (default 1)."),
    batches: int | None = typer.Option(
        None, "--batches", help="Optimizer steps per L step (instead of --epochs)."
    ),
    lr: float = typer.Option(0.01, "--lr", help="L-step learning rate at the first step."),
    lr_decay: float = typer.Option(0.98, "--lr-decay", help="Learning rate factor per LC step."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov momentum) or adam."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per step."),
    penalty_only: bool = typer.Option(
        False, "--penalty-only", help="Quadratic penalty without Lagrange multipliers."
    ),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="Run the baseline instead: direct compression then the same fine-tuning, kept "
        "feasible by 'reproject' (train, project again) or 'modules' (train the compressed "
        "modules).",
    ),
    recalibrate_bn: int = typer.Option(
        0,
        "--recalibrate-bn",
        min=0,
        help="Re-estimate BatchNorm statistics of the compressed model on N training batches.",
    ),
    seed: int = typer.Option(0, help="Seed for the data order and dropout."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Folder for a checkpoint written after every LC step."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run saved in --checkpoint."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
) -> None:
    """Compress a model by the learning-compression algorithm (L steps: SGD on the loss plus
    mu/2 ||w - Delta(Theta) - lambda/mu||^2; C steps: each layer's exact projection) and save
    plan.json + model.safetensors."""
    from tensorslim import lc, zoo
    from tensorslim.io import check_not_inputs, check_output_dir, save
    from tensorslim.lc import checkpoint as lc_checkpoint
    from tensorslim.report import rich_table
    from tensorslim.train import accuracy

    spec_arg = model or model_arg
    specs = _lc_specs(spec or [], specs_file)
    inputs = [*_spec_paths(spec_arg), *([weights] if weights else [])]
    inputs += [p for p in (Path(data), specs_file) if p is not None and p.exists()]
    check_output_dir(out, inputs)
    if checkpoint is not None:
        check_not_inputs(checkpoint, [*inputs, out])
        check_output_dir(checkpoint)
        if not resume and lc_checkpoint.read(checkpoint) is not None:
            raise TensorSlimError(
                f"--checkpoint {str(checkpoint)!r} holds a run already: add --resume to continue "
                "it, or name another folder"
            )
    elif resume:
        raise TensorSlimError("--resume needs --checkpoint (the folder of the run to continue)")
    if baseline is not None and baseline not in ("reproject", "modules"):
        raise TensorSlimError(f"--baseline must be reproject or modules; got {baseline!r}")
    net, _, name = resolve_model(spec_arg, weights, trust_pickle, None)
    (x, y), split = _lc_data(data, _float_dtype(net))
    schedule = lc.Schedule(
        mu0=mu0, growth=growth, steps=steps, epochs=epochs, batches=batches, lr=lr,
        lr_decay=lr_decay, optimizer=optimizer,
    )
    common = dict(
        schedule=schedule, batch_size=batch_size, seed=seed, checkpoint=checkpoint,
        progress=True, recalibrate=recalibrate_bn,
    )
    if baseline is None:
        small, result = lc.compress(net, specs, (x, y), lagrangian=not penalty_only, **common)
    else:
        small, result = lc.finetune(net, specs, (x, y), how=baseline, **common)
    plan = result.plan
    plan.meta["model_spec"] = name if name in zoo.ZOO else None
    save(small, plan, out)
    rows = [
        {
            "step": r["step"],
            "mu": f"{r['mu']:.3g}",
            "loss": round(r["loss"], 4),
            "penalty": round(r.get("penalty", 0.0), 4),
            "rel. violation": "-" if "rel_violation" not in r else f"{r['rel_violation']:.3g}",
        }
        for r in result.history
    ]
    console.print(rich_table(rows, title=f"{result.mode}: one row per step"))
    console.print(str(plan), highlight=False, soft_wrap=True)
    if result.resumed_at:
        console.print(f"Resumed from {checkpoint} at step {result.resumed_at}")
    if split is not None:
        before, after = accuracy(net, split.x_test, split.y_test), accuracy(
            small, split.x_test, split.y_test
        )
        console.print(
            f"test accuracy {before:.4f} -> {after:.4f} ({len(split.y_test)} images)",
            highlight=False,
        )
    console.print(result.summary(), highlight=False)
    console.print(f"Saved to {out}/ (plan.json, model.safetensors)")


# -- studies -------------------------------------------------------------------------------------
study_app = typer.Typer(
    help="Studies over grids of trials (resumable; local processes or Ray).",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")


def _names(text: str, option: str) -> list[str]:
    """Comma-separated names, at least one, else TensorSlimError naming the option."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise TensorSlimError(f"{option} needs at least one comma-separated name; got {text!r}")
    return names


@study_app.command(name="errors")
@user_errors
def study_errors(
    model_arg: str = typer.Argument(
        ..., help="A zoo model with labelled data, e.g. garipov-sgd (the paper's setting)."
    ),
    methods: str = typer.Option("cp,tucker2,tt", "--methods", help="Tensor methods to compare."),
    keep: str = typer.Option(
        "0.1,0.25,0.5", "--keep", help="Fractions of each layer's parameters kept, in (0, 1)."
    ),
    runs: int = typer.Option(5, "--runs", help="Repetitions (seeds 0..N-1: CP init, fine-tuning)."),
    finetune_epochs: int = typer.Option(
        10, "--finetune-epochs", help="Fine-tuning epochs after each compression (0: none)."
    ),
    finetune_samples: int | None = typer.Option(
        None, "--finetune-samples", help="Fine-tune on this many training images (default all)."
    ),
    finetune_lr: float = typer.Option(1e-4, "--finetune-lr", help="SGD (momentum 0.9) rate."),
    layers: str | None = typer.Option(
        None, "--layers", help="Conv layers to compress (default: every conv but the first)."
    ),
    test_samples: int | None = typer.Option(
        None, "--test-samples", help="Test images for the test error (default all)."
    ),
    feature_samples: int = typer.Option(
        128, "--feature-samples", help="Training images for the feature errors."
    ),
    calibration_samples: int = typer.Option(
        256, "--calibration-samples", help="Training images for the Fisher and Gram proxies."
    ),
    ray: bool = typer.Option(False, "--ray", help="Run the trials on Ray (pip extra `ray`)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Address of a running Ray cluster (implies --ray)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Worker processes or local Ray CPUs (default: CPU cores; "
        "0: run in this process)."
    ),
    threads: int = typer.Option(1, "--threads", help="Torch threads per trial."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; rerun to resume."),
) -> None:
    """The error-proxy study of Schuurmans, Batselier & Kooij (ICLR 2023): one conv layer
    compressed at a time over layer x method x keep x run; Kendall τ between each error (weights
    and features: absolute, relative, scaled; plus Fisher-weighted, calibration output error and
    SVD risk) and the test error before and after fine-tuning. Writes trials.jsonl (resumable),
    rows.json, tau.json, tau.md and scatter.png."""
    from tensorslim.report import rich_table
    from tensorslim.study.error_report import tau_rows
    from tensorslim.study.errors import ErrorStudyConfig, run_error_study

    if workers is not None and workers < 0:
        raise TensorSlimError(f"--workers must be >= 0; got {workers}")
    use_ray = ray or ray_address is not None
    if use_ray and workers == 0:
        raise TensorSlimError("--workers 0 runs in this process; it cannot be combined with --ray")
    config = ErrorStudyConfig(
        model=model_arg,
        layers=tuple(_names(layers, "--layers")) if layers is not None else None,
        methods=tuple(_names(methods, "--methods")),
        keeps=tuple(_fractions(keep, "--keep")),
        runs=runs,
        finetune_epochs=finetune_epochs,
        finetune_samples=finetune_samples,
        finetune_lr=finetune_lr,
        feature_samples=feature_samples,
        calibration_samples=calibration_samples,
        test_samples=test_samples,
    ).check()
    executor = "ray" if use_ray else ("serial" if workers == 0 else "process")
    study = run_error_study(
        config,
        out,
        executor=executor,
        workers=None if workers == 0 else workers,
        threads=threads,
        ray_address=ray_address,
        progress=True,
    )
    console.print(
        rich_table(
            tau_rows(study.taus),
            title=f"{model_arg}: Kendall τ with the test error, before → after fine-tuning "
            f"(mean ± std over {config.runs} run(s))",
        )
    )
    console.print(
        f"{len(study.rows)} trials ({study.ran} run now, {study.reused} from {study.files['trials']}); "
        f"layers {', '.join(study.layers)}",
        highlight=False,
    )
    console.print(
        f"Results: {study.files['tau_md']}, {study.files['tau_json']}, {study.files['rows']}; "
        f"plot: {study.files['scatter']}",
        highlight=False,
    )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
