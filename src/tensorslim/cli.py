"""The command line: a thin face over the Python API. User mistakes print one line and exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

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


def user_errors(fn):
    """Turn TensorSlimError into a one-line message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TensorSlimError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise TensorSlimError(f"--input-shape must look like 1,3,32,32; got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise TensorSlimError(f"--input-shape needs positive sizes; got {text!r}")
    return shape


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
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return model.eval(), example, spec


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
            title="digits-cnn compressed with SVD (test set of 450 images; latency: batch 256, "
            f"{torch.get_num_threads()} CPU threads, median)",
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
    keep: float = typer.Option(0.5, "--keep", "-k", help="Fraction of the compressible cost kept."),
    cost: str = typer.Option("params", help="Budget unit: params or flops."),
    method: str = typer.Option("svd", help="Decomposition method."),
    allocator: str = typer.Option("global", help="global or uniform."),
    include: list[str] | None = typer.Option(None, help="Only layers matching this pattern."),
    exclude: list[str] | None = typer.Option(None, help="Skip layers matching this pattern."),
    input_shape: str | None = SHAPE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
) -> None:
    """Compress a model to a budget and save plan.json + model.safetensors."""
    from tensorslim.api import compress
    from tensorslim.io import save

    net, example, spec = resolve_model(model or model_arg, weights, trust_pickle, input_shape)
    small, plan = compress(
        net,
        keep,
        cost=cost,
        method=method,
        allocator=allocator,
        example_input=example,
        include=include or None,
        exclude=exclude or None,
        progress=True,
    )
    plan.meta["model_spec"] = spec if not Path(spec).is_file() else None
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
    from tensorslim.plan.table import human
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
        help="The original architecture (zoo name or factory spec); "
        "default: the one recorded in the plan.",
    ),
    input_shape: str | None = SHAPE_OPT,
    check: bool = typer.Option(True, help="Compare onnxruntime's output with PyTorch's."),
) -> None:
    """Export a compressed model folder to ONNX (checked against PyTorch with onnxruntime)."""
    from tensorslim.io import PLAN_FILE, export_onnx, load
    from tensorslim.plan import Plan

    plan = Plan.from_json(folder / PLAN_FILE)
    spec = model or plan.meta.get("model_spec")
    if not spec:
        raise TensorSlimError("the plan does not record the model; pass --model")
    base, example, _ = resolve_model(spec, None, False, input_shape, progress=False)
    if example is None and plan.meta.get("example_input_shape"):
        example = torch.randn(*plan.meta["example_input_shape"])
    if example is None:
        raise TensorSlimError("pass --input-shape to trace the model for ONNX")
    small = load(base, folder).eval()
    export_onnx(small, example, onnx)
    console.print(f"Wrote {onnx}")
    if check:
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
        with torch.no_grad():
            want = small(example).numpy()
        console.print(f"onnxruntime vs PyTorch: max abs difference {np.abs(got - want).max():.3g}")


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

    def numbers(text: str, kind=float) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise TensorSlimError(f"expected comma-separated numbers, got {text!r}") from None

    retains = numbers(retain)
    if any(not 0 < r <= 1 for r in retains):
        raise TensorSlimError(f"--retain values must be in (0, 1]; got {retain!r}")
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
            chis=numbers(chi, int),
            mps_fractions=numbers(mps),
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
