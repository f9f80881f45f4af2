"""The learning-compression algorithm (tensorslim.lc): C steps, the LC loop, resume, bad inputs,
the `lc` command."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tensorslim
from tensorslim import lc
from tensorslim.core.compressor import (
    Compressor,
    Cost,
    compressor_class,
    dtype_bits,
    get_compressor,
    register_compressor,
    unregister_compressor,
)
from tensorslim.errors import TensorSlimError
from tensorslim.layers.lowrank_linear import LowRankLinear

HAS_QUANT = compressor_class("quant") is not None
HAS_SPARSE = compressor_class("sparse") is not None


# -- a local test double: keep the k entries of largest magnitude (an l0 projection) -------------
class _DenseOp(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def dense_weight(self) -> torch.Tensor:
        return self.weight


class TopK(Compressor):
    """Params {"k": k}: the k largest-magnitude entries, the rest zero."""

    @dataclass(frozen=True)
    class Options:
        pass

    def check(self, target, params):
        k = params.get("k")
        ok = isinstance(k, int) and 1 <= k <= target.shape[0] * target.shape[1]
        return None if ok else f"k must be an integer in [1, m*n]; got {k!r}"

    def cost(self, target, params):
        k = int(params["k"])
        return Cost(2 * k, k * (dtype_bits(target.dtype) + 32), None)

    def grid(self, target):
        return [{"k": 1}]

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        flat = weight.detach().reshape(-1)
        keep = torch.topk(flat.abs(), int(params["k"])).indices
        out = torch.zeros_like(flat)
        out[keep] = flat[keep]
        return out.reshape(weight.shape)

    def build(self, target, params):
        return _DenseOp(self.project(target.weight, params)), {}

    def empty(self, target, params):
        return _DenseOp(torch.zeros(target.shape, dtype=target.dtype))


class Noisy(TopK):
    """A bad projection: a random matrix every other call (the additive C step must not take it)."""

    calls = 0

    def project(self, weight, params):
        Noisy.calls += 1
        if Noisy.calls % 2 == 0:
            return torch.randn_like(weight) * 10
        return super().project(weight, params)


@pytest.fixture(autouse=True)
def _doubles():
    register_compressor("lc_topk")(TopK)
    register_compressor("lc_noisy")(Noisy)
    yield
    unregister_compressor("lc_topk")
    unregister_compressor("lc_noisy")


def _rank(w: torch.Tensor) -> int:
    """Numerical rank of a float32-rounded matrix."""
    return int(torch.linalg.matrix_rank(w.detach().double(), rtol=1e-5))


def _parts(*specs: tuple[str, dict]) -> list[lc.Part]:
    return [lc.Part(get_compressor(kind), params) for kind, params in specs]


# -- C step ---------------------------------------------------------------------------------------
def _additive_specs() -> list[list[tuple[str, dict]]]:
    out = [[("lowrank", {"rank": 2}), ("lc_topk", {"k": 40})]]
    if HAS_QUANT:
        out.append([("quant", {"bits": 2}), ("lowrank", {"rank": 2})])
        out.append([("quant", {"bits": 1}), ("lowrank", {"rank": 1}), ("lc_topk", {"k": 20})])
    if HAS_SPARSE:
        out.append([("lowrank", {"rank": 2}), ("sparse", {"nonzeros": 40})])
    return out


@pytest.mark.parametrize("spec", _additive_specs(), ids=lambda s: "+".join(k for k, _ in s))
def test_additive_c_step_never_increases_the_residual(spec):
    torch.manual_seed(1)
    x = torch.randn(30, 20) + 0.3 * torch.randn(30, 1) @ torch.randn(1, 20)
    proj = lc.c_step(x, _parts(*spec), mu=0.0, max_rounds=40)
    res = proj.residuals
    assert len(res) >= 3
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res, res[1:])), res
    # the sum fits better than any of its parts alone
    for kind, params in spec:
        alone = lc.c_step(x, _parts((kind, params)), mu=0.0).residuals[-1]
        assert res[-1] < alone
    # a warm start from the answer moves nowhere worse
    again = lc.c_step(x, _parts(*spec), 0.0, proj.values, proj.params)
    assert again.residuals[-1] <= res[-1] * (1 + 1e-12)
    torch.testing.assert_close(proj.total, sum(proj.values))


def test_additive_c_step_refuses_a_worse_part():
    torch.manual_seed(2)
    x = torch.randn(16, 12)
    proj = lc.c_step(x, _parts(("lowrank", {"rank": 2}), ("lc_noisy", {"k": 10})), 0.0)
    res = proj.residuals
    assert all(b <= a for a, b in zip(res, res[1:]))
    assert float((proj.values[1] != 0).sum()) <= 10  # the random answers were never taken


def test_rank_selection_minimises_its_objective():
    torch.manual_seed(3)
    x = torch.randn(40, 25) @ torch.diag(torch.logspace(0, -2, 25))
    s = torch.linalg.svdvals(x.double())
    for alpha, mu in [(1e-4, 1.0), (1e-3, 1.0), (1e-2, 1.0), (1e-3, 10.0)]:
        value, r, obj = lc.select_rank(x, alpha, mu, unit_cost=65.0)
        brute = [alpha * 65 * k + mu / 2 * float((s[k:] ** 2).sum()) for k in range(1, 26)]
        assert r == 1 + min(range(25), key=brute.__getitem__)
        assert obj == pytest.approx(min(brute), rel=1e-9)
        assert _rank(value) == r
    ranks = [lc.select_rank(x, a, 1.0, 65.0)[1] for a in (1e-5, 1e-4, 1e-3, 1e-2)]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]


# -- the LC loop on a tiny model ------------------------------------------------------------------
def _task(n: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :4] @ torch.randn(4, 3, generator=g)).argmax(1)
    return x, y


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids the synchronisation costs of a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@functools.cache
def _trained_once(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 24), nn.ReLU(),
        nn.Linear(24, 3),
    )
    x, y = _task()
    tensorslim.train.fit(model, x, y, epochs=15, lr=1e-2)
    return model


def _trained(dropout: float = 0.0) -> nn.Module:
    """A small trained MLP (a fresh copy each call)."""
    return copy.deepcopy(_trained_once(dropout))


FAST = {"steps": 4, "mu0": 1e-2, "growth": 2.0, "lr": 0.05}


def test_lc_lowrank_reaches_the_ranks_and_a_loadable_plan(tmp_path):
    model = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    specs = {"0": [{"kind": "lowrank", "rank": 2}], "3": {"kind": "lowrank", "alpha": 2e-4}}
    small, res = lc.compress(model, specs, _task(), schedule=FAST)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert isinstance(small[0], LowRankLinear) and small[0].rank == 2
    assert isinstance(small[3], LowRankLinear)
    chosen = res.specs["3"][0]["rank"]
    assert res.history[-1]["ranks"]["3"] == [chosen] and 1 <= chosen <= 24
    for i, r in ((0, 2), (3, chosen)):
        assert _rank(small[i].dense_weight()) <= r
    assert isinstance(small[5], nn.Linear)  # not named: dense and trained
    assert res.build_error < 1e-5
    assert [h["step"] for h in res.history] == [1, 2, 3, 4]
    assert [h["mu"] for h in res.history] == pytest.approx([1e-2, 2e-2, 4e-2, 8e-2])
    assert res.history[-1]["violation"] < res.direct["violation"]
    plan = res.plan
    assert plan.meta["lc"]["mode"] == "lc" and plan.layer("5").reason == "not named by the specs"
    assert plan.model_bits_after < plan.model_bits_before and res.compression_ratio > 1
    tensorslim.save(small, plan, tmp_path / "out")
    loaded = tensorslim.load(_trained(), tmp_path / "out")
    x = _task()[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_lc_sum_of_components_and_baselines_stay_feasible():
    model = _trained()
    spec = [{"kind": "lowrank", "rank": 2}, {"kind": "lc_topk", "k": 30}]
    small, res = lc.compress(model, {"0": spec}, _task(), schedule=FAST)
    ops = small[0].op.ops
    low, top = ops[0], ops[1]
    assert _rank(low.dense_weight()) <= 2
    assert int((top.dense_weight() != 0).sum()) <= 30
    assert res.build_error < 1e-5 and res.history[-1]["c_rounds"] >= 1
    for how in ("reproject", "modules"):
        base, r = lc.finetune(model, {"0": [{"kind": "lowrank", "rank": 2}]}, _task(),
                              how=how, schedule=FAST)
        assert r.mode == how and len(r.history) == 4
        assert _rank(base[0].dense_weight()) <= 2


@pytest.mark.skipif(not (HAS_QUANT and HAS_SPARSE), reason="needs the quant and sparse kinds")
def test_lc_quantized_and_pruned_weights_are_feasible(tmp_path):
    model = _trained()
    spec = {"0": [{"kind": "quant", "bits": 2}], "3": [{"kind": "sparse", "nonzeros": 50}],
            "5": [{"kind": "quant", "bits": 1}, {"kind": "sparse", "nonzeros": 10}]}
    small, res = lc.compress(model, spec, _task(), schedule=FAST)
    w0 = small[0].dense_weight().detach()
    assert torch.unique(w0).numel() <= 4
    assert int((small[3].dense_weight() != 0).sum()) <= 50
    q, p = small[5].op.ops
    assert torch.unique(q.dense_weight().detach()).numel() <= 2
    assert int((p.dense_weight() != 0).sum()) <= 10
    assert res.build_error < 1e-5
    # one codebook per output row: at most 2^b values in each row; the plan rebuilds it on load
    opts = {"quant": {"per_channel": True}}
    small, res = lc.compress(model, {"0": [{"kind": "quant", "bits": 1}]}, _task(),
                             schedule=FAST, options=opts)
    w0 = small[0].dense_weight().detach()
    assert max(torch.unique(row).numel() for row in w0) <= 2 < torch.unique(w0).numel()
    tensorslim.save(small, res.plan, tmp_path / "q")
    loaded = tensorslim.load(_trained(), tmp_path / "q")
    torch.testing.assert_close(loaded[0].dense_weight(), small[0].dense_weight())


def test_resume_after_an_interrupt_gives_the_same_model(tmp_path):
    model = _trained(dropout=0.2)  # dropout: the random state must be restored too
    spec = {"0": [{"kind": "lowrank", "rank": 3}, {"kind": "lc_topk", "k": 20}],
            "3": [{"kind": "lowrank", "alpha": 1e-4}]}
    kw = {"schedule": {**FAST, "steps": 5}, "seed": 7}
    full, ref = lc.compress(model, spec, _task(), **kw)

    class Stop(Exception):
        pass

    def stop_after_2(step, record):
        if step == 2:
            raise Stop

    ck = tmp_path / "ck"
    with pytest.raises(Stop):
        lc.compress(model, spec, _task(), checkpoint=ck, on_step=stop_after_2, **kw)
    assert json.loads((ck / "progress.json").read_text())["next_step"] == 2
    with pytest.raises(TensorSlimError, match="resume"):
        lc.compress(model, spec, _task(), checkpoint=ck, resume=False, **kw)
    with pytest.raises(TensorSlimError, match="different run"):
        lc.compress(model, spec, _task(), checkpoint=ck, **{**kw, "seed": 8})
    again, res = lc.compress(model, spec, _task(), checkpoint=ck, **kw)
    assert res.resumed_at == 2
    for (k, a), (k2, b) in zip(full.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res.history) == strip(ref.history)
    # a finished checkpoint returns at once with the same model
    third, res3 = lc.compress(model, spec, _task(), checkpoint=ck, **kw)
    assert res3.resumed_at == 5 and torch.equal(third[0].op.ops[0].dense_weight(),
                                                full[0].op.ops[0].dense_weight())


def test_batchnorm_statistics_are_recalibrated_on_the_compressed_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _task()
    spec = {"0": [{"kind": "lowrank", "rank": 1}]}
    small, res = lc.compress(net, spec, (x, y), schedule={**FAST, "steps": 1}, recalibrate=3)
    bn = small[1]
    assert res.recalibrated == 3 and int(bn.num_batches_tracked) == 3
    assert bn.momentum == net[1].momentum and res.plan.meta["lc"]["recalibrated_batches"] == 3
    # the statistics are those of the compressed layer's outputs: the mean of the batch means
    batches = [b for _, b in lc.data.LabeledData((x, y), None, 0).batches(-1)][:3]
    with torch.no_grad():
        means = torch.stack([small[0](xb).mean(0) for xb, _ in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    _, res0 = lc.compress(_trained(), [{"kind": "lowrank", "rank": 2}], (x, y),
                          schedule={**FAST, "steps": 1}, recalibrate=3)
    assert res0.recalibrated == 0  # no BatchNorm: nothing to do


# -- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs_are_refused_with_clear_messages():
    model = _trained()
    spec = [{"kind": "lowrank", "rank": 2}]
    x, y = _task()
    cases = [
        ((model, spec, []), {}, "data is empty"),
        ((model, spec, (x[:0], y[:0])), {}, "data is empty"),
        ((model, spec, iter([(x, y)])), {}, "one-shot iterator"),
        ((model, spec, [x]), {}, "not an \\(inputs, targets\\) pair"),
        ((model, {"head.*": spec}, (x, y)), {}, "pattern 'head.\\*' matches no layer"),
        ((model, {"3": [{"kind": "lowrank", "rank": 99}]}, (x, y)), {}, "layer '3'.*rank"),
        ((model, 0.25, (x, y)), {}, "not a budget"),
        ((model, spec, (x, y)), {"schedule": [1e-3, 1e-2, 5e-3]}, "must be increasing"),
        ((model, spec, (x, y)), {"schedule": {"growth": 0.9}}, "growth must be > 1"),
        ((model, spec, (x, y)), {"schedule": {"epochs": 1, "batches": 3}}, "one of epochs"),
        ((model, {"0": [{"kind": "lowrank", "alpha": -1}]}, (x, y)), {}, "alpha must be"),
        ((model, {"0": [{"kind": "tucker2", "rank": [2, 2]}]}, (x, y)), {}, "whole layer"),
        ((model, [{"kind": "nope"}], (x, y)), {}, "unknown compressor 'nope'"),
        (("model", spec, (x, y)), {}, "nn.Module"),
        ((model, spec, (x, y)), {"recalibrate": -1}, "recalibrate must be"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(TensorSlimError, match=match):
            lc.compress(*args, **kwargs)
    with pytest.raises(TensorSlimError, match="how must be"):
        lc.finetune(model, spec, (x, y), how="nope")
    with pytest.raises(TensorSlimError, match="NaN"):
        lc.compress(model, spec, (x * float("nan"), y), schedule={"steps": 1})


# -- the command line -----------------------------------------------------------------------------
def test_cli_lc_end_to_end_with_resume(tmp_path):
    from safetensors.torch import save_file

    from tensorslim.cli import app

    src = tmp_path / "nets.py"
    src.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),\n"
        "                         nn.Linear(24, 3))\n"
    )
    model = _trained()
    net = nn.Sequential(*[m for i, m in enumerate(model) if i != 2])  # same layers, no dropout
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    x, y = _task()
    data = tmp_path / "d.safetensors"
    save_file({"inputs": x, "targets": y}, str(data))
    run = CliRunner().invoke
    base = ["lc", "--model", f"{src}:make", "--weights", weights, "--data", data, "--steps", "3",
            "--mu0", "0.01", "--growth", "2", "--lr", "0.05"]
    args = [str(a) for a in [*base, "--spec", '[{"kind": "lowrank", "rank": 3}]',
                             "--checkpoint", tmp_path / "ck", "--out", tmp_path / "out"]]
    r = run(app, args)
    assert r.exit_code == 0, r.output
    assert "rel. violation" in r.output and "Saved to" in r.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["meta"]["lc"]["steps"] == 3 and plan["layers"][0]["spec"][0]["rank"] == 3
    r = run(app, args)  # the checkpoint exists: --resume is required
    assert r.exit_code == 2 and "--resume" in r.output
    r = run(app, [*args, "--resume"])
    assert r.exit_code == 0 and "Resumed from" in r.output, r.output
    per_layer = [str(a) for a in [*base, "--spec", '0=[{"kind": "lowrank", "rank": 2}]',
                                  "--spec", '4=[{"kind": "lowrank", "alpha": 1e-4}]',
                                  "--baseline", "modules", "--out", tmp_path / "b"]]
    r = run(app, per_layer)
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["allocator"] == "modules" and plan["layers"][2]["spec"][0]["kind"] == "lowrank"
    r = run(app, [str(a) for a in [*base, "--spec", "[oops", "--out", tmp_path / "c"]])
    assert r.exit_code == 2 and "not valid JSON" in r.output
