"""The calibration view of nn.GRU / nn.LSTM (handlers/rnn.py `rows`) and data-aware compression of
recurrent models: whitened, fwsvd, the feature objective."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import tensorslim
from tensorslim.calibrate import calibrate
from tensorslim.handlers.rnn import RNNHandler
from tensorslim.layers.lowrank_rnn import LowRankRNN, rnn_matrices

CLASSES = [nn.LSTM, nn.GRU]


# -- reference: PyTorch's GRU / LSTM equations, one step at a time --------------------------------
def _step(module, k, sfx, x, h, c):
    """One step of layer k (direction sfx) on one sequence element (vectors)."""
    w_ih, w_hh = getattr(module, f"weight_ih_l{k}{sfx}"), getattr(module, f"weight_hh_l{k}{sfx}")
    gi = w_ih @ x
    gh = w_hh @ h
    if module.bias:
        gi = gi + getattr(module, f"bias_ih_l{k}{sfx}")
        gh = gh + getattr(module, f"bias_hh_l{k}{sfx}")
    if isinstance(module, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size:
            h = getattr(module, f"weight_hr_l{k}{sfx}") @ h
        return h, c
    ir, iz, in_ = gi.chunk(3)
    hr, hz, hn = gh.chunk(3)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h, None


def _reference(module, seqs, h0=None, c0=None):
    """Per part the list of vectors its matrix multiplies, running every sequence (L_b x input) of
    `seqs` through the layers by an explicit loop; and each sequence's output (L_b x D*H_out)."""
    d = 2 if module.bidirectional else 1
    h_out = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    rows = {n: [] for n in rnn_matrices(module)}
    outs = []
    with torch.no_grad():
        for b, seq in enumerate(seqs):
            inp = seq
            for k in range(module.num_layers):
                per_dir = []
                for j in range(d):
                    sfx = "_reverse" if j else ""
                    h = torch.zeros(h_out) if h0 is None else h0[k * d + j, b]
                    c = torch.zeros(module.hidden_size) if c0 is None else c0[k * d + j, b]
                    steps = range(len(inp) - 1, -1, -1) if j else range(len(inp))
                    out = [None] * len(inp)
                    for t in steps:
                        rows[f"weight_ih_l{k}{sfx}"].append(inp[t])
                        rows[f"weight_hh_l{k}{sfx}"].append(h)
                        h, c = _step(module, k, sfx, inp[t], h, c)
                        out[t] = h
                    per_dir.append(torch.stack(out))
                inp = torch.cat(per_dir, dim=-1)
            outs.append(inp)
    return {n: torch.stack(v) for n, v in rows.items()}, outs


def _gram(x):
    x = x.to(torch.float64)
    return x.T @ x


