"""nn.Modules tensorslim builds. Every one inherits the `Compressed` marker (layer search never
looks inside it) and reports the weights it computes with: `dense_weight()` (one matrix or kernel)
or `dense_matrices()` (several, by name). Factorized layers also have `to_dense()` and a `rank`."""

from tensorslim.layers.additive import Compressed, OpConv, OpLinear, SumOp
from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.lowrank_linear import LowRankLinear, factors_of, linear_from_op
from tensorslim.layers.lowrank_rnn import LowRankGRU, LowRankLSTM, LowRankRNN, rnn_matrices
from tensorslim.layers.routed_mha import RoutedMultiheadAttention
from tensorslim.layers.tensor_conv import (
    TENSOR_CONVS,
    ConvGeometry,
    CPConv,
    FactorizedConv,
    SpatialSVDConv,
    TTConv,
    Tucker2Conv,
)

__all__ = [
    "TENSOR_CONVS",
    "CPConv",
    "Compressed",
    "ConvGeometry",
    "FactorizedConv",
    "LowRankConv",
    "LowRankGRU",
    "LowRankLSTM",
    "LowRankLinear",
    "LowRankRNN",
    "OpConv",
    "OpLinear",
    "RoutedMultiheadAttention",
    "SpatialSVDConv",
    "SumOp",
    "TTConv",
    "Tucker2Conv",
    "factors_of",
    "linear_from_op",
    "rnn_matrices",
]
