"""Surgery and accounting: compressible layers (a registry by module type), replacement by dotted
name, params and FLOPs per layer and in total, measured latency."""

from tensorslim.model.attention import MHAFactorizer, register_attention
from tensorslim.model.data_aware import OBJECTIVES, register_data_aware, with_objective
from tensorslim.model.factorizers import ConvSVD, LinearSVD, MatrixSVDFactorizer, register_builtin
from tensorslim.model.latency import (
    Latency,
    compare_calls,
    compare_models,
    measure_latency,
    time_call,
)
from tensorslim.model.profile import (
    LayerInfo,
    ModelIndex,
    check_patterns,
    count_params,
    find_layers,
    layer_modules,
    run_model,
    trace_sites,
)
from tensorslim.model.registry import (
    Factorizer,
    LayerSite,
    Option,
    find,
    register,
    registered_methods,
)
from tensorslim.model.surgery import get_submodule, replace_at, set_submodule

register_builtin()

from tensorslim.model.tensor_factorizers import (  # noqa: E402  (registers after the builtins)
    TENSOR_METHODS,
    ConvAuto,
    ConvCP,
    ConvSpatialSVD,
    ConvTT,
    ConvTucker2,
    TensorConvFactorizer,
    register_tensor_methods,
)

register_tensor_methods()
register_data_aware()
register_attention()

from tensorslim.model.rnn_factorizer import RNNSVD, register_rnn  # noqa: E402

register_rnn()

__all__ = [
    "ConvAuto",
    "ConvCP",
    "ConvSVD",
    "ConvSpatialSVD",
    "ConvTT",
    "ConvTucker2",
    "TENSOR_METHODS",
    "TensorConvFactorizer",
    "Factorizer",
    "LayerInfo",
    "LayerSite",
    "ModelIndex",
    "Latency",
    "LinearSVD",
    "MHAFactorizer",
    "MatrixSVDFactorizer",
    "OBJECTIVES",
    "Option",
    "check_patterns",
    "compare_calls",
    "compare_models",
    "count_params",
    "find",
    "find_layers",
    "get_submodule",
    "layer_modules",
    "measure_latency",
    "RNNSVD",
    "register",
    "registered_methods",
    "replace_at",
    "run_model",
    "set_submodule",
    "time_call",
    "trace_sites",
    "with_objective",
]
