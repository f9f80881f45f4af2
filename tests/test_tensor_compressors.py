"""The tensor-decomposition compressors of conv kernels ("cp", "tucker2", "tt", "spatial") on the
Compressor protocol, and the "auto" proposals pooled from them and the matrix SVD."""

import json
import math

import pytest
import torch
from torch import nn

import tensorslim.handlers  # noqa: F401  (registers the handlers)
from tensorslim.compressors import _tensor
from tensorslim.compressors.tucker2 import hosvd_energy
from tensorslim.core import (
    Component,
    LayerSite,
    LayerTarget,
    build_layer,
    dense_cost,
    get_compressor,
    handler_for,
)
from tensorslim.decompose import tensor as T
from tensorslim.errors import TensorSlimError, UnsupportedLayerError
from tensorslim.search import auto as auto_mod
from tensorslim.search.auto import AUTO_KINDS, auto_members, auto_proposals, auto_reason

KINDS = ("cp", "tucker2", "tt", "spatial")
# CP-ALS run to convergence with a negligible ridge: recovers kernels of exact CP rank
EXACT_CP = {"n_iter_max": 500, "tol": 1e-12, "ridge": 1e-10}


def target_of(conv, input_shape=None, name="conv", output_shape=None):
    handler = handler_for(conv)
    site = LayerSite(name, input_shape, output_shape)
    return LayerTarget(name, conv, site, handler)


def bias_count(module):
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))


def conv2d(cin=6, cout=8, k=3, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, **kw)


def full_rank(kind, shape):
    """A rank at which the decomposition is exact (CP: see the low-rank kernel below)."""
    if kind == "tucker2":
        return list(T.tucker2_full_ranks(shape))
    if kind == "tt":
        return list(T.tt_full_ranks(shape))
    if kind == "spatial":
        out, inp, kh, kw = shape
        return min(inp * kh, out * kw)
    raise ValueError(kind)


