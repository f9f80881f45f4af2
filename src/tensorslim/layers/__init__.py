"""nn.Modules built from factors. Each has `from_dense`, `to_dense()` and a `rank`."""

from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.lowrank_linear import LowRankLinear
from tensorslim.layers.lowrank_rnn import LowRankGRU, LowRankLSTM, LowRankRNN
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
    "ConvGeometry",
    "FactorizedConv",
    "LowRankConv",
    "LowRankLinear",
    "LowRankGRU",
    "LowRankLSTM",
    "LowRankRNN",
    "SpatialSVDConv",
    "TTConv",
    "Tucker2Conv",
]
