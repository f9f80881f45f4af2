"""Calibration statistics (calibrate/): Gram matrices, Fisher diagonal, samples, feature errors."""

import pytest
import torch
from torch import nn

from tensorslim.calibrate import LayerStats, calibrate, feature_errors
from tensorslim.decompose import output_error
from tensorslim.errors import ExampleInputError, TensorSlimError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_gram_is_x_transpose_x_of_layer_inputs_over_all_batches():
    model = _mlp()
    xs = [torch.randn(5, 6), torch.randn(7, 6), torch.randn(2, 4, 6)]  # extra leading dims too
    stats = calibrate(model, {"0": model[0], "2": model[2]}, xs)
    rows0 = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert torch.allclose(stats["0"].gram, rows0.T @ rows0)
    assert stats["0"].rows == 5 + 7 + 8
    with torch.no_grad():
        h = torch.cat([torch.relu(model[0](x)).reshape(-1, 8) for x in xs]).double()
    assert torch.allclose(stats["2"].gram, h.T @ h, atol=1e-10)
    assert torch.allclose(stats["2"].covariance, h.T @ h / h.shape[0], atol=1e-12)
    assert stats["0"].fisher is None


def test_fisher_is_mean_squared_gradient_and_grads_untouched():
    model = _mlp()
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]

    def loss(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    model[2].weight.requires_grad_(False)  # frozen weights still get a Fisher estimate
    wrapped = _Wrap(model)  # takes (x, y) tuples as positional inputs for the Gram pass
    stats = calibrate(
        wrapped, {"0": model[0], "2": model[2]}, data, loss=lambda m, b: loss(m.net, b)
    )
    expect0 = torch.zeros(8, 6, dtype=torch.float64)
    expect2 = torch.zeros(3, 8, dtype=torch.float64)
    for x, y in data:
        w0 = model[0].weight.detach().clone().requires_grad_(True)
        w2 = model[2].weight.detach().clone().requires_grad_(True)
        h = torch.relu(nn.functional.linear(x, w0, model[0].bias))
        out = nn.functional.linear(h, w2, model[2].bias)
        g0, g2 = torch.autograd.grad(nn.functional.cross_entropy(out, y), [w0, w2])
        expect0 += g0.double() ** 2
        expect2 += g2.double() ** 2
    assert torch.allclose(stats["0"].fisher, expect0 / 3, rtol=1e-6, atol=1e-12)
    assert torch.allclose(stats["2"].fisher, expect2 / 3, rtol=1e-6, atol=1e-12)
    assert stats["0"].fisher_batches == 3
    assert model[0].weight.grad is None  # .grad fields are not touched
    assert not model[2].weight.requires_grad  # restored


class _Wrap(nn.Module):
    """Takes (x, y) batches as positional inputs; the forward ignores y."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y=None):
        return self.net(x)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(3, 4, (3, 2), padding=(2, 1), dilation=(2, 1)),
        nn.Conv1d(4, 6, 5, stride=2, padding=3, dilation=2),
    ],
)
def test_conv_gram_gives_exact_output_error(conv):
    """The unfolded-patch Gram matrix turns any kernel change into the exact output change."""
    conv.eval()
    shape = (2, conv.in_channels, 9, 8) if isinstance(conv, nn.Conv2d) else (2, 4, 17)
    xs = [torch.randn(*shape), torch.randn(*shape)]
    stats = calibrate(conv, {"c": conv}, xs)
    w = conv.weight.detach().reshape(conv.out_channels, -1).double()
    delta = torch.randn_like(w) * 0.1
    w_hat = w + delta
    other = type(conv)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=False,
    ).double()
    direct = 0.0
    with torch.no_grad():
        other.weight.copy_(delta.reshape(conv.weight.shape))
        for x in xs:
            direct += float(other(x.double()).pow(2).sum())
    assert output_error(w, w_hat, stats["c"].gram) == pytest.approx(direct, rel=1e-9)


def test_dict_batches_samples_and_bounds():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, input_ids, scale=1.0):
            return self.lin(input_ids) * scale

    model = KW()
    batches = ({"input_ids": torch.randn(3, 2, 4), "scale": 2.0} for _ in range(4))
    stats = calibrate(model, {"lin": model.lin}, batches, max_samples=5)
    st = stats["lin"]
    assert st.rows == 4 * 3 * 2
    assert len(st.inputs) == len(st.outputs) == 5
    assert st.inputs[0].shape == (1, 2, 4)
    errs = feature_errors(model.lin, st.inputs, st.outputs)
    assert errs["absolute"] == pytest.approx(0.0, abs=1e-6) and errs["samples"] == 5


def test_feature_errors_values():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    x = [torch.ones(1, 3)]
    f = [torch.tensor([[3.0, 4.0]])]
    e = feature_errors(lin, x, f)
    assert e["absolute"] == pytest.approx(5.0)
    assert e["relative"] == pytest.approx(1.0)
    assert e["scaled"] == pytest.approx(2.5)


def test_calibration_refusals():
    model = _mlp()
    with pytest.raises(TensorSlimError, match="empty"):
        calibrate(model, {"0": model[0]}, [])
    with pytest.raises(ExampleInputError, match="calibration batch 0 \\(counting from 0\\)"):
        calibrate(model, {"0": model[0]}, [torch.randn(2, 5)])
    with pytest.raises(TensorSlimError, match="scalar"):
        calibrate(model, {"0": model[0]}, [torch.randn(2, 6)], loss=lambda m, b: m(b))
    with pytest.raises(TensorSlimError, match="does not know"):
        calibrate(model, {"1": model[1]}, [torch.randn(2, 6)])
    assert isinstance(LayerStats().parts, dict)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def test_attention_parts_gram_and_fisher():
    torch.manual_seed(0)
    model = _Attn().eval()
    xs = [torch.randn(2, 5, 8), torch.randn(3, 4, 8)]
    stats = calibrate(model, {"attn": model.attn}, xs, loss=lambda m, b: m(b).square().mean())
    st = stats["attn"]
    assert st.gram is None and set(st.parts) == {"in_proj", "out_proj"}
    rows = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    # query, key and value are the same rows: their Grams sum to 3 X^T X
    torch.testing.assert_close(st.part("in_proj").gram, 3 * rows.T @ rows)
    assert st.part("in_proj").rows == 3 * rows.shape[0]
    assert st.part("out_proj").rows == rows.shape[0]
    assert st.part("in_proj").fisher.shape == (24, 8)
    assert st.part("out_proj").fisher.shape == (8, 8)


def test_recurrent_layers_get_fisher_and_gram_per_gate_matrix():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4)
    xs = [torch.randn(5, 2, 3)]
    stats = calibrate(gru, {"": gru}, xs, loss=lambda m, b: m(b)[0].sum(), gram=False)
    assert set(stats[""].parts) == {"weight_ih_l0", "weight_hh_l0"}
    assert stats[""].part("weight_hh_l0").fisher.shape == (12, 4)
    # 5 steps x 2 sequences: one input row per step for each gate matrix
    assert calibrate(gru, {"": gru}, xs)[""].part("weight_hh_l0").rows == 10


def test_layers_whose_inputs_cannot_be_unfolded_are_refused_for_gram():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(TensorSlimError, match="grouped convolution"):
        calibrate(conv, {"c": conv}, [torch.randn(1, 4, 6, 6)])
    stats = calibrate(
        conv, {"c": conv}, [torch.randn(1, 4, 6, 6)], loss=lambda m, b: m(b).sum(), gram=False
    )
    assert stats["c"].fisher.shape == (4, 18)


def test_hf_conv1d_fisher_is_shaped_like_its_matrix():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(5, 3)  # in 3, out 5; weight stored (3, 5)
    xs = [torch.randn(2, 4, 3)]
    stats = calibrate(layer, {"c": layer}, xs, loss=lambda m, b: m(b).square().sum())
    assert stats["c"].fisher.shape == (5, 3)
    rows = xs[0].reshape(-1, 3).double()
    torch.testing.assert_close(stats["c"].gram, rows.T @ rows)
