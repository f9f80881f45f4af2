"""CPConv, Tucker2Conv, TTConv, SpatialSVDConv: outputs, parameter counts, geometry, exactness."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.decompose import tensor as T
from tensorslim.layers import Compressed, CPConv, SpatialSVDConv, TTConv, Tucker2Conv

GEOMETRIES_2D = [
    {"kernel_size": 3, "stride": 1, "padding": 1},
    {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "bias": False},
    {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
    {"kernel_size": (5, 3), "padding": "same", "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "stride": (1, 2)},
]
GEOMETRIES_1D = [
    {"kernel_size": 5, "stride": 2, "padding": 2},
    {"kernel_size": 3, "dilation": 3, "padding": "same", "bias": False},
]


def rank_for(cls, shape, keep=0.4):
    if cls is CPConv:
        return T.cp_rank_for_keep(shape, keep)
    if cls is Tucker2Conv:
        return T.tucker2_ranks_for_keep(shape, keep)
    if cls is TTConv:
        return T.tt_ranks_for_keep(shape, keep)
    return T.spatial_svd_rank_for_keep(shape, keep)


def params_formula(cls, shape, rank):
    return {
        CPConv: T.cp_params,
        Tucker2Conv: T.tucker2_params,
        TTConv: T.tt_params,
        SpatialSVDConv: T.spatial_svd_params,
    }[cls](shape, rank)


def dense_conv(dims, geometry, cin=6, cout=10):
    torch.manual_seed(0)
    return (nn.Conv2d if dims == 2 else nn.Conv1d)(cin, cout, **geometry).eval()


def functional(dims, conv, weight, x):
    """The dense conv's geometry with another kernel (padding modes handled by F.pad)."""
    if conv.padding_mode != "zeros":
        pads = [p for p in reversed(conv._reversed_padding_repeated_twice)]
        x = F.pad(x, list(reversed(pads)), mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    fn = F.conv2d if dims == 2 else F.conv1d
    return fn(x, weight, conv.bias, conv.stride, padding, conv.dilation)


CASES = [
    (2, g, cls)
    for g, cls in itertools.product(GEOMETRIES_2D, [CPConv, Tucker2Conv, TTConv, SpatialSVDConv])
]
CASES += [(1, g, cls) for g, cls in itertools.product(GEOMETRIES_1D, [CPConv, Tucker2Conv, TTConv])]


@pytest.mark.parametrize(("dims", "geometry", "cls"), CASES)
def test_chain_equals_conv_with_reconstructed_kernel(dims, geometry, cls):
    conv = dense_conv(dims, geometry)
    shape = tuple(conv.weight.shape)
    rank = rank_for(cls, shape)
    layer = cls.from_dense(conv, rank)
    x = torch.randn(2, 6, *([13, 11] if dims == 2 else [29]))
    with torch.no_grad():
        want = functional(dims, conv, layer.dense_weight(), x)
        got = layer(x)
        assert got.shape == conv(x).shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.to_dense()(x), got, rtol=1e-4, atol=1e-5)
    bias = 0 if conv.bias is None else conv.bias.numel()
    assert sum(p.numel() for p in layer.parameters()) == params_formula(cls, shape, rank) + bias
    assert all(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in layer.children())
    assert isinstance(layer, Compressed)  # layer search never looks inside the chain
    empty = cls.empty_like(conv, layer.rank)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()
    }


@pytest.mark.parametrize("cls", [Tucker2Conv, TTConv, SpatialSVDConv])
def test_full_rank_chain_reproduces_the_dense_conv(cls):
    conv = dense_conv(2, {"kernel_size": 3, "stride": 2, "padding": 1})
    shape = tuple(conv.weight.shape)
    full = {
        Tucker2Conv: T.tucker2_full_ranks(shape),
        TTConv: T.tt_full_ranks(shape),
        SpatialSVDConv: min(6 * 3, 10 * 3),
    }[cls]
    layer = cls.from_dense(conv, full)
    x = torch.randn(3, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)


def test_cp_chain_reproduces_a_cp_rank_kernel():
    conv = dense_conv(2, {"kernel_size": 3, "padding": 1})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(T.cp_reconstruct([torch.randn(n, 3, generator=g) for n in (10, 6, 3, 3)]))
    layer = CPConv.from_dense(conv, 3, n_iter_max=500, tol=1e-10, init="svd")
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        want = conv(x)
        assert torch.linalg.norm(layer(x) - want) / torch.linalg.norm(want) < 5e-3
    assert layer.decomposition_info["iterations"] <= 500


def test_cp_layer_is_depthwise_in_the_middle():
    conv = dense_conv(2, {"kernel_size": 3})
    layer = CPConv.from_dense(conv, 4)
    assert layer.vertical.groups == 4 and layer.horizontal.groups == 4
    assert layer.vertical.kernel_size == (3, 1) and layer.horizontal.kernel_size == (1, 3)


def test_grouped_conv_is_refused():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        Tucker2Conv.from_dense(conv, (2, 2))


def test_onnx_export_uses_stock_ops(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    conv = dense_conv(2, {"kernel_size": 3, "padding": 1, "stride": 2})
    layer = CPConv.from_dense(conv, 5).eval()
    path = tmp_path / "cp.onnx"
    torch.onnx.export(layer, (torch.randn(1, 6, 8, 8),), str(path), dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops == {"Conv"}
