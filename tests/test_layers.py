import pytest
import torch
from torch import nn

from tensorslim.layers import (
    Compressed,
    LowRankConv,
    LowRankGRU,
    LowRankLinear,
    OpConv,
    OpLinear,
    RoutedMultiheadAttention,
    SumOp,
    factors_of,
    linear_from_op,
)


def _full(m, n):
    return min(m, n)


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_full_rank_matches_dense(bias):
    lin = nn.Linear(20, 12, bias=bias).double()
    low = LowRankLinear.from_dense(lin, _full(12, 20))
    x = torch.randn(5, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(low(x), lin(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(low.to_dense()(x), lin(x), rtol=1e-10, atol=1e-10)


def test_lowrank_linear_truncated_equals_reconstructed_dense_and_counts_params():
    lin = nn.Linear(64, 48)
    low = LowRankLinear.from_dense(lin, 7)
    x = torch.randn(9, 64)
    ref = nn.functional.linear(x, low.dense_weight(), lin.bias)
    torch.testing.assert_close(low(x), ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in low.parameters()) == 7 * (64 + 48) + 48


CONV_CASES = [
    (nn.Conv2d, dict(in_channels=6, out_channels=10, kernel_size=3, padding=1)),
    (
        nn.Conv2d,
        dict(
            in_channels=4,
            out_channels=8,
            kernel_size=(3, 5),
            stride=2,
            padding=(1, 2),
            dilation=(2, 1),
        ),
    ),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=3, bias=False, padding="same")),
    (
        nn.Conv2d,
        dict(in_channels=3, out_channels=7, kernel_size=3, padding=1, padding_mode="reflect"),
    ),
    (
        nn.Conv1d,
        dict(in_channels=5, out_channels=9, kernel_size=4, stride=2, padding=3, dilation=2),
    ),
    (nn.Conv3d, dict(in_channels=3, out_channels=6, kernel_size=(2, 3, 3), padding=1)),
]

SPATIAL = {nn.Conv1d: (17,), nn.Conv2d: (11, 13), nn.Conv3d: (5, 6, 7)}


@pytest.mark.parametrize("conv_type, kwargs", CONV_CASES)
def test_lowrank_conv_full_rank_matches_dense(conv_type, kwargs):
    conv = conv_type(**kwargs).double()
    m = conv.weight.shape[0]
    n = conv.weight[0].numel()
    low = LowRankConv.from_dense(conv, min(m, n))
    shape = (2, kwargs["in_channels"]) + SPATIAL[conv_type]
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(low(x), conv(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(low.to_dense()(x), conv(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv_type, kwargs", CONV_CASES)
def test_lowrank_conv_truncated_equals_conv_with_reconstructed_kernel(conv_type, kwargs):
    conv = conv_type(**kwargs).double()
    low = LowRankConv.from_dense(conv, 2)
    dense = low.to_dense()
    torch.testing.assert_close(dense.weight, low.dense_weight())
    shape = (3, kwargs["in_channels"]) + SPATIAL[conv_type]
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-9, atol=1e-9)
    k = conv.weight[0, 0].numel()
    expected = 2 * (kwargs["in_channels"] * k + kwargs["out_channels"])
    expected += kwargs["out_channels"] if kwargs.get("bias", True) else 0
    assert sum(p.numel() for p in low.parameters()) == expected


def test_grouped_conv_refused_by_layer():
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv.from_dense(nn.Conv2d(4, 4, 3, groups=2), 1)


def test_zero_rank_refused():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 0)


@pytest.mark.parametrize("conv_type, kwargs", CONV_CASES)
def test_lowrank_conv_from_factors_equals_from_dense(conv_type, kwargs):
    conv = conv_type(**kwargs).double()
    low = LowRankConv.from_dense(conv, 2)
    a = low.second.weight.reshape(conv.out_channels, 2)
    b = low.first.weight.reshape(2, -1)
    again = LowRankConv.from_factors(a, b, conv)
    assert again.state_dict().keys() == low.state_dict().keys()
    for k, v in low.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
    shape = (2, kwargs["in_channels"]) + SPATIAL[conv_type]
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(again(x), low(x))


def test_linear_from_op_keeps_factors_and_bias():
    lin = nn.Linear(8, 6)
    op = LowRankLinear(8, 6, 3, bias=False)
    a, b = factors_of(op)
    assert a.shape == (6, 3) and b.shape == (3, 8)
    assert factors_of(LowRankLinear(8, 6, 3)) is None  # has a bias: not an operator
    assert factors_of(nn.Linear(8, 6)) is None
    new = linear_from_op(op, lin.bias, 8, 6)
    assert isinstance(new, LowRankLinear) and new.state_dict().keys() == {
        "first.weight",
        "second.weight",
        "second.bias",
    }
    x = torch.randn(4, 8)
    torch.testing.assert_close(new(x), op(x) + lin.bias)
    generic = linear_from_op(SumOp([op, LowRankLinear(8, 6, 1, bias=False)]), None, 8, 6)
    assert isinstance(generic, OpLinear) and generic.bias is None
    torch.testing.assert_close(generic.dense_weight(), generic.op.dense_weight())


def test_op_conv_with_reflect_padding_matches_the_conv():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", stride=2).double()
    w = conv.weight.detach().reshape(5, -1)
    op = LowRankLinear(w.shape[1], 5, 5, bias=False).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    with torch.no_grad():
        op.first.weight.copy_(vh)
        op.second.weight.copy_(u * s)
    new = OpConv(op, conv)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(new(x), conv(x))


def test_every_built_layer_is_marked_compressed():
    mha = nn.MultiheadAttention(8, 2)
    built = [
        LowRankLinear(4, 4, 2),
        LowRankConv.from_dense(nn.Conv2d(3, 4, 3), 2),
        LowRankGRU(nn.GRU(3, 4), {"weight_hh_l0": 2}),
        RoutedMultiheadAttention.from_dense(mha),
        OpLinear(LowRankLinear(4, 4, 2, bias=False), None, 4, 4),
    ]
    assert all(isinstance(m, Compressed) for m in built)
    mats = RoutedMultiheadAttention.from_dense(mha).dense_matrices()
    torch.testing.assert_close(mats["in_proj"], mha.in_proj_weight)
    torch.testing.assert_close(mats["out_proj"], mha.out_proj.weight)
