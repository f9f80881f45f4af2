"""The core: specs, the compressor and handler protocols with their registries, targets, cost
models and the one materialize path. Imports only `layers`, `decompose` and `errors`."""

from tensorslim.core.compressor import (
    Compressor,
    Cost,
    NoOptions,
    Proposal,
    compressor_class,
    compressor_kinds,
    get_compressor,
    method_names,
    register_compressor,
    unregister_compressor,
)
from tensorslim.core.cost import COST_MODELS, CostModel, cost_model, dense_cost, layer_dense_cost
from tensorslim.core.handler import (
    Handler,
    handler_for,
    register_handler,
    split_params,
    unregister_handler,
)
from tensorslim.core.materialize import LayerJob, build_layer, check_spec, materialize, spec_cost
from tensorslim.core.objective import OBJECTIVES, objective_error
from tensorslim.core.spec import Component, Spec, legacy_spec, parse_spec, spec_to_json
from tensorslim.core.surgery import get_submodule, replace_at, set_submodule
from tensorslim.core.target import LayerSite, LayerTarget, MatrixTarget

__all__ = [
    "COST_MODELS",
    "OBJECTIVES",
    "Component",
    "Compressor",
    "Cost",
    "CostModel",
    "Handler",
    "LayerJob",
    "LayerSite",
    "LayerTarget",
    "MatrixTarget",
    "NoOptions",
    "Proposal",
    "Spec",
    "build_layer",
    "check_spec",
    "compressor_class",
    "compressor_kinds",
    "cost_model",
    "dense_cost",
    "get_compressor",
    "get_submodule",
    "handler_for",
    "layer_dense_cost",
    "legacy_spec",
    "materialize",
    "method_names",
    "objective_error",
    "parse_spec",
    "register_compressor",
    "register_handler",
    "replace_at",
    "set_submodule",
    "spec_cost",
    "split_params",
    "spec_to_json",
    "unregister_compressor",
    "unregister_handler",
]
