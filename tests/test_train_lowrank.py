import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tensorslim.core.handler import Handler, handler_for
from tensorslim.errors import TensorSlimError
from tensorslim.train.lowrank import (
    Adaptations,
    MatrixLayout,
    fit_lowrank,
    hard_lowrank_,
    lowrank_matrices,
    nuclear_norm,
    ramp,
)


@given(
    st.floats(0, 50),
    st.floats(0, 50),
    st.floats(0, 100),
    st.floats(0, 100),
)
def test_ramp_is_a_monotone_clamp(a, width, e1, e2):
    b = a + width
    lo, hi = sorted((e1, e2))
    assert 0.0 <= ramp(lo, a, b) <= ramp(hi, a, b) <= 1.0
    if lo < a:
        assert ramp(lo, a, b) == 0.0
    if hi >= b:
        assert ramp(hi, a, b) == 1.0


def test_ramp_values():
    assert [ramp(e, 5, 25) for e in (0, 4, 5, 15, 25, 40)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]


class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.head(torch.cat([h[0], h[1]], -1))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, 4, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, :, 1].sum(1) > 1).long()
    return x, y


def test_matrices_and_nuclear_norm():
    model = Clf()
    mats = lowrank_matrices(model)
    assert list(mats) == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l0_reverse",
        "rnn.weight_hh_l0_reverse",
    ]
    assert "head.weight" in lowrank_matrices(model, (nn.GRU, nn.Linear))
    expected = sum(torch.linalg.svdvals(w).sum() for w in mats.values())
    nn_ = nuclear_norm(mats)
    torch.testing.assert_close(nn_, expected)
    nn_.backward()
    assert model.rnn.weight_hh_l0.grad.abs().sum() > 0


def test_hard_lowrank_truncates_in_place():
    model = Clf()
    mats = lowrank_matrices(model)
    errs = hard_lowrank_(mats, 3)
    assert set(errs) == set(mats) and all(0 < e < 1 for e in errs.values())
    for w in mats.values():
        assert torch.linalg.matrix_rank(w.detach()) <= 3
    again = hard_lowrank_(mats, 3)  # already rank 3: nothing left to cut
    assert max(again.values()) < 1e-5
    with pytest.raises(TensorSlimError):
        hard_lowrank_(mats, 0)


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), "reshape"),
    "conv2d": (lambda: nn.Conv2d(3, 6, (3, 2)), "reshape"),
    "hf_conv1d": (lambda: _hf_conv1d(9, 4), "transpose"),
    "mha": (lambda: nn.MultiheadAttention(8, 2), "reshape"),
    "lstm": (lambda: nn.LSTM(5, 6, num_layers=2), "reshape"),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_matrix_layout_reads_and_writes_each_handler_matrix(kind):
    make, view = LAYERS[kind]
    torch.manual_seed(0)
    module = make()
    handler = handler_for(module)
    params = handler.weight_parameters(module)
    for part, expected in handler.matrices(module).items():
        layout = MatrixLayout.of(handler, module, part)
        assert layout.view == view
        torch.testing.assert_close(layout.matrix(params[part].detach()), expected, rtol=0, atol=0)
        new = torch.randn(expected.shape)
        layout.write_(params[part], new)
        torch.testing.assert_close(handler.matrices(module)[part], new, rtol=0, atol=0)


def test_matrix_layout_gathers_any_rearrangement_and_refuses_anything_else():
    class Flipped(Handler):  # W is the parameter's rows reversed: neither reshape nor transpose
        def matrices(self, module):
            return {"": module.weight.detach().flip(0)}

        def grad_matrix(self, module, part, grad):
            return grad.flip(0)

    class Summed(Flipped):  # not a rearrangement of the entries
        def grad_matrix(self, module, part, grad):
            return grad + grad.flip(0)

    layer = nn.Linear(4, 3)
    layout = MatrixLayout.of(Flipped(), layer, "")
    assert layout.view == "gather"
    torch.testing.assert_close(layout.matrix(layer.weight.detach()), layer.weight.detach().flip(0))
    new = torch.randn(3, 4)
    layout.write_(layer.weight, new)
    torch.testing.assert_close(layer.weight.detach(), new.flip(0), rtol=0, atol=0)
    with pytest.raises(TensorSlimError, match="rearrangement"):
        MatrixLayout.of(Summed(), layer, "")


@pytest.mark.parametrize("kind", ["conv2d", "hf_conv1d", "mha"])
def test_hard_lowrank_caps_the_rank_of_the_handler_matrix(kind):
    torch.manual_seed(0)
    module = LAYERS[kind][0]()
    model = nn.Sequential(module)
    mats = lowrank_matrices(model, (type(module),))
    before = {k: w.detach().clone() for k, w in mats.items()}
    handler = handler_for(module)
    expected = sum(torch.linalg.svdvals(w).sum() for w in handler.matrices(module).values())
    torch.testing.assert_close(nuclear_norm(mats).detach(), expected)
    errs = hard_lowrank_(mats, 2)
    assert set(errs) == set(mats) and all(0 < e < 1 for e in errs.values())
    for w in handler.matrices(module).values():
        assert torch.linalg.matrix_rank(w, rtol=1e-5) <= 2
    for k, w in mats.items():  # the error is that of the handler matrix's truncation
        layout = mats.layouts[k]
        old = layout.matrix(before[k]).double()
        s = torch.linalg.svdvals(old)
        assert errs[k] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
        assert w.shape == before[k].shape


def test_nuclear_regularization_lowers_the_nuclear_norm_and_hard_steps_cap_rank():
    x, y = _data()
    runs = {}
    for key, ad in {
        "plain": None,
        "nuclear": Adaptations(nuclear=(3e-2, 1, 3)),
        "hard": Adaptations(hard=(3, 2)),
    }.items():
        torch.manual_seed(0)
        model = Clf()
        hist = fit_lowrank(model, x, y, adaptations=ad, epochs=6, batch_size=32, lr=1e-2)
        runs[key] = (model, hist)
    plain, nuc = (nuclear_norm(lowrank_matrices(runs[k][0])).item() for k in ("plain", "nuclear"))
    assert nuc < 0.9 * plain
    assert [r["c"] for r in runs["nuclear"][1]] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    hard_model, hard_hist = runs["hard"]
    assert "hard_rel_error" in hard_hist[2] and "hard_rel_error" not in hard_hist[3]
    for w in lowrank_matrices(hard_model).values():  # the last epoch (6) ended with a hard step
        assert torch.linalg.matrix_rank(w.detach(), rtol=1e-5) <= 2
    assert all(r["loss"] == r["loss"] for r in hard_hist)  # finite, training still runs


def test_fit_calls_on_epoch_after_every_epoch_and_keeps_training_mode():
    from tensorslim.train import fit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    seen = []

    def record(epoch, m):
        seen.append((epoch, m.training))
        m.eval()  # the callback may evaluate; fit must resume training mode

    losses = fit(model, x, y, epochs=3, lr=1e-2, on_epoch=record)
    assert [e for e, _ in seen] == [1, 2, 3] and all(t for _, t in seen)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not model.training
