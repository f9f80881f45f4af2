"""Recovery without labels: tensorslim.recover distils the original into the compressed model."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from models import mlp
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import tensorslim
from tensorslim.cli import app
from tensorslim.errors import TensorSlimError
from tensorslim.train.distill import pick_output


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train ~50x faster on one thread when the machine is busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def inputs(n, shape, seed=1, dims=6):
    """Random unlabeled inputs near a `dims`-dimensional subspace (as real data is): SVD, which
    never sees data, keeps directions the data does not use, and distillation can fix that."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    x = torch.randn(n, dims, generator=g) @ torch.randn(dims, d, generator=g)
    return (x + 0.05 * torch.randn(n, d, generator=g)).reshape(n, *shape)


def compressed_pair(make, shape, keep=0.3):
    torch.manual_seed(0)
    original = make().eval()
    small, plan = tensorslim.compress(
        original, keep, method="svd", example_input=torch.zeros(2, *shape)
    )
    assert plan.factorized_layers
    return original, small, plan


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- it recovers ----------------------------------------------------------------------------------
def test_mlp_recovers_on_unlabeled_tensor_and_records_plan():
    original, small, plan = compressed_pair(mlp, (1, 8, 8))
    x = inputs(512, (1, 8, 8))
    before = snapshot(original)
    original.train()  # the caller's modes are restored
    small.eval()
    rng = torch.get_rng_state()
    r = tensorslim.recover(small, original, x, epochs=8, lr=3e-3, plan=plan)
    assert isinstance(r, tensorslim.RecoverResult)
    assert r.per == "epoch" and len(r.losses) == 8 and r.epochs == 8
    assert r.steps == 8 * 16 and r.resumed_at == 0 and r.seconds > 0
    assert r.loss_after < 0.5 * r.loss_before, r.summary()
    assert r.cosine_after > r.cosine_before + 0.2 and r.cosine_after > 0.9, r.summary()
    assert r.losses[-1] < r.losses[0]
    assert set(r.terms_before) == {"output"}
    # the original is never modified, modes and the global RNG are as they were
    assert same(before, original.state_dict())
    assert all(m.training for m in original.modules())
    assert not any(m.training for m in small.modules())
    assert torch.equal(rng, torch.get_rng_state())
    [rec] = plan.meta["recover"]
    assert rec["epochs"] == 8 and rec["steps"] is None and rec["lr"] == 3e-3
    assert rec["features"] == [] and rec["final_loss"] == r.losses[-1]
    assert rec["loss_after"] == r.loss_after and rec["seconds"] >= 0
    json.loads(plan.to_json())  # the record is plain JSON
    tensorslim.recover(small, original, x, steps=2, plan=plan)
    assert len(plan.meta["recover"]) == 2 and plan.meta["recover"][1]["steps"] == 2


def test_cnn_recovers_on_batch_list_with_features():
    original, small, _ = compressed_pair(cnn, (3, 8, 8))
    x = inputs(384, (3, 8, 8), seed=2)
    batches = list(x.split(32))
    before = snapshot(original)
    r = tensorslim.recover(small, original, batches, epochs=5, lr=1e-3, features=["2", "7"])
    assert r.loss_after < 0.5 * r.loss_before, r.summary()
    assert r.cosine_after > r.cosine_before and r.cosine_after > 0.95, r.summary()
    assert set(r.terms_before) == {"output", "2", "7"}
    for name in ("output", "2", "7"):
        assert r.terms_after[name] < r.terms_before[name], (name, r.terms_after)
    assert abs(sum(r.terms_before.values()) - r.loss_before) < 1e-6 * (1 + r.loss_before)
    assert same(before, original.state_dict())
    assert all(not m.training for m in original.modules())


