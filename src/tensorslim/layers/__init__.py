"""nn.Modules built from factors. Each has `from_dense`, `to_dense()` and a `rank`."""

from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.lowrank_linear import LowRankLinear

__all__ = ["LowRankConv", "LowRankLinear"]
