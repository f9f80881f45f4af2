"""Data-aware tensor methods for convolutions: Tucker-2 fitted to the calibration inputs, output
errors of every tensor kind under objective "feature", and "auto" choosing by output error."""

import math

import pytest
import torch
from torch import nn

import tensorslim
import tensorslim.handlers  # noqa: F401  (registers the handlers)
from tensorslim.calibrate import calibrate
from tensorslim.compressors import _tensor
from tensorslim.core import LayerSite, LayerTarget, build_layer, get_compressor, handler_for
from tensorslim.decompose import tensor as T
from tensorslim.search import auto as auto_mod
from tensorslim.search.auto import auto_proposals

FEATURE = {"objective": "feature"}


def anisotropic(n, cin, size, seed=0, spread=3.0):
    """Inputs whose channels have scales from 1 down to 10^-spread: most of the output comes from
    the first channels, whatever the kernel weighs most."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -spread, cin)
    shape = (n, cin, *size)
    return torch.randn(shape, generator=g) * scale.reshape(1, cin, *[1] * len(size))


def conv_and_data(cin=8, cout=12, k=3, size=(8, 8), n=48, seed=0):
    torch.manual_seed(seed)
    conv = (nn.Conv2d if len(size) == 2 else nn.Conv1d)(cin, cout, k, padding=1).eval()
    # weigh the weak input channels most in the kernel, so that kernel error and output error
    # disagree about what matters
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-1, 0, cin).reshape(1, cin, *[1] * len(size)))
    x = anisotropic(n, cin, size, seed)
    return conv, [x[i : i + 16] for i in range(0, n, 16)]


def data_target(conv, batches, objective="feature"):
    st = calibrate(conv, {"": conv}, batches)[""]
    x = batches[0]
    site = LayerSite("", tuple(x.shape), tuple(conv(x).shape), stats=st,
                     settings={"objective": objective})
    return LayerTarget("", conv, site, handler_for(conv))


def measured(conv, layer, batches):
    """||(W - W_hat) X^T||^2 / ||W X^T||^2 measured by running both layers (the bias cancels)."""
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            y, y_hat = conv(x).double(), layer(x).double()
            b = conv.bias.double().reshape(1, -1, *[1] * (y.ndim - 2))
            num += float(((y - y_hat) ** 2).sum())
            den += float(((y - b) ** 2).sum())
    return num / den


def gram_of(conv, batches):
    return calibrate(conv, {"": conv}, batches)[""].gram


def out_error(kernel, k_hat, gram):
    w = kernel.double().reshape(kernel.shape[0], -1)
    e = w - k_hat.double().reshape(kernel.shape[0], -1)
    return float(((e @ gram) * e).sum()) / float(((w @ gram) * w).sum())


# -- the decompositions -------------------------------------------------------------------------
def test_data_tucker2_errors_are_exact_output_errors_and_beat_plain_tucker2():
    conv, batches = conv_and_data()
    kernel, gram = conv.weight.detach(), gram_of(conv, batches)
    fit = T.DataTucker2(kernel, gram)
    for rank in [(2, 2), (4, 3), (6, 5), (9, 6)]:
        (err, basis), = fit.errors([rank])
        dec = fit.decompose(rank)
        assert dec.rank == rank and dec.info["basis"] == basis
        k_hat = T.tucker2_reconstruct(*[f.double() for f in dec.factors])
        assert err == pytest.approx(out_error(kernel, k_hat, gram), rel=1e-6, abs=1e-9)
        for algorithm in ("hooi", "hosvd"):
            plain = T.tucker2(kernel, rank, algorithm=algorithm)
            plain_err = out_error(kernel, T.tucker2_reconstruct(*plain.factors), gram)
            assert err <= plain_err + 1e-9
        assert err < 0.8 * out_error(kernel, T.tucker2_reconstruct(*plain.factors), gram)
    # several ranks at once give the same errors as one at a time
    ranks = [(2, 2), (9, 6), (4, 3)]
    assert [e for e, _ in T.DataTucker2(kernel, gram).errors(ranks)] == pytest.approx(
        [fit.errors([r])[0][0] for r in ranks], rel=1e-9, abs=1e-12
    )


def test_data_tucker2_is_exact_at_full_rank_and_on_rank_deficient_inputs():
    conv, batches = conv_and_data()
    kernel = conv.weight.detach()
    full = T.tucker2_full_ranks(tuple(kernel.shape))
    for data in (batches, [batches[0][:1, :, :3, :3]]):  # 1 sample of 3x3: 9 rows for 72 columns
        gram = gram_of(conv, data)
        fit = T.DataTucker2(kernel, gram)
        (err, _), = fit.errors([full])
        k_hat = T.tucker2_reconstruct(*[f.double() for f in fit.decompose(full).factors])
        assert err < 1e-7 and out_error(kernel, k_hat, gram) < 1e-7
        assert all(math.isfinite(e) for e, _ in fit.errors([(3, 3), (6, 2)]))


def test_data_tucker2_refuses_a_gram_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"patch Gram must be \(72, 72\)"):
        T.DataTucker2(torch.randn(12, 8, 3, 3), torch.eye(8))


def test_spatial_output_errors_match_each_truncation():
    conv, batches = conv_and_data(cin=6, cout=5, k=3)
    kernel, gram = conv.weight.detach(), gram_of(conv, batches)
    ranks = [1, 2, 5, 9, 12, 15]
    errors = T.spatial_output_errors(kernel, gram, ranks)
    for r, e in zip(ranks, errors):
        k_hat = T.spatial_svd_reconstruct(*T.spatial_svd(kernel.double(), r).factors)
        assert e == pytest.approx(out_error(kernel, k_hat, gram), rel=1e-7, abs=1e-10)
    assert errors[-1] < 1e-10  # full rank min(6 * 3, 5 * 3) = 15


# -- compressors on a layer with calibration inputs ---------------------------------------------
@pytest.mark.parametrize("kind", ["tucker2", "cp", "tt", "spatial"])
def test_feature_errors_are_the_built_layers_output_errors(kind):
    conv, batches = conv_and_data()
    target = data_target(conv, batches)
    comp = get_compressor(kind)
    props = comp.proposals(target, "feature")
    assert props
    picks = [props[0], props[len(props) // 2], props[-1]]
    for p in picks:
        layer, facts = comp.build(target, p.component.params)
        got = measured(conv, layer, batches)
        assert p.error == pytest.approx(got, rel=1e-3, abs=1e-6)
        assert facts["rel_output_error"] ** 2 == pytest.approx(got, rel=1e-3, abs=1e-6)


def test_data_aware_tucker2_layer_has_less_output_error_than_plain_at_the_same_ranks():
    conv, batches = conv_and_data()
    target = data_target(conv, batches)
    plain_target = LayerTarget("", conv, LayerSite("", None, None), handler_for(conv))
    comp = get_compressor("tucker2")
    for p in comp.proposals(target, "feature")[1:-1:2]:
        data_layer, facts = comp.build(target, p.component.params)
        plain_layer, plain_facts = comp.build(plain_target, p.component.params)
        assert facts["algorithm"] == "data" and "rel_output_error" not in plain_facts
        assert measured(conv, data_layer, batches) < 0.9 * measured(conv, plain_layer, batches)


def test_large_kernel_proposals_run_no_decomposition_per_rank(monkeypatch):
    # 128 x 64 x 32 Conv1d: 2^18 entries, decompose.large's path; patches of 64 * 32 = 2048
    conv, batches = conv_and_data(cin=64, cout=128, k=32, size=(40,), n=16)
    assert _tensor.is_large(tuple(conv.weight.shape))
    target = data_target(conv, batches)
    fits = []
    original = T.DataTucker2._fit
    monkeypatch.setattr(
        T.DataTucker2, "_fit", lambda self, name, r: fits.append(r) or original(self, name, r)
    )
    comp = get_compressor("tucker2")
    props = comp.proposals(target, "feature")
    assert len(props) >= 10 and len(fits) == 2  # one regression per input basis, all ranks
    p = props[len(props) // 2]
    layer, _ = comp.build(target, p.component.params)
    assert p.error == pytest.approx(measured(conv, layer, batches), rel=1e-3, abs=1e-6)
    # kinds without a closed form propose fewer keeps there (one out x n^2 product each)
    assert len(get_compressor("tt").grid(target)) <= len(_tensor.BIG_GRID)
    # CP proposes the sliced CP's output error (no ALS per rank); the build keeps the start or
    # its ALS refinement, whichever has less output error: at most the proposal's error
    cp = get_compressor("cp", {"n_iter_max": 2})
    assert cp.fast(tuple(conv.weight.shape))
    (p,) = cp.proposals(target, "feature")[:1]
    layer, _ = cp.build(target, p.component.params)
    assert measured(conv, layer, batches) <= p.error * (1 + 1e-3) + 1e-6


# -- auto and compress --------------------------------------------------------------------------
def test_auto_with_calibration_reports_output_errors_and_picks_by_them():
    conv, batches = conv_and_data()
    target = data_target(conv, batches)
    h = handler_for(conv)
    front = auto_proposals(conv, h, target.site, latency_guard=False)  # objective from settings
    kinds = {p.component.kind for p in front}
    assert "lowrank" not in kinds and kinds <= {"whitened", "cp", "tucker2", "tt", "spatial"}
    for p in front[:: max(1, len(front) // 4)]:
        layer, _ = build_layer(conv, h, [p.component], target.site)
        assert p.error == pytest.approx(measured(conv, layer, batches), rel=1e-3, abs=1e-6)
    # by kernel error auto picks another layer than by output error, one with more output error
    weight_front = auto_proposals(conv, h, LayerSite("", None, None), latency_guard=False)
    budget = conv.weight.numel() * 0.3

    def pick(props):
        return max((p for p in props if p.cost.params <= budget), key=lambda p: p.cost.params)

    by_weight, by_output = pick(weight_front), pick(front)
    assert by_weight.component != by_output.component
    weight_layer, _ = build_layer(conv, h, [by_weight.component], LayerSite("", None, None))
    output_layer, _ = build_layer(conv, h, [by_output.component], target.site)
    assert measured(conv, output_layer, batches) < 0.8 * measured(conv, weight_layer, batches)


@pytest.mark.parametrize("method", ["tucker2", "auto"])
def test_compress_with_feature_objective_collects_the_gram_and_records_output_errors(
    method, monkeypatch
):
    # the first batch is the example input: no CPU timing of auto's options in a test
    monkeypatch.setattr(auto_mod, "faster_than_dense", lambda module, h, site, pooled: pooled)
    conv, batches = conv_and_data()
    model = nn.Sequential(conv)
    small, plan = tensorslim.compress(
        model, 0.4, method=method, calibration=batches, objective="feature"
    )
    assert plan.meta["calibration"]["gram"] is True and plan.meta["objective"] == "feature"
    (lp,) = [lp for lp in plan.layers if lp.spec]
    rel = lp.extra["rel_output_error"]
    assert rel**2 == pytest.approx(measured(conv, small[0], batches), rel=1e-3, abs=1e-6)
    plain, _ = tensorslim.compress(model, 0.4, method="tucker2")
    assert measured(conv, small[0], batches) < measured(conv, plain[0], batches)