def test_steps_over_a_generator_dict_inputs_and_model_outputs():
    class KwModel(nn.Module):  # keyword inputs, a dict output with logits
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, pixels, scale=1.0):
            return {"hidden": pixels.flatten(1), "logits": self.body(pixels) * scale}

    original, small, _ = compressed_pair(KwModel, (1, 8, 8))
    x = inputs(256, (1, 8, 8))
    gen = ({"pixels": b, "scale": 2.0} for b in x.split(16))
    r = tensorslim.recover(small, original, gen, steps=16, lr=3e-3)
    assert r.per == "step" and len(r.losses) == 16 and r.steps == 16
    assert r.loss_after < r.loss_before
    # a dict of tensors splits like a tensor, each batch a dict of keyword inputs
    r = tensorslim.recover(small, original, {"pixels": x}, steps=3, batch_size=100, progress=True)
    assert r.steps == 3


def test_pick_output_rules():
    a, b = torch.ones(2), torch.zeros(3)
    assert pick_output(a) is a
    assert pick_output((torch.ones(2, dtype=torch.long), a, b)) is a
    assert pick_output({"pooler_output": b, "last_hidden_state": a}) is a
    assert pick_output({"last_hidden_state": b, "logits": a}) is a
    assert pick_output({"x": [torch.arange(3), {"y": b}]}) is b
    assert pick_output(torch.arange(3)) is None and pick_output("text") is None


# -- refusals -------------------------------------------------------------------------------------
def test_argument_errors():
    original, small, plan = compressed_pair(mlp, (1, 8, 8))
    x = inputs(64, (1, 8, 8))
    cases = [
        ({}, "exactly one of epochs"),
        ({"epochs": 1, "steps": 2}, "exactly one of epochs"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"steps": True}, "steps must be an integer >= 1"),
        ({"epochs": 1.5}, "epochs must be"),
        ({"epochs": 1, "lr": 0}, "lr must be a finite number > 0"),
        ({"epochs": 1, "lr": float("nan")}, "lr must be"),
        ({"epochs": 1, "lr": float("inf")}, "lr must be"),
        ({"epochs": 1, "lr": "1e-3"}, "lr must be"),
        ({"epochs": 1, "lr": -1e-3}, "lr must be"),
        ({"epochs": 1, "features": "net.1"}, "features must be a list"),
        ({"epochs": 1, "features": ["nope"]}, "no module of that name"),
        ({"epochs": 1, "features": ["1", "1"]}, "named twice"),
        ({"epochs": 1, "batch_size": 0}, "batch_size must be"),
        ({"epochs": 1, "plan": {"meta": {}}}, "plan must be a tensorslim Plan"),
        ({"epochs": 1, "seed": "0"}, "seed must be an integer"),
        ({"epochs": 1, "checkpoint_every": 0}, "checkpoint_every must be"),
    ]
    before = snapshot(small)
    for kwargs, message in cases:
        with pytest.raises(TensorSlimError, match=message):
            tensorslim.recover(small, original, x, **kwargs)
    data_cases = [
        ([], "data is empty"),
        (torch.zeros(0, 1, 8, 8), "0 rows"),
        (torch.tensor(1.0), "0-d tensor"),
        ("inputs.npy", "data must be"),
        (42, "data must be"),
        ({"a": torch.zeros(4, 64), "b": torch.zeros(5, 64)}, "same length"),
        ({"a": [1, 2]}, "input names to tensors"),
    ]
    for data, message in data_cases:
        with pytest.raises(TensorSlimError, match=message):
            tensorslim.recover(small, original, data, epochs=1)
    with pytest.raises(TensorSlimError, match="batch_size is for data given as a tensor"):
        tensorslim.recover(small, original, list(x.split(8)), epochs=1, batch_size=8)
    with pytest.raises(TensorSlimError, match="same module"):
        tensorslim.recover(original, original, x, epochs=1)
    with pytest.raises(TensorSlimError, match="shares parameters"):
        tensorslim.recover(nn.Sequential(*original), original, x, epochs=1)
    with pytest.raises(TensorSlimError, match="must be a torch nn.Module"):
        tensorslim.recover(small, "model", x, epochs=1)
    assert same(before, small.state_dict())


