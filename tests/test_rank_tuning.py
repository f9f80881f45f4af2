import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.decompose import max_useful_rank


class Mixed(nn.Module):
    """Conv front end, bidirectional GRU, Linear head: all three kinds of matrices."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 16, 3, padding=1)
        self.rnn = nn.GRU(16, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x):  # x: (batch, time, 6)
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        h, _ = self.rnn(h)
        return self.head(h[:, -1])


MATRICES = {
    "conv": ("conv", "weight"),
    "head": ("head", "weight"),
    **{
        f"rnn.{p}": ("rnn", p)
        for p in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse")
    },
}


@torch.no_grad()
def _decaying_spectra(model):
    """Give every matrix geometrically decaying singular values, like trained weights have (a
    random init's flat spectrum makes one matrix's rank matter little and non-monotonically)."""
    for layer, param in MATRICES.values():
        p = getattr(getattr(model, layer), param)
        w = p.reshape(p.shape[0], -1)
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        s = 2.0 * 0.6 ** torch.arange(u.shape[1], dtype=w.dtype)
        p.copy_(((u * s) @ vh).reshape(p.shape))


def _setup():
    torch.manual_seed(0)
    model = Mixed().eval()
    _decaying_spectra(model)
    x = torch.randn(32, 7, 6)
    with torch.no_grad():
        ref = model(x)

    def fidelity(m):  # 1 - relative output error against the uncompressed model (higher is better)
        return 1.0 - float((m(x) - ref).norm() / ref.norm())

    return model, x, fidelity


@torch.no_grad()
def _exhaustive(model, metric, targets):
    """Reference: every rank of every matrix evaluated (others at full rank), smallest passing."""
    base = metric(model)
    ranks, curves, evals = {t: {} for t in targets}, {}, 0
    for key, (layer, param) in MATRICES.items():
        p = getattr(getattr(model, layer), param)
        orig = p.detach().clone()
        w = orig.reshape(orig.shape[0], -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r_max = max_useful_rank(*w.shape)
        curve = {}
        for r in range(1, r_max + 1):
            p.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(orig.shape))
            curve[r] = metric(model)
            evals += 1
        p.copy_(orig)
        curves[key] = curve
        for t in targets:
            ok = [r for r in curve if curve[r] >= base - t * abs(base) - 1e-12]
            ranks[t][key] = ok[0] if ok else None
    return ranks, curves, evals


def test_bisection_matches_exhaustive_with_fewer_evaluations():
    model, _, metric = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = [0.02, 0.1, 0.3]
    ranks, curves, evals = _exhaustive(model, metric, targets)
    # Bisection presumes each curve metric(rank) is monotone. Here the curves rise steeply with
    # rank; they only wiggle (by < 0.01) near full rank, where no target's threshold lies.
    for curve in curves.values():
        vals = [curve[r] for r in sorted(curve)]
        assert all(a <= b + 0.01 for a, b in zip(vals, vals[1:]))
    res = tensorslim.rank_tuning(model, metric, targets, evaluate=False)
    assert res.ranks == ranks
    assert res.evaluations < evals
    assert any(r is not None for r in res.ranks[0.3].values())
    for k, v in model.state_dict().items():  # the model is left unchanged
        assert torch.equal(v, before[k])


def test_plans_apply_save_and_evaluate(tmp_path):
    model, x, metric = _setup()
    res = tensorslim.rank_tuning(model, metric, [0.05, 0.3])
    loose, strict = res.plans[0.3], res.plans[0.05]
    assert loose.model_params_after < strict.model_params_after <= strict.model_params_before
    small = tensorslim.apply_plan(model, loose).eval()
    assert sum(p.numel() for p in small.parameters()) == loose.model_params_after
    with torch.no_grad():
        assert metric(small) == pytest.approx(res.metrics[0.3], rel=1e-6)
    tensorslim.save(small, loose, tmp_path / "m")
    back = tensorslim.load(Mixed(), tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


def test_lower_is_better_and_bad_arguments():
    model, _, fidelity = _setup()

    def error(m):  # lower is better, reference 1e-3 > 0 so relative targets are meaningful
        return 1.001 - fidelity(m)

    res = tensorslim.rank_tuning(model, error, [5.0], higher_is_better=False, include=["head"])
    assert set(res.ranks[5.0]) == {"head"}
    assert res.metrics[5.0] <= 0.001 * 6 + 1e-9
    with pytest.raises(tensorslim.TensorSlimError):
        tensorslim.rank_tuning(model, fidelity, [-0.1])
    with pytest.raises(tensorslim.TensorSlimError):
        tensorslim.rank_tuning(model, fidelity, [0.1], search="linear")


def test_joint_repair_makes_the_combined_model_meet_each_target():
    model, _, metric = _setup()
    plain = tensorslim.rank_tuning(model, metric, [0.02, 0.1])
    joint = tensorslim.rank_tuning(model, metric, [0.02, 0.1], joint=True)
    for t in (0.02, 0.1):
        assert joint.metrics[t] >= 1.0 - t - 1e-9  # reference fidelity is 1.0
        assert joint.joint_scale[t] >= 1.0
        if plain.metrics[t] >= 1.0 - t:  # already met: nothing changes
            assert joint.ranks[t] == plain.ranks[t]
        else:  # repaired: no rank went down
            for k, r in plain.ranks[t].items():
                assert r is None or joint.ranks[t][k] is None or joint.ranks[t][k] >= r
    assert any(plain.metrics[t] < 1.0 - t for t in (0.02, 0.1))  # the case the repair is for
    assert joint.evaluations > plain.evaluations