def cp_kernel(shape, rank, seed=0):
    """A kernel of exact CP rank `rank` (random factors)."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g) for n in shape]
    return T.cp_reconstruct(factors)


# -- registration ---------------------------------------------------------------------------------
def test_kinds_are_registered_as_layer_compressors():
    for kind in KINDS:
        comp = get_compressor(kind)
        assert comp.kind == kind and comp.form == "layer"
    assert get_compressor("spatial").method == "spatial_svd"
    assert get_compressor("spatial_svd").kind == "spatial"


def test_unknown_and_bad_options_are_refused():
    with pytest.raises(TensorSlimError, match="unknown option 'iters' for compressor 'cp'"):
        get_compressor("cp", {"iters": 3})
    with pytest.raises(TensorSlimError, match="init"):
        get_compressor("cp", {"init": "zeros"})
    with pytest.raises(TensorSlimError, match="algorithm"):
        get_compressor("tucker2", {"algorithm": "svd"})
    with pytest.raises(TensorSlimError, match="its options are: none"):
        get_compressor("tt", {"seed": 1})
    assert get_compressor("tucker2", {"algorithm": "hosvd"}).options.algorithm == "hosvd"


# -- build reproduces the conv --------------------------------------------------------------------
GEOMETRIES = [
    dict(padding=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(padding="same", padding_mode="reflect", bias=False),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", ["tucker2", "tt", "spatial"])
def test_build_at_full_rank_reproduces_the_conv(kind, geometry):
    conv = conv2d(5, 7, 3, **geometry).double()
    target = target_of(conv)
    comp = get_compressor(kind)
    params = {"rank": full_rank(kind, tuple(conv.weight.shape))}
    assert comp.check(target, params) is None
    layer, facts = comp.build(target, params)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)
    assert facts["kernel_rel_error"] < 1e-9
    if conv.bias is not None:
        torch.testing.assert_close(layer[-1].bias, conv.bias)


@pytest.mark.parametrize("kind", ["cp", "tucker2", "tt"])
def test_build_reproduces_a_conv1d(kind):
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 5, stride=2, padding=2).double()
    shape = tuple(conv.weight.shape)
    if kind == "cp":
        with torch.no_grad():
            conv.weight.copy_(cp_kernel(shape, 3).double())
        params, comp = {"rank": 3}, get_compressor("cp", EXACT_CP)
    else:
        params = {"rank": full_rank(kind, shape)}
        comp = get_compressor(kind)
    layer, _ = comp.build(target_of(conv), params)
    x = torch.randn(3, 4, 17, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_cp_build_at_the_kernels_cp_rank_reproduces_the_conv():
    conv = conv2d(5, 7, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(cp_kernel(tuple(conv.weight.shape), 4).double())
    comp = get_compressor("cp", EXACT_CP)
    layer, facts = comp.build(target_of(conv), {"rank": 4})
    assert facts["decomposition"] == "cp" and facts["iterations"] >= 1
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_build_through_materialize_keeps_dtype_and_records_facts():
    conv = conv2d(6, 8, 3, padding=1)
    target = target_of(conv)
    spec = [Component("tucker2", {"rank": [4, 3]})]
    layer, facts = build_layer(conv, target.handler, spec, target.site)
    assert isinstance(layer, nn.Sequential) and layer.rank == (4, 3)
    assert facts["decomposition"] == "tucker2" and facts["algorithm"] == "hooi"
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    x = torch.randn(1, 6, 7, 7)
    assert layer(x).shape == conv(x).shape


# -- project --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, rank, options",
    [
        ("tucker2", [3, 2], {"algorithm": "hosvd"}),
        ("tucker2", [3, 2], {"algorithm": "hooi"}),
        ("tt", [3, 5, 4], None),
        ("spatial", 4, None),
    ],
)
def test_project_is_idempotent_where_the_method_is_a_projection(kind, rank, options):
    """Truncated HOSVD, HOOI (started from the HOSVD), TT-SVD and the spatial SVD return a kernel
    of the requested (multilinear / TT / matrix) rank, and each reproduces such a kernel exactly:
    projecting twice changes nothing (up to float64 rounding)."""
    torch.manual_seed(0)
    k = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    comp = get_compressor(kind, options)
    p1 = comp.project(k, {"rank": rank})
    assert p1.shape == k.shape and p1.dtype == k.dtype
    assert not torch.allclose(p1, k)
    p2 = comp.project(p1, {"rank": rank})
    torch.testing.assert_close(p2, p1, rtol=1e-9, atol=1e-9)


def test_cp_project_is_not_an_exact_projection_but_recovers_cp_rank_kernels():
    """CP-ALS is iterative from a random start: it is no exact projection (the CP-rank-R output
    of ALS on a generic kernel is often ill-conditioned, and ALS from a fresh start recovers it
    only roughly), but a well-conditioned kernel of CP rank R is recovered at rank R to the
    solver's tolerance, and projecting twice moves far less than projecting once."""
    comp = get_compressor("cp", EXACT_CP)
    k = cp_kernel((8, 6, 3, 3), 3).double()
    torch.testing.assert_close(comp.project(k, {"rank": 3}), k, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    noisy = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    p1 = comp.project(noisy, {"rank": 3})
    p2 = comp.project(p1, {"rank": 3})
    first = float((p1 - noisy).norm() / noisy.norm())
    assert float((p2 - p1).norm() / p1.norm()) < 0.05 * first


def test_project_keeps_float16_dtype():
    k = torch.randn(8, 6, 3, 3).half()
    out = get_compressor("spatial").project(k, {"rank": 2})
    assert out.dtype == torch.float16 and out.shape == k.shape


# -- cost -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conv_args", [(6, 8, 3), (16, 12, (3, 5))])
def test_cost_params_equal_the_built_modules_parameters_minus_bias(kind, conv_args):
    conv = conv2d(*conv_args, padding=1)
    input_shape = (2, conv.in_channels, 9, 10)
    target = target_of(conv, input_shape)
    comp = get_compressor(kind)
    grid = comp.grid(target)
    assert grid
    for params in grid[:: max(1, len(grid) // 4)]:
        cost = comp.cost(target, params)
        layer = comp.empty(target, params)
        assert cost.params == sum(p.numel() for p in layer.parameters()) - bias_count(layer)
        assert cost.bits == cost.params * 32
        assert cost.flops == _tensor.chain_flops(layer, input_shape)
        built, _ = comp.build(target, params)
        assert sum(p.numel() for p in built.parameters()) - bias_count(built) == cost.params
    assert comp.cost(target_of(conv), grid[0]).flops is None


def test_flops_of_a_chain_add_up_per_layer():
    conv = conv2d(6, 8, 3, padding=1)
    target = target_of(conv, (1, 6, 10, 10), output_shape=(1, 8, 10, 10))
    cost = get_compressor("tucker2").cost(target, {"rank": [4, 3]})
    # 1x1 6->3, 3x3 3->4, 1x1 4->8 on 10x10 outputs; 2 FLOPs per multiply-add
    assert cost.flops == 2 * 100 * (6 * 3 + 3 * 4 * 9 + 4 * 8)
    assert dense_cost(target).flops == 2 * 100 * 6 * 8 * 9


# -- grid and errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_grid_rises_in_cost_below_dense_and_is_json(kind):
    conv = conv2d(16, 24, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor(kind)
    grid = comp.grid(target)
    costs = [comp.cost(target, p).params for p in grid]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert costs[-1] < dense_cost(target).params
    assert json.loads(json.dumps(grid)) == grid
    assert all(comp.check(target, p) is None for p in grid)
    if kind == "spatial":
        assert [p["rank"] for p in grid] == list(range(1, len(grid) + 1))


def test_for_keep_picks_the_largest_rank_within_the_budget():
    conv = conv2d(16, 24, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor("cp")
    p = comp.for_keep(target, 0.25)
    assert comp.cost(target, p).params <= 0.25 * conv.weight.numel()
    # the grid's ranks come from keeps of the layer, bias included (as the allocators count)
    assert p["rank"] == T.cp_rank_for_keep(tuple(conv.weight.shape), 0.25, conv.bias.numel())


@pytest.mark.parametrize("kind", ["cp", "tt"])
def test_errors_are_the_decompositions_relative_squared_errors(kind):
    conv = conv2d(8, 12, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor(kind)
    props = comp.proposals(target)
    assert [p.component.kind for p in props] == [kind] * len(props)
    errors = [p.error for p in props]
    assert all(0 <= e <= 1 for e in errors)
    p = props[len(props) // 2]
    _, facts = comp.build(target, p.component.params)
    assert facts["kernel_rel_error"] ** 2 == pytest.approx(p.error, abs=1e-5)


def test_tucker2_errors_are_hosvd_errors():
    conv = conv2d(8, 12, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor("tucker2")
    hosvd = get_compressor("tucker2", {"algorithm": "hosvd"})
    grid = comp.grid(target)
    for params, err in zip(grid, comp.errors(target, grid, "weight")):
        k = conv.weight.detach()
        direct = float(((hosvd.project(k, params) - k) ** 2).sum() / (k**2).sum())
        assert err == pytest.approx(direct, abs=1e-5)
        # HOOI refines the HOSVD: its error is no larger
        assert comp.weight_error(k, tuple(params["rank"])) == pytest.approx(err, abs=1e-9)
    assert float(hosvd_energy(conv.weight)[-1, -1]) == pytest.approx(1.0)


def test_spatial_errors_are_exact():
    conv = conv2d(8, 12, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor("spatial")
    props = comp.proposals(target)
    k = conv.weight.detach()
    for p in props[::5]:
        direct = float(((comp.project(k, p.component.params) - k) ** 2).sum() / (k**2).sum())
        assert p.error == pytest.approx(direct, abs=1e-5)


def test_other_objectives_measure_the_projected_kernel():
    conv = conv2d(8, 12, 3, padding=1)
    target = target_of(conv)
    comp = get_compressor("spatial")
    grid = comp.grid(target)[:3]
    with pytest.raises(TensorSlimError, match="fisher"):
        comp.errors(target, grid, "fisher")


def test_decompositions_are_cached_by_kernel_content():
    _tensor.clear_cache()
    conv = conv2d(8, 12, 3, padding=1)
    comp = get_compressor("cp")
    a = comp.decompose(conv.weight, 5)
    n = len(_tensor._CACHE)
    b = comp.decompose(conv.weight.detach().clone(), 5)
    assert a is b and len(_tensor._CACHE) == n
    c = get_compressor("cp", {"seed": 1}).decompose(conv.weight, 5)
    assert c is not a and len(_tensor._CACHE) == n + 1


# -- check ----------------------------------------------------------------------------------------
def test_check_refusals_name_what_is_accepted():
    conv = conv2d(6, 8, 3, padding=1)
    t = target_of(conv)
    top = T.cp_rank_for_keep((8, 6, 3, 3), 1 - 1e-9)
    cp = get_compressor("cp")
    for bad in (0, top + 1, True, 2.0, [2]):
        why = cp.check(t, {"rank": bad})
        assert why.startswith(f"rank must be an integer in [1, {top}]"), why
    assert "R(out + in + kh + kw)" in cp.check(t, {"rank": 0})
    assert cp.check(t, {"rank": top}) is None
    assert "unknown parameter 'seed'" in cp.check(t, {"rank": 2, "seed": 1})
    assert "needs a 'rank'" in cp.check(t, {})

    tucker2 = get_compressor("tucker2")
    why = tucker2.check(t, {"rank": [9, 2]})
    assert "r_out in [1, 8] and r_in in [1, 6]" in why
    assert tucker2.check(t, {"rank": 3}) is not None
    assert tucker2.check(t, {"rank": (8, 6)}) is None

    tt = get_compressor("tt")
    assert "3 ranks (r1, r2, r3" in tt.check(t, {"rank": [2, 2]})
    assert "(in, kh, kw, out)" in tt.check(t, {"rank": [2, 2]})
    why = tt.check(t, {"rank": [1, 6, 1]})
    assert "not reachable by TT-SVD" in why and "[1, 3, 1]" in why

    spatial = get_compressor("spatial")
    assert "[1, 18]" in spatial.check(t, {"rank": 19})
    assert spatial.check(t, {"rank": 18}) is None


def test_tt_check_on_a_conv1d_names_its_order():
    conv = nn.Conv1d(4, 6, 5)
    why = get_compressor("tt").check(target_of(conv), {"rank": [2, 2, 2]})
    assert "2 ranks (r1, r2" in why and "(in, k, out)" in why


# -- supports and fallback ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_layers_fall_back_to_lowrank_with_todays_notes(kind):
    comp = get_compressor(kind)
    method = comp.method
    linear = nn.Linear(8, 6)
    assert comp.fallback(handler_for(linear), linear) == (
        "lowrank",
        f"Linear is a matrix: {method!r} reduces to a matrix factorization; falls back to 'svd'",
    )
    conv3d = nn.Conv3d(4, 6, 3)
    assert comp.fallback(handler_for(conv3d), conv3d) == (
        "lowrank",
        f"no {method!r} factorizer for Conv3d; falls back to 'svd'",
    )
    one = nn.Conv2d(8, 12, 1)
    note = f"1x1 convolution is a matrix: {method!r} falls back to the matrix SVD"
    assert comp.fallback(handler_for(one), one) == ("lowrank", note)
    # supports refuses where fallback applies, so that a resolver may ask either first
    assert comp.supports(handler_for(one), one) == note
    assert comp.supports(handler_for(linear), linear) is not None
    conv = nn.Conv2d(8, 12, 3)
    assert comp.fallback(handler_for(conv), conv) is None
    assert comp.supports(handler_for(conv), conv) is None


def test_spatial_on_conv1d_is_the_matrix_svd():
    comp = get_compressor("spatial")
    conv = nn.Conv1d(4, 6, 5)
    h = handler_for(conv)
    assert comp.fallback(h, conv) == (
        "lowrank",
        "Conv1d has one spatial axis: 'spatial_svd' is the matrix SVD here",
    )
    assert "two spatial axes" in comp.supports(h, conv)


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_and_tiny_convs_are_refused_with_reasons(kind):
    comp = get_compressor(kind)
    grouped = nn.Conv2d(24, 24, 3, groups=4)
    h = handler_for(grouped)
    assert comp.fallback(h, grouped) is None
    assert comp.supports(h, grouped) == (
        f"grouped convolution (groups=4) is not supported by {comp.method!r}"
    )
    dw = nn.Conv2d(8, 8, 3, groups=8)
    assert comp.supports(h, dw).startswith("depthwise convolution (groups=8)")
    tiny = nn.Conv2d(1, 1, (1, 2))
    why = comp.supports(h, tiny)
    assert why is not None and "too small to gain" in why


# -- empty ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_empty_has_the_built_structure(kind):
    conv = conv2d(8, 12, 3, stride=2, padding=1)
    target = target_of(conv)
    comp = get_compressor(kind)
    params = comp.grid(target)[1]
    empty = comp.empty(target, params)
    built, _ = comp.build(target, params)
    assert type(empty) is type(built)
    assert [(n, p.shape) for n, p in empty.named_parameters()] == [
        (n, p.shape) for n, p in built.named_parameters()
    ]
    empty.load_state_dict(built.state_dict())
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(empty(x), built(x))
    via, facts = build_layer(conv, target.handler, [Component(kind, params)], target.site, empty=True)
    assert type(via) is type(built) and facts == {}


# -- float16 overflow -----------------------------------------------------------------------------
def test_factors_that_overflow_float16_are_refused(monkeypatch):
    monkeypatch.setattr("tensorslim.layers.tensor_conv.fit_range", lambda layer, dtype: None)
    conv = nn.Conv2d(8, 12, 3).half()
    with torch.no_grad():
        conv.weight.fill_(60000.0)
    target = target_of(conv, name="body.conv")
    with pytest.raises(UnsupportedLayerError) as e:
        get_compressor("tucker2").build(target, {"rank": [2, 2]})
    msg = str(e.value)
    assert "'body.conv' (Conv2d, float16)" in msg and "do not fit in float16" in msg
    assert "'tucker2' factors at rank [2, 2]" in msg


# -- auto -----------------------------------------------------------------------------------------
def _all_proposals(conv, site):
    h = handler_for(conv)
    out = []
    for comp in auto_members(conv, h):
        target = auto_mod._target(comp, conv, h, site)
        out += comp.proposals(target)
    return out


def test_auto_proposals_pool_several_kinds_on_a_pareto_front():
    conv = conv2d(12, 20, 3, padding=1)
    site = LayerSite("x", None, (1, 20, 8, 8))  # no input shape: no latency guard
    props = auto_proposals(conv, handler_for(conv), site)
    kinds = {p.component.kind for p in props}
    assert len(kinds) >= 2 and kinds <= set(AUTO_KINDS)
    costs = [p.cost.params for p in props]
    errors = [p.error for p in props]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # every proposal of every kind is matched or beaten (cost and error) by an auto proposal
    for o in _all_proposals(conv, site):
        assert any(a.cost.params <= o.cost.params and a.error <= o.error + 1e-12 for a in props)
    # each proposal builds through the one materialize path with the kind it names
    p = props[len(props) // 2]
    layer, _ = build_layer(conv, handler_for(conv), [p.component], site)
    assert layer(torch.randn(1, 12, 8, 8)).shape == (1, 20, 8, 8)


def test_auto_on_matrices_is_the_matrix_svd():
    for layer in (nn.Conv2d(8, 12, 1), nn.Linear(16, 12)):
        h = handler_for(layer)
        assert [c.kind for c in auto_members(layer, h)] == ["lowrank"]
        site = LayerSite("x", None, None)
        props = auto_proposals(layer, h, site)
        assert props and {p.component.kind for p in props} == {"lowrank"}


def test_auto_conv1d_pools_no_spatial_and_grouped_has_a_reason():
    conv = nn.Conv1d(8, 12, 5)
    kinds = [c.kind for c in auto_members(conv, handler_for(conv))]
    assert "spatial" not in kinds and {"lowrank", "cp", "tucker2", "tt"} <= set(kinds)
    grouped = nn.Conv2d(24, 24, 3, groups=4)
    h = handler_for(grouped)
    if not auto_members(grouped, h):
        assert "groups=4" in auto_reason(grouped, h)
    assert auto_reason(conv, handler_for(conv)) is None


def test_auto_proposals_cost_matches_each_kind():
    conv = conv2d(12, 20, 3, padding=1)
    site = LayerSite("x", (1, 12, 8, 8), None)
    h = handler_for(conv)
    for p in auto_proposals(conv, h, site, latency_guard=False):
        comp = get_compressor(p.component.kind)
        target = auto_mod._target(comp, conv, h, site)
        assert comp.cost(target, p.component.params) == p.cost
        assert p.cost.params < math.prod(conv.weight.shape)
