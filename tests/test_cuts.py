"""Truncation along kernel cuts (decompose.cuts), the study (study.truncation) and the CLI."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from tensorslim.cli import app
from tensorslim.decompose.cuts import all_cuts, cut_by_name, norm_loss, truncate_cut, truncate_mps
from tensorslim.study.truncation import (
    conv_layers,
    truncate_along,
    truncated_copy,
    truncation_study,
)


def kernel(shape=(6, 5, 3, 3), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_seven_bipartitions():
    cuts = all_cuts()
    assert len(cuts) == 7
    sides = {frozenset([c.left, c.right]) for c in cuts}
    assert len(sides) == 7
    for c in cuts:
        assert sorted(c.left + c.right) == [0, 1, 2, 3] and c.left and c.right
    assert sum(len(c.left) == 1 or len(c.right) == 1 for c in cuts) == 4
    assert cut_by_name("kh,kw|out,in") == cut_by_name("out,in|kh,kw")
    with pytest.raises(ValueError):
        cut_by_name("out|in")


@pytest.mark.parametrize("cut", all_cuts(), ids=lambda c: c.name)
def test_cut_truncation_is_the_best_rank_chi_matricization(cut):
    k = kernel()
    full = truncate_cut(k, cut, chi=cut.max_bond(k.shape))
    assert full.norm_loss == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(full.kernel, k)
    t = truncate_cut(k, cut, chi=2)
    m = t.kernel.permute(cut.left + cut.right).reshape(math.prod(k.shape[i] for i in cut.left), -1)
    assert torch.linalg.matrix_rank(m) <= 2
    # Eckart-Young: the kept norm is that of the two largest singular values
    s = torch.linalg.svdvals(k.permute(cut.left + cut.right).reshape(m.shape))
    assert 1 - t.norm_loss_sq == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 1000),
    retain=st.floats(0.05, 1.0),
    cut=st.sampled_from(all_cuts()),
)
def test_retain_target_is_met_with_the_smallest_bond(seed, retain, cut):
    k = kernel((4, 3, 3, 2), seed)
    t = truncate_cut(k, cut, retain=retain)
    assert 1 - t.norm_loss >= retain - 1e-9
    assert t.norm_loss_sq == pytest.approx(1 - (1 - t.norm_loss) ** 2, abs=1e-12)
    if t.bond > 1:
        smaller = truncate_cut(k, cut, chi=t.bond - 1)
        assert 1 - smaller.norm_loss < retain
    # orthogonal projection: ||K~||^2 + ||K - K~||^2 = ||K||^2
    lhs = float((t.kernel**2).sum() + ((k - t.kernel) ** 2).sum())
    assert lhs == pytest.approx(float((k**2).sum()), rel=1e-9)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 2, 3, 0), (2, 0, 3, 1)])
def test_mps_truncation_exact_at_full_bonds_and_lossy_below(order):
    k = kernel().float()
    full = truncate_mps(k, (10**6,) * 3, order)
    torch.testing.assert_close(full.kernel, k, rtol=1e-4, atol=1e-5)
    low = truncate_mps(k, (1, 2, 1), order)
    assert 0 < low.norm_loss < 1
    assert low.bond[0] == 1 and low.bond[2] == 1
    # bond 1 at the first cut: the kernel is an outer product along the first index of `order`
    first = order[0]
    m = low.kernel.movedim(first, 0).reshape(k.shape[first], -1)
    assert torch.linalg.matrix_rank(m, atol=1e-5) == 1


def test_norm_loss_of_zero_kernel():
    z = torch.zeros(2, 2, 3, 3)
    assert norm_loss(z, z) == (0.0, 0.0)


@pytest.mark.parametrize("cut", all_cuts(), ids=lambda c: c.name)
def test_study_truncation_through_the_lowrank_compressor_matches_truncate_cut(cut):
    kernels = (kernel(), kernel().float(), torch.zeros(3, 2, 2, 2))
    for level in ({"chi": 1}, {"chi": 3}, {"chi": 10**6}, {"retain": 0.8}):
        for k in kernels:
            want, got = truncate_cut(k, cut, **level), truncate_along(k, cut, **level)
            assert (got.bond, got.max_bond) == (want.bond, want.max_bond)
            assert got.kernel.dtype == k.dtype
            torch.testing.assert_close(got.kernel, want.kernel)
            assert got.norm_loss == pytest.approx(want.norm_loss, abs=1e-9)
            assert got.norm_loss_sq == pytest.approx(want.norm_loss_sq, abs=1e-9)
    with pytest.raises(ValueError):
        truncate_along(kernel(), cut, chi=2, retain=0.5)
    with pytest.raises(ValueError):
        truncate_along(kernel(), cut, retain=1.5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_truncated_copy_truncates_the_named_convs_only():
    torch.manual_seed(0)
    net = Tiny()
    out, facts = truncated_copy(net, ["c2"], "out|in,kh,kw", ("chi", 2.0))
    assert len(facts) == 1 and facts[0].bond == 2
    assert torch.linalg.matrix_rank(out.c2.weight.detach().reshape(8, -1)) == 2
    assert torch.equal(out.c1.weight, net.c1.weight)
    assert not torch.equal(out.c2.weight, net.c2.weight)


def test_truncation_study_rows_and_recovery():
    torch.manual_seed(0)
    net = Tiny().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    cuts = ["out|in,kh,kw", "out,in|kh,kw"]
    study = truncation_study(
        net, x, y, cuts=cuts, retains=(0.8,), chis=(1,), mps_fractions=(0.5,),
        retrain_epochs=2, x_train=x, y_train=y,
    )  # fmt: skip
    settings_per_layer = len(cuts) * 2 + 1
    assert len(study.rows) == (len(conv_layers(net)) + 1) * settings_per_layer
    for r in study.rows:
        assert 0 <= r.accuracy <= 1 and 0 <= r.norm_loss <= 1
        assert r.drop == pytest.approx(100 * (study.dense_accuracy - r.accuracy))
        if r.level == "retain=0.8":
            assert r.norm_loss <= 0.2 + 1e-9
    assert [p["epoch"] for p in study.recovery] == [0, 1, 2]
    # the original model is untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_cli_truncate_writes_table_and_plot(tmp_path):
    out = tmp_path / "trunc"
    res = CliRunner().invoke(
        app,
        ["truncate", "digits-cnn", "--cuts", "out|in,kh,kw;out,in|kh,kw", "--retain", "0.5",
         "--mps", "", "--test-size", "100", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads((out / "truncation.json").read_text())
    assert payload["test_size"] == 100 and len(payload["rows"]) == 4 * 2
    assert (out / "truncation.png").stat().st_size > 1000


def test_cli_truncate_refuses_unknown_model_and_bad_retain(tmp_path):
    r = CliRunner().invoke(app, ["truncate", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2
    r = CliRunner().invoke(
        app, ["truncate", "digits-cnn", "--retain", "1.5", "--out", str(tmp_path)]
    )
    assert r.exit_code == 2


def test_markdown_table_escapes_cut_names():
    from tensorslim.report.tables import markdown_table

    text = markdown_table([{"cut": "out|in,kh,kw", "norm loss": 0.25}])
    header, rule, row = text.strip().splitlines()
    assert row == "| out\\|in,kh,kw | 0.25 |"
    assert row.replace("\\|", "").count("|") == header.count("|") == 3
