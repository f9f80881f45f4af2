"""tensorslim: make trained PyTorch networks smaller and faster with low-rank and tensor
decompositions, and show honestly what that cost."""

import tensorslim.compressors  # noqa: F401  (registers the built-in compressors)
import tensorslim.handlers  # noqa: F401  (registers the built-in layer handlers)
from tensorslim import lc  # the learning-compression algorithm (tensorslim.lc.compress)
from tensorslim._version import __version__
from tensorslim.api import analyze, apply_plan, compress
from tensorslim.core import (
    Component,
    Compressor,
    Cost,
    Handler,
    register_compressor,
    register_handler,
)
from tensorslim.errors import TensorSlimError
from tensorslim.io import export_onnx, load, save
from tensorslim.plan import LayerPlan, Plan
from tensorslim.search.rank_tuning import RankTuningResult, rank_tuning
from tensorslim.search.timing import measure_latency
from tensorslim.train.distill import RecoverResult, recover


def register(module_type, handler) -> None:
    """Handle layers of `module_type` (a class, or a qualified class name) with `handler` (a
    tensorslim.Handler subclass or instance); the function form of @register_handler."""
    cls = handler if isinstance(handler, type) else type(handler)
    register_handler(module_type)(cls)


__all__ = [
    "Component",
    "Compressor",
    "Cost",
    "Handler",
    "LayerPlan",
    "Plan",
    "RankTuningResult",
    "RecoverResult",
    "TensorSlimError",
    "__version__",
    "analyze",
    "apply_plan",
    "compress",
    "export_onnx",
    "lc",
    "load",
    "measure_latency",
    "rank_tuning",
    "recover",
    "register",
    "register_compressor",
    "register_handler",
    "save",
]