def _assert_rows_match(rows, ref):
    assert set(rows) == set(ref)
    for part in ref:
        assert rows[part].shape == ref[part].shape, part
        torch.testing.assert_close(
            _gram(rows[part]), _gram(ref[part]), rtol=1e-5, atol=1e-5, msg=part
        )


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("initial_state", [False, True])
def test_rows_equal_the_vectors_of_an_explicit_recurrence(cls, batch_first, initial_state):
    torch.manual_seed(0)
    module = cls(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    x = torch.randn(4, 6, 3)  # (B, T, in)
    h0 = c0 = hx = None
    if initial_state:
        h0, c0 = torch.randn(4, 4, 5), torch.randn(4, 4, 5)
        hx = (h0, c0) if cls is nn.LSTM else h0
    xin = x if batch_first else x.transpose(0, 1)
    args = (xin,) if hx is None else (xin, hx)
    with torch.no_grad():
        output = module(*args)
    ref, outs = _reference(module, list(x), h0, c0 if cls is nn.LSTM else None)
    got = output[0] if batch_first else output[0].transpose(0, 1)
    torch.testing.assert_close(
        torch.stack(outs), got, rtol=1e-5, atol=1e-5
    )  # the reference is right
    _assert_rows_match(RNNHandler().rows(module, args, {}, output), ref)
    if hx is not None:  # hx given by keyword
        _assert_rows_match(RNNHandler().rows(module, (xin,), {"hx": hx}, output), ref)


@pytest.mark.parametrize("cls", CLASSES)
def test_rows_times_weights_are_the_gate_preactivations(cls):
    """Layer 0's pre-activations W_ih x_t + W_hh h_{t-1} (+ biases) from the rows reproduce the
    module's first-layer outputs through the gate nonlinearities."""
    torch.manual_seed(1)
    module = cls(4, 6).eval()
    x = torch.randn(7, 3, 4)
    with torch.no_grad():
        out, _ = module(x)
        rows = RNNHandler().rows(module, (x,), {}, None)
        gi = rows["weight_ih_l0"] @ module.weight_ih_l0.T + module.bias_ih_l0
        gh = rows["weight_hh_l0"] @ module.weight_hh_l0.T + module.bias_hh_l0
        h_prev = rows["weight_hh_l0"]
        if cls is nn.GRU:
            r, z, _ = torch.sigmoid(gi + gh).chunk(3, 1)
            n = torch.tanh(gi.chunk(3, 1)[2] + r * gh.chunk(3, 1)[2])
            h = (1 - z) * n + z * h_prev
        else:  # c_t needs c_{t-1}: rebuild it step by step from the gates
            i, f, g, o = (gi + gh).reshape(7, 3, -1).chunk(4, -1)
            c = torch.zeros(3, 6)
            hs = []
            for t in range(7):
                c = torch.sigmoid(f[t]) * c + torch.sigmoid(i[t]) * torch.tanh(g[t])
                hs.append(torch.sigmoid(o[t]) * torch.tanh(c))
            h = torch.stack(hs).reshape(21, 6)
    torch.testing.assert_close(h, out.reshape(21, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_rows_of_packed_sequences_skip_padding(cls):
    torch.manual_seed(2)
    module = cls(3, 4, num_layers=2, bidirectional=True).eval()
    lengths = torch.tensor([5, 2, 4])  # not sorted
    padded = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    h0 = torch.randn(4, 3, 4)
    hx = (h0, torch.randn(4, 3, 4)) if cls is nn.LSTM else h0
    with torch.no_grad():
        output = module(packed, hx)
    seqs = [padded[: int(n), b] for b, n in enumerate(lengths)]
    ref, _ = _reference(module, seqs, h0, hx[1] if cls is nn.LSTM else None)
    rows = RNNHandler().rows(module, (packed, hx), {}, output)
    _assert_rows_match(rows, ref)
    assert rows["weight_hh_l1_reverse"].shape[0] == int(lengths.sum())


@pytest.mark.parametrize("cls", CLASSES)
def test_rows_of_unbatched_input(cls):
    torch.manual_seed(3)
    module = cls(3, 4, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 3)
    h0 = torch.randn(4, 4)
    hx = (h0, torch.randn(4, 4)) if cls is nn.LSTM else h0
    ref, _ = _reference(module, [x], h0[:, None], hx[1][:, None] if cls is nn.LSTM else None)
    _assert_rows_match(RNNHandler().rows(module, (x, hx), {}, None), ref)


def test_rows_of_an_lstm_with_projections():
    """proj_size: weight_hh multiplies the projected state; layer 1 reads projected outputs."""
    torch.manual_seed(4)
    module = nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    ref, outs = _reference(module, list(x))
    with torch.no_grad():
        out, _ = module(x)
    torch.testing.assert_close(torch.stack(outs), out, rtol=1e-5, atol=1e-5)
    rows = RNNHandler().rows(module, (x,), {}, None)
    _assert_rows_match(rows, ref)
    assert rows["weight_hh_l0"].shape[1] == 2 and rows["weight_ih_l1"].shape[1] == 4


def test_calibrate_collects_every_gate_matrix_gram():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, num_layers=2)
    xs = [torch.randn(5, 2, 3), torch.randn(7, 3, 3)]
    assert RNNHandler().calibration_reason(gru) is None
    stats = calibrate(gru, {"": gru}, xs)
    assert set(stats[""].parts) == set(rnn_matrices(gru))
    for part in rnn_matrices(gru):
        expected = sum(_gram(RNNHandler().rows(gru, (x,), {}, None)[part]) for x in xs)
        torch.testing.assert_close(stats[""].part(part).gram, expected)
        assert stats[""].part(part).rows == 5 * 2 + 7 * 3


# -- compress ------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A 2-layer bidirectional recurrent layer and a classifier on its last step."""

    def __init__(self, cls, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(16, 32, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.head = nn.Linear(64, 5)

    def features(self, x):
        return self.rnn(x)[0]

    def forward(self, x):
        seq = self.features(x)
        return self.head(seq[:, -1] if self.batch_first else seq[-1])


def _setup(cls, batch_first):
    torch.manual_seed(0)
    net = _Net(cls, batch_first).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 12, 16, generator=g) * torch.logspace(0.5, -1.5, 16)  # anisotropic
    if not batch_first:
        x = x.transpose(0, 1)
    batches = list(x.split(32, dim=0 if batch_first else 1))
    return net, x, batches


def _rel_error(small, net, x):
    with torch.no_grad():
        ref = net.features(x)
        out = small.rnn(x)[0]
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_whitened_compresses_rnn_with_lower_output_error_than_svd(cls, batch_first):
    net, x, batches = _setup(cls, batch_first)
    errs, ranks = {}, {}
    for method in ("svd", "whitened"):
        small, plan = tensorslim.compress(
            net, 0.5, method=method, allocator="uniform", include=["rnn"], calibration=batches
        )
        (lp,) = plan.factorized_layers
        assert lp.name == "rnn" and lp.method == method
        assert isinstance(small.rnn, LowRankRNN)
        ranks[method] = lp.spec[0]["rank"]
        errs[method] = _rel_error(small, net, x)
    assert ranks["svd"] == ranks["whitened"]  # same budget split, only the factors differ
    assert errs["whitened"] < 0.5 * errs["svd"], errs


def _loss(model, batch):
    return model(batch).logsumexp(-1).mean()


@pytest.mark.parametrize("cls", CLASSES)
def test_fwsvd_with_a_loss_compresses_rnn(cls):
    net, x, batches = _setup(cls, True)
    small, plan = tensorslim.compress(
        net, 0.5, method="fwsvd", include=["rnn"], calibration=batches, loss=_loss
    )
    assert plan.meta["objective"] == "fisher"
    (lp,) = plan.factorized_layers
    assert lp.method == "fwsvd" and isinstance(small.rnn, LowRankRNN)
    assert lp.extra["parts"]
    for part, facts in lp.extra["parts"].items():
        assert facts["svd_fisher_error"] >= facts["weighted_fisher_error"] * (1 - 1e-9), part
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_feature_objective_with_svd_on_rnn(cls):
    net, x, batches = _setup(cls, False)
    small, plan = tensorslim.compress(
        net, 0.5, method="svd", objective="feature", calibration=batches
    )
    assert plan.meta["objective"] == "feature"
    assert plan.meta["calibration"]["gram"]
    names = {lp.name for lp in plan.factorized_layers}
    assert "rnn" in names and isinstance(small.rnn, LowRankRNN)
    assert abs(plan.achieved_keep - 0.5) <= 0.03
    assert _rel_error(small, net, x) < 1
