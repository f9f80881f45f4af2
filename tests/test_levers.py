"""Inference levers (BatchNorm folding, merged chain stages, channels_last), their whole-model
keep/drop decision, and ONNX Runtime timing. No test asserts a speed: timings are faked where a
decision depends on them."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tensorslim
from tensorslim.errors import TensorSlimError
from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.tensor_conv import ConvGeometry, FactorizedConv, Tucker2Conv
from tensorslim.search.timing import Latency
from tensorslim.speed import levers as lv
from tensorslim.speed.fold import (
    MergedChain,
    find_conv_bn_pairs,
    fold_batchnorm,
    fold_report,
    merge_chains,
    merge_pair,
)
from tensorslim.speed.layout import to_channels_last
from tensorslim.speed.onnx_time import compare_onnx, onnx_latency

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, BN):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


def assert_same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(a.detach().abs().max()))


class ConvLayer(nn.Module):
    """Conv and BatchNorm as attributes of one module (as Hugging Face ResNet / MobileNetV2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class Basic(nn.Module):
    """A residual block with a conv+BN shortcut: shortcut(x) + layer(x)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(ConvLayer(cin, cout, 2), ConvLayer(cout, cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = self.shortcut(x)
        hidden = self.layer(x)
        hidden += residual
        return torch.relu(hidden)


def attribute_style() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(
        nn.Sequential(ConvLayer(3, 8), Basic(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    )


def conv_bn_net(channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    c = channels
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c, 8),
            nn.BatchNorm1d(8),
            nn.Linear(8, 4),
        )
    )


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))


# -- BatchNorm folding ------------------------------------------------------------------------


def test_fold_sequential_removes_every_bn_and_keeps_outputs():
    model = conv_bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, n = fold_batchnorm(model, X)
    assert n == 4 and n_bn(folded) == 0
    assert_same(model(X), folded(X))
    assert n_bn(model) == 4  # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the bias-free conv got a bias carrying the BatchNorm's shift
    assert folded[3].bias is not None


def test_fold_attribute_style_modules_and_conv_shortcut():
    model = attribute_style()
    report = fold_report(model, X)
    assert len(report.folded) == 4 and report.skipped == {}
    assert ("1.shortcut.1", "1.shortcut.0") in report.folded
    assert ("1.layer.0.normalization", "1.layer.0.convolution") in report.folded
    assert n_bn(report.model) == 0
    assert_same(model(X), report.model(X))


def test_fold_conv1d_bn1d():
    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 2, 1)
        )
    )
    x = torch.randn(3, 4, 20)
    folded, n = fold_batchnorm(model, x)
    assert n == 1 and n_bn(folded) == 0
    assert_same(model(x), folded(x))


@pytest.mark.parametrize("method", ["tucker2", "svd", "tt"])
def test_fold_into_last_conv_of_factorized_chain(method):
    model = conv_bn_net(16)
    small, plan = tensorslim.compress(model, keep=0.5, method=method, example_input=X)
    chains = [m for m in small.modules() if isinstance(m, (FactorizedConv, LowRankConv))]
    assert chains, plan
    report = fold_report(small, X)
    assert len(report.folded) == n_bn(small) == 4
    assert n_bn(report.model) == 0
    assert_same(small(X), report.model(X))
    # every chain still reports the dense layer it computes (the fold included)
    for m in report.model.modules():
        if isinstance(m, (FactorizedConv, LowRankConv)):
            x = torch.randn(2, m.in_channels, 12, 12)
            assert_same(m(x), m.to_dense()(x))


def test_bn_reading_a_conv_output_that_is_also_added_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    model = randomize_bn(Twice())
    pairs, skipped = find_conv_bn_pairs(model, X)
    assert pairs == [] and "used elsewhere" in skipped["bn"]
    folded, n = fold_batchnorm(model, X)
    assert n == 0 and isinstance(folded.bn, nn.BatchNorm2d)
    assert_same(model(X), folded(X))


def test_bn_after_a_non_conv_or_a_shared_conv_is_left_with_a_reason():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3), conv))
    _, skipped = find_conv_bn_pairs(model, X)
    assert "not the output of a conv" in skipped["1"]
    assert "more than once" in skipped["3"]


def test_training_mode_bn_is_refused_or_left_alone():
    model = conv_bn_net().train()
    stats = model[1].running_mean.clone()
    with pytest.raises(TensorSlimError, match="training mode.*model.eval"):
        fold_batchnorm(model, X)
    report = fold_report(model, X)
    assert report.folded == [] and all("training mode" in r for r in report.skipped.values())
    assert n_bn(report.model) == 4
    assert torch.equal(model[1].running_mean, stats) and model.training  # the input untouched


@pytest.mark.slow
def test_real_hugging_face_resnet_and_mobilenet_fold_completely():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    resnet = randomize_bn(tr.ResNetForImageClassification(cfg))
    mobile = randomize_bn(
        tr.MobileNetV2ForImageClassification(
            tr.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=3)
        )
    )
    x = torch.randn(2, 3, 32, 32)
    for model in (resnet, mobile):
        report = fold_report(model, x)
        assert report.skipped == {} and n_bn(report.model) == 0
        assert_same(model(x).logits, report.model(x).logits)


# -- merging chain stages, channels_last --------------------------------------------------------


def test_merge_pair_is_exact_for_both_orders():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11, 11)
    # a bias-free 1x1 before a strided, reflect-padded conv
    a = nn.Conv2d(5, 3, 1, bias=False)
    b = nn.Conv2d(3, 7, 3, stride=2, padding=1, padding_mode="reflect")
    merged = merge_pair(a, b)
    assert merged.kernel_size == (3, 3) and merged.padding_mode == "reflect"
    assert_same(b(a(x)), merged(x), 1e-5)
    # a conv with bias, then a 1x1 with bias
    a = nn.Conv2d(5, 3, 3, padding=2, dilation=2)
    b = nn.Conv2d(3, 7, 1)
    assert_same(b(a(x)), merge_pair(a, b)(x), 1e-5)
    # a 1x1 with bias before a padded conv has no exact merge (the bias would reach the padding)
    assert merge_pair(nn.Conv2d(5, 3, 1), nn.Conv2d(3, 7, 3, padding=1)) is None
    # depthwise stages are not merged
    assert merge_pair(nn.Conv2d(5, 5, 1, bias=False), nn.Conv2d(5, 5, 3, groups=5)) is None


def test_merge_chains_merges_only_where_fewer_multiply_adds():
    torch.manual_seed(0)
    dense = nn.Conv2d(32, 32, 3, padding=1)
    # r_out = 30 of 32: the last 1x1 costs more than it saves, the merge with the core is cheaper
    geometry = ConvGeometry.of(dense)
    wide = Tucker2Conv(geometry, (30, 4))  # random weights: the merge is exact for any
    narrow = Tucker2Conv(geometry, (4, 4))  # already cheapest: left alone
    lowrank = LowRankConv.from_dense(dense, 32)  # rank = out: merged back to one conv
    model = nn.Sequential(wide, nn.ReLU(), narrow, nn.ReLU(), lowrank).eval()
    x = torch.randn(2, 32, 10, 10)
    merged, details = merge_chains(model, x)
    assert len(details) == 2
    assert isinstance(merged[0], MergedChain) and len(merged[0]) == 2
    assert isinstance(merged[2], Tucker2Conv)
    assert type(merged[4]) is nn.Conv2d
    assert_same(model(x), merged(x))
    assert_same(merged[0](x), merged[0].dense_equivalent()(x))
    assert isinstance(model[0], Tucker2Conv)  # the input model is untouched


def test_channels_last_keeps_outputs_and_layout():
    model = conv_bn_net()
    cl, n = to_channels_last(model, X)
    assert n == 3
    assert cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(model(X), cl(X))
    again, n2 = to_channels_last(cl, X)
    assert n2 == 0
    _, none = to_channels_last(nn.Linear(3, 3), torch.randn(2, 3))
    assert none == 0
    spatial = nn.Conv2d(3, 4, 3)
    y = to_channels_last(spatial)[0](X)
    assert y.is_contiguous()  # a 4-D output comes back in the default layout
    assert_same(spatial(X), y)


# -- apply_levers decisions (timing faked) --------------------------------------------------------


def fake_compare(faster: bool):
    def compare(models, example_input, rounds=3, min_run_time=0.1):
        ms = (2.0, 1.0) if faster else (1.0, 2.0)
        return [Latency(m, (m,)) for m in ms]

    return compare


@pytest.mark.parametrize("faster", [True, False])
def test_apply_levers_keeps_levers_that_measure_faster(monkeypatch, faster):
    monkeypatch.setattr(lv, "compare_models", fake_compare(faster))
    model = conv_bn_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new, decisions = lv.apply_levers(model, X, check_dense=False)
    assert [d.name for d in decisions] == ["fold_bn", "merge_1x1", "channels_last"]
    fold, merge, cl = decisions
    assert fold.touched == 4 and fold.kept is faster and fold.max_rel_error <= 1e-4
    assert merge.kept is False and merge.reason.startswith("nothing to do")
    assert cl.kept is faster and cl.ms_before == (2.0 if faster else 1.0)
    assert n_bn(new) == (0 if faster else 4)
    assert new[0].weight.is_contiguous(memory_format=torch.channels_last) is faster
    assert_same(model(X), new(X))
    assert n_bn(model) == 4 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    json.dumps([d.to_dict() for d in decisions])


def test_apply_levers_drops_a_lever_that_changes_outputs(monkeypatch):
    monkeypatch.setattr(lv, "compare_models", fake_compare(True))

    def bad_lever(model, x):
        import copy

        m = copy.deepcopy(model)
        with torch.no_grad():
            m[0].weight.mul_(1.01)
        return m, 1, ["0 scaled"], ""

    monkeypatch.setitem(lv.LEVERS, "fold_bn", bad_lever)
    model = conv_bn_net()
    new, decisions = lv.apply_levers(model, X, levers=["fold_bn"], check_dense=False)
    assert not decisions[0].kept and "outputs changed" in decisions[0].reason
    assert torch.equal(new(X), model(X))


def test_a_levered_model_is_not_saved_with_weights_that_do_not_fit_its_plan(monkeypatch, tmp_path):
    monkeypatch.setattr(lv, "compare_models", fake_compare(True))
    model = conv_bn_net().eval()
    small, plan = tensorslim.compress(model, 0.5, example_input=X)
    fast, _ = lv.apply_levers(small, X, check_dense=False)
    assert n_bn(fast) == 0
    with pytest.raises(TensorSlimError, match="inference levers applied"):
        tensorslim.save(fast, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the speed search keeps the model before the levers: save writes it and load rebuilds it
    fast.__dict__[lv.LEVERS_BASE_ATTR] = small
    tensorslim.save(fast, plan, tmp_path / "out")
    back = tensorslim.load(conv_bn_net(), tmp_path / "out").eval()
    assert_same(back(X), fast(X))


def test_apply_levers_rejects_unknown_levers():
    with pytest.raises(TensorSlimError, match="unknown lever"):
        lv.apply_levers(conv_bn_net(), X, levers=["fold_bn", "fuse_everything"])


def test_slower_than_dense_names_the_layer(monkeypatch):
    def compare_calls(fns, rounds=3, min_run_time=0.1):
        return [Latency(3.0, (3.0,)), Latency(1.0, (1.0,))]  # factorized, dense

    monkeypatch.setattr(lv, "compare_calls", compare_calls)
    dense = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(Tucker2Conv.from_dense(dense, (2, 2)), nn.ReLU()).eval()
    slow = lv.slower_than_dense(model, X)
    assert len(slow) == 1 and slow[0].startswith("0 (3 ms vs dense 1 ms)")


# -- ONNX Runtime timing ----------------------------------------------------------------------------


def test_onnx_latency_and_compare(tmp_path):
    from tensorslim.io import export_onnx

    torch.manual_seed(0)
    x = torch.randn(2, 16)
    big = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    small = nn.Sequential(nn.Linear(16, 4)).eval()
    export_onnx(big, x, tmp_path / "big.onnx")
    export_onnx(small, x, tmp_path / "small.onnx")
    ms = onnx_latency(tmp_path / "big.onnx", x, rounds=1, threads=1, min_run_time=0.01)
    assert isinstance(ms, float) and ms > 0
    r = compare_onnx(tmp_path / "big.onnx", tmp_path / "small.onnx", x, rounds=1, min_run_time=0.01)
    assert r["dense_ms"] > 0 and r["compressed_ms"] > 0 and r["input_shapes"] == [[2, 16]]
    assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compressed_ms"])
    with pytest.raises(TensorSlimError, match="no ONNX file"):
        onnx_latency(tmp_path / "missing.onnx", x)
    with pytest.raises(TensorSlimError, match="takes 1 input"):
        onnx_latency(tmp_path / "big.onnx", (x, x))


def test_export_cli_reports_dense_and_compressed_onnx_time(tmp_path):
    from tensorslim.cli import app

    src = tmp_path / "nets.py"
    src.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), "
        "nn.Linear(16 * 6 * 6, 32))\n"
    )
    runner = CliRunner()
    out, onnx = tmp_path / "out", tmp_path / "m.onnx"
    spec = f"{src}:make"
    args = ["compress", spec, "--keep", "0.5", "--input-shape", "1,3,8,8", "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(out), "--onnx", str(onnx), "--model", spec])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "ONNX Runtime" in text and "input 1x3x8x8" in text
    dense_ms = float(text.split("dense ")[1].split(" ms")[0])
    small_ms = float(text.split("compressed ")[1].split(" ms")[0])
    assert dense_ms > 0 and small_ms > 0 and "speedup" in text
    r = runner.invoke(app, ["export", str(out), "--onnx", str(onnx), "--model", spec, "--no-time"])
    assert r.exit_code == 0 and "ONNX Runtime" not in r.output


def test_a_lever_is_faster_only_by_both_best_and_paired_rounds():
    before = Latency(1.0, (1.0, 5.0, 5.0))
    assert not lv._faster(before, Latency(0.9, (0.9, 6.0, 6.0)))  # best faster, rounds slower
    assert not lv._faster(before, Latency(1.1, (1.1, 4.0, 4.0)))  # rounds faster, best slower
    assert lv._faster(before, Latency(0.9, (0.9, 4.0, 4.0)))
