"""tensorslim: make trained PyTorch networks smaller and faster with low-rank and tensor
decompositions, and show honestly what that cost."""

from tensorslim._version import __version__
from tensorslim.api import analyze, apply_plan, compress
from tensorslim.errors import TensorSlimError
from tensorslim.io import export_onnx, load, save
from tensorslim.model import measure_latency, register
from tensorslim.plan import LayerPlan, Plan
from tensorslim.plan.rank_tuning import RankTuningResult, rank_tuning

__all__ = [
    "LayerPlan",
    "Plan",
    "RankTuningResult",
    "TensorSlimError",
    "__version__",
    "analyze",
    "apply_plan",
    "compress",
    "export_onnx",
    "load",
    "measure_latency",
    "rank_tuning",
    "register",
    "save",
]