def test_one_shot_iterators():
    original, small, _ = compressed_pair(mlp, (1, 8, 8))
    batches = list(inputs(64, (1, 8, 8)).split(16))  # 4 batches
    with pytest.raises(TensorSlimError, match="one-shot iterator.*epochs=1"):
        tensorslim.recover(small, original, iter(batches), epochs=2)
    assert tensorslim.recover(small, original, iter(batches), epochs=1).steps == 4
    assert tensorslim.recover(small, original, iter(batches), steps=4).steps == 4
    with pytest.raises(TensorSlimError, match=r"ran out after 4 batches, at step 5 of 6"):
        tensorslim.recover(small, original, iter(batches), steps=6)
    # a list is read again every epoch
    assert tensorslim.recover(small, original, batches, steps=6).steps == 6


def test_mismatched_outputs_and_bad_inputs():
    original, small, _ = compressed_pair(mlp, (1, 8, 8))
    x = inputs(64, (1, 8, 8))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(
        TensorSlimError, match=r"output of the compressed model \(\(32, 5\)\).*\(32, 10\)"
    ):
        tensorslim.recover(other, original, x, epochs=1)
    with pytest.raises(TensorSlimError, match="rejected batch 0"):
        tensorslim.recover(small, original, torch.zeros(8, 3), epochs=1)
    with pytest.raises(TensorSlimError, match="no floating-point tensor"):
        tensorslim.recover(
            nn.Sequential(mlp(), nn.Flatten()), nn.Sequential(mlp(), _Argmax()), x, epochs=1
        )


class _Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


def test_nan_loss_names_the_step():
    original, small, _ = compressed_pair(mlp, (1, 8, 8))
    batches = list(inputs(96, (1, 8, 8)).split(16))
    batches[4] = batches[4].clone()
    batches[4][0, 0, 0, 0] = float("nan")
    with pytest.raises(TensorSlimError, match=r"NaN/Inf at step 5 \(epoch 1, batch 5.*the batch"):
        tensorslim.recover(small, original, batches, epochs=1, eval_batches=2)
    for p in small.parameters():
        assert torch.isfinite(p).all()
    with pytest.raises(TensorSlimError, match="before training"):
        tensorslim.recover(small, original, batches[4:], epochs=1)


# -- checkpoints ----------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_resume_after_interrupt_gives_identical_weights(tmp_path):
    original, start, plan = compressed_pair(cnn, (3, 8, 8))
    x = inputs(160, (3, 8, 8), seed=3)  # 5 batches of 32, reshuffled every epoch; dropout on
    kwargs = {"epochs": 4, "lr": 1e-3, "features": ["2"]}

    straight = copy.deepcopy(start)
    ref = tensorslim.recover(straight, original, x, **kwargs)

    def interrupt(epoch, model):
        if epoch == 2:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    first = copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        tensorslim.recover(first, original, x, checkpoint=ck, on_epoch=interrupt, **kwargs)
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["progress"]["epoch"] == 2 and progress["progress"]["step"] == 10
    assert (ck / "state.safetensors").is_file() and (ck / ".tensorslim").is_file()

    resumed = copy.deepcopy(start)  # a fresh process would load the compressed model again
    r = tensorslim.recover(resumed, original, x, checkpoint=ck, **kwargs)
    assert r.resumed_at == 10 and r.steps == 20 and r.epochs == 4
    assert same(snapshot(straight), snapshot(resumed))
    assert r.losses == ref.losses
    assert r.loss_before == ref.loss_before and r.loss_after == ref.loss_after

    # a finished checkpoint: the same call returns at once with the same weights
    again = copy.deepcopy(start)
    r2 = tensorslim.recover(again, original, x, checkpoint=ck, plan=plan, **kwargs)
    assert r2.resumed_at == 20 and same(snapshot(straight), snapshot(again))
    assert plan.meta["recover"][0]["steps_run"] == 20

    # other arguments or other data: refused, naming what differs
    with pytest.raises(TensorSlimError, match="different run.*lr"):
        tensorslim.recover(
            copy.deepcopy(start), original, x, checkpoint=ck, epochs=4, lr=2e-3, features=["2"]
        )
    with pytest.raises(TensorSlimError, match="different run.*data"):
        tensorslim.recover(copy.deepcopy(start), original, x * 2, checkpoint=ck, **kwargs)


