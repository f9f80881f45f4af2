import pytest
import torch
from torch import nn

from tensorslim.layers import LowRankConv, LowRankLinear


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
