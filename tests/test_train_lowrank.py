import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tensorslim.errors import TensorSlimError
from tensorslim.train.lowrank import (
    Adaptations,
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