class _Interrupting(list):
    """A list of batches whose third iteration (the first batches for the before measurement,
    pass 1, pass 2) raises while reading batch `at`."""

    def __init__(self, items, at):
        super().__init__(items)
        self.at, self.calls = at, 0

    def __iter__(self):
        self.calls += 1
        for i, item in enumerate(super().__iter__()):
            if self.calls == 3 and i == self.at:
                raise _Stop("interrupted")
            yield item


def test_resume_mid_epoch_in_steps_mode(tmp_path):
    original, start, _ = compressed_pair(mlp, (1, 8, 8))
    batches = list(inputs(112, (1, 8, 8)).split(16))  # 7 batches per pass
    kwargs = {"steps": 12, "lr": 1e-3, "checkpoint_every": 3}
    straight = copy.deepcopy(start)
    ref = tensorslim.recover(straight, original, batches, **kwargs)

    ck = tmp_path / "ck"
    first = copy.deepcopy(start)
    with pytest.raises(TensorSlimError, match="reading batch 3 of epoch 2.*_Stop"):
        tensorslim.recover(first, original, _Interrupting(batches, 3), checkpoint=ck, **kwargs)
    progress = json.loads((ck / "progress.json").read_text())["progress"]
    assert progress["step"] == 9 and progress["epoch"] == 1 and progress["batch"] == 2

    resumed = copy.deepcopy(start)
    r = tensorslim.recover(resumed, original, batches, checkpoint=ck, **kwargs)
    assert r.resumed_at == 9 and r.steps == 12
    assert r.losses == ref.losses and len(r.losses) == 12
    assert same(snapshot(straight), snapshot(resumed))


def test_checkpoint_folder_must_be_ours(tmp_path):
    original, small, _ = compressed_pair(mlp, (1, 8, 8))
    x = inputs(64, (1, 8, 8))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TensorSlimError, match="refusing to replace"):
        tensorslim.recover(small, original, x, epochs=1, checkpoint=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# -- command line -----------------------------------------------------------------------------------
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_recover_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = run("compress", "digits-mlp", "--keep", "0.1", "--out", out)
    assert r.exit_code == 0, r.output
    from tensorslim.zoo import DigitsMLP, load_digits_split

    split = load_digits_split()
    save_file({"x": split.x_train[:512].contiguous()}, str(tmp_path / "x.safetensors"))
    original = tensorslim.zoo.get("digits-mlp").pretrained()
    small0 = tensorslim.load(DigitsMLP(), out)

    # in place: the folder carries the .tensorslim marker
    r = run("recover", out, "--data", tmp_path / "x.safetensors", "--epochs", "3", "--lr", "1e-3")
    assert r.exit_code == 0, r.output
    assert "distillation loss" in r.output and "output cosine" in r.output
    before, after = (
        float(v) for v in r.output.split("distillation loss")[1].split(";")[0].split("->")
    )
    assert after < 0.5 * before
    plan = json.loads((out / "plan.json").read_text())
    [rec] = plan["meta"]["recover"]
    assert rec["epochs"] == 3 and rec["lr"] == 1e-3 and plan["meta"]["model_spec"] == "digits-mlp"
    small1 = tensorslim.load(DigitsMLP(), out)
    assert not same(snapshot(small0), snapshot(small1))
    x = split.x_test
    with torch.no_grad():
        err0 = (small0(x) - original(x)).pow(2).mean()
        err1 = (small1(x) - original(x)).pow(2).mean()
    assert err1 < err0  # better on held-out inputs too

    # out of place, .npy data, steps and features
    np.save(tmp_path / "x.npy", split.x_train[:256].double().numpy())
    new = tmp_path / "new"
    r = run(
        "recover",
        out,
        "--model",
        "digits-mlp",
        "--data",
        tmp_path / "x.npy",
        "--steps",
        "4",
        "--features",
        "net.1",
        "--out",
        new,
        "--checkpoint",
        tmp_path / "ck",
    )
    assert r.exit_code == 0, r.output
    assert len(json.loads((new / "plan.json").read_text())["meta"]["recover"]) == 2
    assert (tmp_path / "ck" / "progress.json").is_file()
    r = run("recover", out, "--data", "digits", "--steps", "2", "--out", tmp_path / "n2")
    assert r.exit_code == 0, r.output
    r = run("recover", out, "--data", "digits", "--steps", "1", "--out", out)  # in place, named
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "plan.json").read_text())["meta"]["recover"]) == 2


