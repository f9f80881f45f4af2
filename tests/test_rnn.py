import itertools

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.layers import LowRankGRU, LowRankLSTM, LowRankRNN
from tensorslim.layers.lowrank_rnn import choose_impl, rnn_matrices


def _full_ranks(m):
    return {n: min(getattr(m, n).shape) for n in rnn_matrices(m)}


def _assert_same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, nn.utils.rnn.PackedSequence):
        torch.testing.assert_close(a.data, b.data, rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


CASES = list(itertools.product([nn.GRU, nn.LSTM], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("cls, layers, bidir, batch_first", CASES)
@pytest.mark.parametrize("impl", ["fused", "lowrank"])
def test_full_rank_reproduces_outputs_and_final_states(cls, layers, bidir, batch_first, impl):
    torch.manual_seed(0)
    m = cls(5, 7, num_layers=layers, bidirectional=bidir, batch_first=batch_first).double()
    low = LowRankRNN.from_dense(m, _full_ranks(m), impl)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _assert_same(low(x), m(x))
    d = 2 if bidir else 1
    h0 = torch.randn(layers * d, 3 if batch_first else 4, 7, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    _assert_same(low(x, hx), m(x, hx))
    # unbatched input
    xu = torch.randn(6, 5, dtype=torch.float64)
    _assert_same(low(xu), m(xu))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_packed_sequences_and_dense_roundtrip(cls):
    torch.manual_seed(0)
    m = cls(4, 6, num_layers=2, bidirectional=True, batch_first=True).double()
    low = LowRankRNN.from_dense(m, _full_ranks(m), impl="lowrank")
    assert isinstance(low, LowRankLSTM if cls is nn.LSTM else LowRankGRU)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], batch_first=True, enforce_sorted=False)
    _assert_same(low(packed), m(packed))
    _assert_same(low.to_dense()(x), m(x))


def test_truncated_equals_module_with_reconstructed_weights_and_trains():
    torch.manual_seed(0)
    m = nn.GRU(8, 16, num_layers=2, bidirectional=True)
    ranks = {n: 3 for n in rnn_matrices(m)}
    ranks["weight_ih_l0"] = None
    fused = LowRankRNN.from_dense(m, ranks)
    loop = LowRankRNN.from_dense(m, ranks, impl="lowrank")
    x = torch.randn(5, 2, 8)
    ref = fused.to_dense()
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loop(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    n_params = sum(p.numel() for p in fused.parameters())
    expected = sum(p.numel() for p in m.parameters())
    for name in rnn_matrices(m):
        if ranks[name] is not None:
            w = getattr(m, name)
            expected -= w.numel() - 3 * sum(w.shape)
    assert n_params == expected
    fused(x)[0].sum().backward()
    assert fused.weight_hh_l1_u.grad is not None and fused.weight_ih_l0.grad is not None
    loop(x)[0].sum().backward()  # the scripted recurrence is differentiable, same gradients
    torch.testing.assert_close(loop.weight_hh_l1_u.grad, fused.weight_hh_l1_u.grad)
    torch.testing.assert_close(loop.weight_ih_l0.grad, fused.weight_ih_l0.grad)


def test_auto_impl_computes_with_factors_only_where_it_pays():
    big = nn.GRU(8, 256)
    small = nn.GRU(8, 32)
    low = {"weight_ih_l0": 4, "weight_hh_l0": 16}
    assert choose_impl(big, low) == "lowrank"
    assert choose_impl(big, {"weight_ih_l0": 4, "weight_hh_l0": 200}) == "fused"  # no saving
    assert choose_impl(small, {n: 2 for n in rnn_matrices(small)}) == "fused"  # overhead-bound
    assert LowRankRNN.from_dense(big, low).impl == "lowrank"
    with pytest.raises(TypeError):
        LowRankGRU(nn.LSTM(2, 3), {})


class Tagger(nn.Module):
    """A recurrent model the library has never seen."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(1, 48, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(96, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h, _ = self.rnn(x)
        h, _ = self.gru(h)
        return self.head(h)


@pytest.mark.parametrize("allocator", ["uniform", "global"])
def test_compress_unseen_recurrent_model(tmp_path, allocator):
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(2, 9, 1)
    small, plan = tensorslim.compress(model, 0.4, allocator=allocator, example_input=x)
    assert abs(plan.achieved_keep - 0.4) <= 0.02
    rnn = plan.layer("rnn")
    assert rnn.factorized and rnn.rank["weight_ih_l0"] is None  # input size 1: never gains
    assert isinstance(small.rnn, LowRankLSTM)
    assert rnn.extra["dense_matrices"] == {
        n: "too small to gain: no rank r gives r(m+n) < mn"
        for n in ("weight_ih_l0", "weight_ih_l0_reverse")
    }
    assert sum(p.numel() for p in small.rnn.parameters()) == rnn.params_after
    assert small(x).shape == (2, 9, 5)
    tensorslim.save(small, plan, tmp_path / "out")
    restored = tensorslim.load(Tagger(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))


def test_rnn_proposals_are_a_monotone_path_per_matrix():
    """Each gate matrix is its own allocation unit: its proposals cost more and lose less as the
    rank rises, and every one is cheaper than the dense matrix."""
    from tensorslim.core import LayerSite, get_compressor, handler_for
    from tensorslim.core.cost import dense_cost, matrix_targets

    m = nn.GRU(10, 20, num_layers=2)
    targets = matrix_targets(m, handler_for(m), LayerSite(""))
    assert sorted(targets) == sorted(n for n, _ in m.named_parameters() if n.startswith("weight"))
    for target in targets.values():
        opts = get_compressor("svd").proposals(target)
        assert all(o.cost.params < dense_cost(target).params for o in opts)
        assert all(a.cost.params < b.cost.params for a, b in zip(opts, opts[1:]))
        assert all(a.error >= b.error - 1e-12 for a, b in zip(opts, opts[1:]))


def test_rnn_global_allocation_loses_less_with_more_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(10, 20, num_layers=2))
    errs = []
    for keep in (0.3, 0.5, 0.7, 0.9):
        _, plan = tensorslim.compress(model, keep)
        assert plan.achieved_keep <= keep + 0.02
        errs.append(plan.layer("0").rel_error)
    assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:]))
