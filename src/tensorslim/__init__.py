"""tensorslim: make trained PyTorch networks smaller and faster with low-rank and tensor
decompositions, and show honestly what that cost."""

__version__ = "0.1.0"

from tensorslim.api import analyze, apply_plan, compress  # noqa: E402
from tensorslim.errors import TensorSlimError  # noqa: E402
from tensorslim.io import export_onnx, load, save  # noqa: E402
from tensorslim.model import measure_latency, register  # noqa: E402
from tensorslim.plan import LayerPlan, Plan  # noqa: E402
from tensorslim.plan.rank_tuning import RankTuningResult, rank_tuning  # noqa: E402

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
