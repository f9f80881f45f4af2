"""Layer handlers (tensorslim.handlers): each layer type assembled around operator modules computes
the dense layer's function, keeps its state-dict layout for low-rank factors, and costs its
parameter count when dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorslim.core.cost import layer_dense_cost
from tensorslim.core.handler import handler_for
from tensorslim.core.materialize import reconstructed
from tensorslim.core.target import LayerSite
from tensorslim.handlers import ConvHandler, HFConv1DHandler, LinearHandler, MHAHandler, RNNHandler
from tensorslim.layers import (
    Compressed,
    LowRankConv,
    LowRankLinear,
    LowRankRNN,
    OpConv,
    OpLinear,
    RoutedMultiheadAttention,
    SumOp,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


# -- operators ------------------------------------------------------------------------------------
class DenseOp(nn.Module):
    """A generic operator: y = x W^T with W held as one matrix (m x n)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T

    def dense_weight(self) -> torch.Tensor:
        return self.w


def svd_op(w: torch.Tensor) -> LowRankLinear:
    """The full-rank factorization W = (U S) Vh as a bias-free LowRankLinear operator."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    m, n = w.shape
    op = LowRankLinear(n, m, s.numel(), bias=False, dtype=w.dtype)
    with torch.no_grad():
        op.first.weight.copy_(vh)
        op.second.weight.copy_(u * s)
    return op


def make_op(kind: str, w: torch.Tensor) -> nn.Module:
    if kind == "lowrank":
        return svd_op(w)
    if kind == "generic":
        return DenseOp(w)
    return SumOp([DenseOp(0.3 * w), svd_op(0.7 * w)])  # "sum": two summands


KINDS = ["lowrank", "generic", "sum"]


def assemble(module: nn.Module, kind: str, skip: tuple[str, ...] = ()) -> nn.Module:
    handler = handler_for(module)
    ops = {p: None if p in skip else make_op(kind, w) for p, w in handler.matrices(module).items()}
    return handler.assemble(module, ops)


# -- layers and inputs ----------------------------------------------------------------------------
def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(nf, nx)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


LINEARS = {
    "linear": (lambda: nn.Linear(12, 7), (3, 5, 12)),
    "linear_nobias": (lambda: nn.Linear(6, 10, bias=False), (4, 6)),
    "hf_conv1d": (lambda: _hf_conv1d(9, 6), (2, 4, 6)),
}
CONVS = {
    "conv1d_stride_dilation": (
        lambda: nn.Conv1d(5, 9, 4, stride=2, padding=3, dilation=2),
        (2, 5, 17),
    ),
    "conv2d_reflect": (
        lambda: nn.Conv2d(3, 7, 3, padding=1, padding_mode="reflect"),
        (2, 3, 9, 8),
    ),
    "conv2d_stride_dilation": (
        lambda: nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1)),
        (2, 4, 11, 13),
    ),
    "conv2d_same_nobias": (
        lambda: nn.Conv2d(3, 5, 3, padding="same", bias=False),
        (1, 3, 7, 7),
    ),
    "conv3d": (lambda: nn.Conv3d(3, 6, (2, 3, 3), padding=1, stride=(1, 2, 1)), (2, 3, 5, 6, 7)),
}
RNNS = {
    "lstm_bidir_2layer": lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True),
    "gru_bidir_2layer": lambda: nn.GRU(5, 7, num_layers=2, bidirectional=True),
    "lstm_batch_first": lambda: nn.LSTM(4, 6, batch_first=True),
    "gru_no_bias": lambda: nn.GRU(4, 6, bias=False),
}
MHAS = {
    "mha_bias": lambda: nn.MultiheadAttention(16, 4),
    "mha_no_bias": lambda: nn.MultiheadAttention(16, 4, bias=False),
    "mha_batch_first": lambda: nn.MultiheadAttention(16, 2, batch_first=True, dropout=0.1),
}


def _double(factory) -> nn.Module:
    torch.manual_seed(0)
    return factory().double().eval()


def _same(a, b) -> None:
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif a is None:
        assert b is None
    else:
        torch.testing.assert_close(a, b, **TOL)


def _mha_calls(mha: nn.MultiheadAttention):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y = torch.randn(3, 7, 16, dtype=torch.float64)
    if not mha.batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, -2:] = True
    return [((x, x, x), {}), ((x, y, y), {"key_padding_mask": mask})]


# -- forward equivalence --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", [*LINEARS, *CONVS])
def test_single_matrix_layers_compute_the_dense_function(case, kind):
    factory, shape = {**LINEARS, **CONVS}[case]
    module = _double(factory)
    new = assemble(module, kind)
    assert isinstance(new, Compressed)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), module(x), **TOL)
    w = handler_for(module).matrices(module)[""]
    got = reconstructed(module, handler_for(module), new)[""]
    torch.testing.assert_close(got.reshape(w.shape), w, **TOL)


@pytest.mark.parametrize("case", [*LINEARS, *CONVS])
def test_single_matrix_replacement_types_and_dense_op(case):
    factory, _ = {**LINEARS, **CONVS}[case]
    module = _double(factory)
    handler = handler_for(module)
    conv = isinstance(handler, ConvHandler)
    assert isinstance(assemble(module, "lowrank"), LowRankConv if conv else LowRankLinear)
    assert isinstance(assemble(module, "generic"), OpConv if conv else OpLinear)
    assert handler.assemble(module, {"": None}) is module


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(RNNS))
@pytest.mark.parametrize("skip", [(), ("weight_ih_l0",)])
def test_rnn_layers_compute_the_dense_function(case, kind, skip):
    module = _double(RNNS[case])
    new = assemble(module, kind, skip)
    assert isinstance(new, LowRankRNN)
    assert new.impl == "fused" or kind == "lowrank"
    x = torch.randn(4, 3, module.input_size, dtype=torch.float64)
    with torch.no_grad():
        _same(new(x), module(x))
    mats = handler_for(module).matrices(module)
    got = new.dense_matrices()
    assert list(got) == list(mats)
    for name, w in mats.items():
        torch.testing.assert_close(got[name], w, **TOL)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_rnn_lowrank_ops_keep_factor_keys_and_both_impls(cls):
    module = _double(lambda: cls(5, 7, num_layers=2, bidirectional=True))
    handler = handler_for(module)
    ops = {p: svd_op(w) for p, w in handler.matrices(module).items()}
    new = LowRankRNN.from_ops(module, ops, impl="lowrank")
    ranks = {p: min(w.shape) for p, w in handler.matrices(module).items()}
    assert new.state_dict().keys() == LowRankRNN.from_dense(module, ranks).state_dict().keys()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        _same(new(x), module(x))
    with pytest.raises(ValueError, match="lowrank"):
        LowRankRNN.from_ops(module, {"weight_hh_l0": DenseOp(module.weight_hh_l0)}, "lowrank")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(MHAS))
@pytest.mark.parametrize("skip", [(), ("in_proj",), ("out_proj",)])
def test_mha_computes_the_dense_function(case, kind, skip):
    module = _double(MHAS[case])
    new = assemble(module, kind, skip)
    assert isinstance(new, RoutedMultiheadAttention)
    new.eval()
    for args, kw in _mha_calls(module):
        with torch.no_grad():
            _same(new(*args, **kw), module(*args, **kw))
    mats = handler_for(module).matrices(module)
    got = new.dense_matrices()
    assert list(got) == list(mats)
    for name, w in mats.items():
        torch.testing.assert_close(got[name], w, **TOL)
    if "in_proj" in skip:
        assert isinstance(new.in_proj, nn.Linear)


def test_mha_without_ops_is_unchanged():
    module = nn.MultiheadAttention(8, 2)
    assert handler_for(module).assemble(module, {"in_proj": None, "out_proj": None}) is module


# -- state-dict layout of low-rank replacements ---------------------------------------------------
def test_lowrank_state_dict_keys_match_the_dense_factorizations():
    lin = nn.Linear(12, 7)
    assert (
        assemble(lin, "lowrank").state_dict().keys()
        == LowRankLinear.from_dense(lin, 7).state_dict().keys()
    )
    conv = nn.Conv2d(3, 7, 3, padding=1)
    assert (
        assemble(conv, "lowrank").state_dict().keys()
        == LowRankConv.from_dense(conv, 7).state_dict().keys()
    )
    mha = nn.MultiheadAttention(8, 2)
    keys = set(assemble(mha, "lowrank").state_dict())
    assert keys == {
        f"{p}.{k}"
        for p in ("in_proj", "out_proj")
        for k in ("first.weight", "second.weight", "second.bias")
    }


def test_lowrank_conv_from_factors_checks_shapes():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="do not fit"):
        LowRankConv.from_factors(torch.randn(4, 2), torch.randn(2, 5), conv)
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv.from_factors(
            torch.randn(4, 2), torch.randn(2, 18), nn.Conv2d(4, 4, 3, groups=2)
        )


# -- dense cost -----------------------------------------------------------------------------------
def _site(module: nn.Module, x: torch.Tensor) -> LayerSite:
    args = (x, x, x) if isinstance(module, nn.MultiheadAttention) else (x,)
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, tuple):
        out = out[0]
    return LayerSite("layer", tuple(x.shape), tuple(out.shape))


ALL = {
    **{k: v for k, v in {**LINEARS, **CONVS}.items()},
    **{k: (f, (4, 3, 5 if "bidir" in k else 4)) for k, f in RNNS.items()},
    **{k: (f, (5, 3, 16)) for k, f in MHAS.items()},
}


@pytest.mark.parametrize("case", list(ALL))
def test_layer_dense_cost_is_the_parameter_count(case):
    factory, shape = ALL[case]
    module = _double(factory)
    handler = handler_for(module)
    site = _site(module, torch.randn(*shape, dtype=torch.float64))
    cost = layer_dense_cost(module, handler, site)
    assert cost.params == sum(p.numel() for p in module.parameters())
    assert cost.bits == 64 * cost.params
    mats = handler.matrices(module)
    assert cost.flops == sum(
        2 * p * mats[k].numel() for k, p in handler.positions(module, site).items()
    )
    assert cost.flops > 0
    assert layer_dense_cost(module, handler, LayerSite("layer")).flops is None


def test_positions_count_output_vectors_and_tokens():
    lin = nn.Linear(6, 4)
    assert LinearHandler().positions(lin, LayerSite("", (2, 3, 6), (2, 3, 4))) == {"": 6}
    conv = nn.Conv2d(3, 5, 3)
    assert ConvHandler().positions(conv, LayerSite("", None, (2, 5, 4, 4))) == {"": 32}
    lstm = nn.LSTM(5, 7, bidirectional=True)
    pos = RNNHandler().positions(lstm, LayerSite("", (9, 2, 5), None))
    assert set(pos.values()) == {18} and len(pos) == 4
    mha = nn.MultiheadAttention(8, 2)
    assert MHAHandler().positions(mha, LayerSite("", (5, 3, 8), None)) == {
        "in_proj": 15,
        "out_proj": 15,
    }


# -- layer view: matrices, packing, refusals ------------------------------------------------------
def test_handler_registry_and_names():
    assert isinstance(handler_for(nn.Linear(2, 2)), LinearHandler)
    assert isinstance(handler_for(nn.Conv3d(2, 2, 1)), ConvHandler)
    assert isinstance(handler_for(nn.GRU(2, 2)), RNNHandler)
    assert isinstance(handler_for(nn.MultiheadAttention(4, 1)), MHAHandler)
    assert handler_for(nn.ConvTranspose2d(2, 2, 3)) is None
    assert handler_for(nn.LayerNorm(3)) is None
    names = {h.name for h in (LinearHandler, ConvHandler, HFConv1DHandler, MHAHandler, RNNHandler)}
    assert names == {"linear", "conv", "hf_conv1d", "mha", "rnn"}


def test_hf_conv1d_matrix_is_the_transposed_weight():
    layer = _hf_conv1d(9, 6)
    handler = handler_for(layer)
    assert isinstance(handler, HFConv1DHandler)
    torch.testing.assert_close(handler.matrices(layer)[""], layer.weight.T)
    grad = torch.randn(6, 9)
    torch.testing.assert_close(handler.grad_matrix(layer, "", grad), grad.T)
    assert handler.extra_params(layer).keys() == {"bias"}


def test_matrices_and_extra_params():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    h = handler_for(lstm)
    assert list(h.matrices(lstm)) == [
        f"weight_{k}_l{i}{s}" for i in (0, 1) for s in ("", "_reverse") for k in ("ih", "hh")
    ]
    assert all(n.startswith("bias_") for n in h.extra_params(lstm))
    mha = nn.MultiheadAttention(8, 2)
    shapes = {k: tuple(w.shape) for k, w in handler_for(mha).matrices(mha).items()}
    assert shapes == {"in_proj": (24, 8), "out_proj": (8, 8)}
    assert handler_for(mha).extra_params(mha).keys() == {"in_proj_bias", "out_proj.bias"}
    conv = nn.Conv2d(3, 5, (2, 3))
    assert handler_for(conv).matrices(conv)[""].shape == (5, 18)
    assert handler_for(conv).kernel(conv).shape == (5, 3, 2, 3)
    assert handler_for(nn.Linear(3, 2, bias=False)).extra_params(nn.Linear(3, 2, bias=False)) == {}


def test_pack_as_plans_store_it():
    lin = nn.Linear(4, 4)
    assert handler_for(lin).pack(lin, {"": 3}) == 3
    mha = nn.MultiheadAttention(8, 2)
    assert MHAHandler().pack(mha, {"in_proj": 4, "out_proj": 2}) == [4, 2]
    assert MHAHandler().pack(mha, {"in_proj": 4, "out_proj": None}) == {
        "in_proj": 4,
        "out_proj": None,
    }
    gru = nn.GRU(3, 4)
    assert RNNHandler().pack(gru, {"weight_hh_l0": 2}) == {"weight_ih_l0": None, "weight_hh_l0": 2}


def test_unsupported_reasons():
    assert ConvHandler().unsupported_reason(nn.Conv2d(4, 4, 3, groups=4)) == (
        "depthwise convolution (groups=4) is not supported yet"
    )
    assert "grouped convolution (groups=2)" in ConvHandler().unsupported_reason(
        nn.Conv2d(4, 6, 3, groups=2)
    )
    assert ConvHandler().unsupported_reason(nn.Conv2d(4, 6, 3)) is None
    assert "proj_size" in RNNHandler().unsupported_reason(nn.LSTM(3, 4, proj_size=2))
    assert RNNHandler().unsupported_reason(nn.LSTM(3, 4)) is None
    assert "kdim" in MHAHandler().unsupported_reason(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    assert "add_zero_attn" in MHAHandler().unsupported_reason(
        nn.MultiheadAttention(8, 2, add_zero_attn=True)
    )
    assert MHAHandler().unsupported_reason(nn.MultiheadAttention(8, 2)) is None


def test_calibration_reasons():
    assert ConvHandler().calibration_reason(nn.Conv2d(3, 4, 3, padding=1)) is None
    assert "padding_mode" in ConvHandler().calibration_reason(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    )
    assert "padding='same'" in ConvHandler().calibration_reason(nn.Conv1d(3, 4, 3, padding="same"))
    assert "Conv3d" in ConvHandler().calibration_reason(nn.Conv3d(3, 4, 3))
    assert RNNHandler().calibration_reason(nn.GRU(3, 4)) is None
    assert LinearHandler().calibration_reason(nn.Linear(3, 4)) is None
    assert MHAHandler().calibration_reason(nn.MultiheadAttention(8, 2)) is None


def test_rows_of_linear_conv_and_mha():
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(LinearHandler().rows(lin, (x,), {}, None)[""], x.reshape(10, 6))
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 6)
    rows = ConvHandler().rows(conv, (x,), {}, None)[""]
    w = conv.weight.detach().reshape(4, -1)
    out = conv(x).detach() - conv.bias.detach().view(1, 4, 1, 1)
    torch.testing.assert_close(rows @ w.T, out.permute(0, 2, 3, 1).reshape(-1, 4), **TOL)
    mha = nn.MultiheadAttention(8, 2).eval()
    q = torch.randn(5, 2, 8)
    kv = torch.randn(4, 2, 8)
    parts = MHAHandler().rows(mha, (q, kv, kv), {"need_weights": True}, None)
    assert parts["in_proj"].shape == (10 + 8 + 8, 8)
    ctx = parts["out_proj"]
    with torch.no_grad():
        ref = mha(q, kv, kv, need_weights=False)[0].reshape(-1, 8)
        torch.testing.assert_close(mha.out_proj(ctx), ref, **TOL)
