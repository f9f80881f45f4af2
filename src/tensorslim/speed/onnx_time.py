"""Deployment speed: an exported ONNX model's latency in ONNX Runtime (CPU execution provider),
and a dense vs compressed comparison timed alternately, as `search.timing` does for PyTorch.

Sessions use ONNX Runtime's default graph optimizations (ORT_ENABLE_ALL: it fuses Conv+BatchNorm
and Conv+activation itself), `intra_op_num_threads` = torch's thread count unless given, one
inter-op thread and sequential execution, so that the two engines are compared on the same cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tensorslim._nested import tensors_in
from tensorslim.errors import ExampleInputError, TensorSlimError
from tensorslim.search.timing import compare_calls


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime InferenceSession on the CPU with `threads` intra-op threads (default: torch's
    current thread count). TensorSlimError if the file is missing or does not load."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # a dependency, but say what is missing if it is not installed
        raise TensorSlimError(
            "timing ONNX models needs onnxruntime (pip install onnxruntime)"
        ) from exc
    path = Path(path)
    if not path.is_file():
        raise TensorSlimError(f"no ONNX file at {str(path)!r}")
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise TensorSlimError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise TensorSlimError(
            f"{str(path)!r} does not load in onnxruntime: {' '.join(str(exc).split())}"
        ) from exc


def onnx_feeds(session: Any, example_input: Any) -> dict[str, Any]:
    """The session's input dict from `example_input` (a tensor, a tuple/list of tensors in the
    graph's input order, or a mapping whose keys are the graph's input names)."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(example_input, Mapping) and set(names) <= set(example_input):
        tensors = [example_input[n] for n in names]
    else:
        tensors = [t for t in tensors_in(example_input) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(names):
        raise ExampleInputError(
            f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}) but the example "
            f"input holds {len(tensors)} tensor(s)"
        )
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise ExampleInputError("bfloat16 inputs cannot be fed to onnxruntime through numpy")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}


def _runner(session: Any, feeds: dict[str, Any]):
    def call():
        return session.run(None, feeds)

    try:
        call()
    except Exception as exc:
        raise ExampleInputError(
            f"onnxruntime cannot run the model on the example input: {' '.join(str(exc).split())}"
        ) from exc
    return call


def onnx_latency(
    path: str | Path,
    example_input: Any,
    *,
    rounds: int = 3,
    threads: int | None = None,
    min_run_time: float = 0.1,
) -> float:
    """Milliseconds per `session.run` of the ONNX file on `example_input`: the best of `rounds`
    medians (torch.utils.benchmark blocked_autorange, each lasting >= `min_run_time` s)."""
    return compare_onnx_files(
        [path], example_input, rounds=rounds, threads=threads, min_run_time=min_run_time
    )[0]


def compare_onnx_files(
    paths: list[str | Path],
    example_input: Any,
    *,
    rounds: int = 3,
    threads: int | None = None,
    min_run_time: float = 0.1,
) -> list[float]:
    """Best-of-`rounds` median ms of each ONNX file on `example_input`, timed alternately."""
    if rounds < 1:
        raise TensorSlimError(f"rounds must be >= 1, got {rounds}")
    calls = []
    for path in paths:
        session = onnx_session(path, threads)
        calls.append(_runner(session, onnx_feeds(session, example_input)))
    return [lat.median_ms for lat in compare_calls(calls, rounds, min_run_time)]


def compare_onnx(
    dense_path: str | Path,
    compressed_path: str | Path,
    example_input: Any,
    *,
    rounds: int = 3,
    threads: int | None = None,
    min_run_time: float = 0.1,
) -> dict[str, Any]:
    """Dense vs compressed ONNX files timed alternately in ONNX Runtime on `example_input`:
    {"dense_ms", "compressed_ms", "speedup" (dense / compressed), "threads", "rounds",
    "input_shapes", "onnxruntime" (version)}."""
    import onnxruntime as ort

    threads = torch.get_num_threads() if threads is None else int(threads)
    dense, small = compare_onnx_files(
        [dense_path, compressed_path],
        example_input,
        rounds=rounds,
        threads=threads,
        min_run_time=min_run_time,
    )
    return {
        "dense_ms": dense,
        "compressed_ms": small,
        "speedup": dense / small if small > 0 else float("inf"),
        "threads": threads,
        "rounds": rounds,
        "input_shapes": [list(t.shape) for t in tensors_in(example_input)],
        "onnxruntime": ort.__version__,
    }