def test_cli_recover_errors(tmp_path):
    out = tmp_path / "out"
    assert run("compress", "digits-mlp", "--keep", "0.3", "--out", out).exit_code == 0
    np.save(tmp_path / "x.npy", np.zeros((8, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    x = tmp_path / "x.npy"
    cases = [
        (["recover", out, "--data", x], "exactly one of epochs"),
        (["recover", out, "--data", x, "--epochs", "1", "--steps", "2"], "exactly one"),
        (["recover", out, "--data", x, "--epochs", "1", "--lr", "0"], "lr must be"),
        (["recover", out, "--data", tmp_path / "none.npy", "--epochs", "1"], "neither a file"),
        (["recover", out, "--data", tmp_path / "obj.npy", "--epochs", "1"], "allow_pickle=False"),
        (["recover", out, "--data", x, "--epochs", "1", "--out", foreign], "refusing to replace"),
        (["recover", out, "--data", x, "--epochs", "1", "--out", out / "sub"], "input"),
        (["recover", out, "--data", x, "--epochs", "1", "--features", "nope"], "no module"),
        (["recover", tmp_path / "missing", "--data", x, "--epochs", "1"], "plan"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert (foreign / "a.txt").read_text() == "x"
    # a folder with a file added since tensorslim wrote it is not replaced in place
    (out / "extra.txt").write_text("mine")
    r = run("recover", out, "--data", x, "--epochs", "1")
    assert r.exit_code == 2 and "refusing to replace" in r.output


def test_balancing_a_lowrank_lstm_keeps_it_and_equalises_every_matrix():
    from tensorslim.train.distill import balance_lowrank_

    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
    calib = [torch.randn(4, 5, 6) @ torch.diag(torch.logspace(1, -2, 6)) for _ in range(2)]
    small, _ = tensorslim.compress(model, 0.5, method="whitened", calibration=calib)
    rnn = small.rnn
    factored = [k for k, r in rnn.ranks.items() if r is not None]
    assert factored
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        before = small(x)[0]
    ratio = max(
        float(getattr(rnn, k + "_u").detach().norm() / getattr(rnn, k + "_v").detach().norm())
        for k in factored
    )
    assert ratio > 10  # whitened factors start out of scale: the check below can fail
    assert balance_lowrank_(small) == 1
    for k in factored:
        u, v = getattr(rnn, k + "_u"), getattr(rnn, k + "_v")
        torch.testing.assert_close(u.norm(dim=0), v.norm(dim=1), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], before, rtol=1e-4, atol=1e-5)


def test_balancing_keeps_the_function_and_equalises_factor_norms():
    from tensorslim.layers import LowRankLinear
    from tensorslim.layers.lowrank_conv import LowRankConv
    from tensorslim.train.distill import balance_lowrank_

    torch.manual_seed(0)
    lin = LowRankLinear(12, 9, 4)
    conv = LowRankConv(3, 8, (3, 3), 4, padding=1)
    with torch.no_grad():
        lin.first.weight.mul_(1e-3)  # a whitened layer's small B
        conv.first.weight.mul_(1e-3)
    model = nn.Sequential(lin)
    x = torch.randn(5, 12)
    before = model(x)
    cx = torch.randn(2, 3, 6, 6)
    cbefore = conv(cx)
    assert balance_lowrank_(model) == 1
    assert balance_lowrank_(nn.Sequential(conv)) == 1
    assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-4)
    assert torch.allclose(conv(cx), cbefore, atol=1e-5, rtol=1e-4)
    na, nb = lin.second.weight.norm(dim=0), lin.first.weight.norm(dim=1)
    assert torch.allclose(na, nb, rtol=1e-4)
