import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.errors import PlanMismatchError, TensorSlimError, WeightFileError
from tensorslim.io import atomic_write_dir, load_pickled_model, load_weights, read_state_dict
from tests.models import MODELS


def _compressed(name="resnetish", keep=0.4):
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = make_input()
    small, plan = tensorslim.compress(model, keep, example_input=x)
    return factory, model, small.eval(), plan, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_reproduces_outputs_exactly(tmp_path, name):
    factory, _, small, plan, x = _compressed(name)
    tensorslim.save(small, plan, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".tensorslim",  # the marker that lets a later save replace this folder
        "model.safetensors",
        "plan.json",
    ]
    torch.manual_seed(123)  # a fresh model with different random weights
    restored = tensorslim.load(factory(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))
    assert tensorslim.Plan.from_json(tmp_path / "out" / "plan.json") == plan


def test_save_replaces_previous_output_and_refuses_foreign_folders(tmp_path):
    _, _, small, plan, _ = _compressed()
    out = tmp_path / "out"
    tensorslim.save(small, plan, out)
    tensorslim.save(small, plan, out)  # overwriting our own output is fine
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(TensorSlimError, match="refusing to replace"):
        tensorslim.save(small, plan, tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no temp leftovers


def test_failed_write_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    atomic_write_dir(out, lambda tmp: (tmp / "plan.json").write_text("old"))

    def broken(tmp):
        (tmp / "plan.json").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_dir(out, broken)
    assert (out / "plan.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    factory, _, small, plan, _ = _compressed()
    out = tmp_path / "out"
    tensorslim.save(small, plan, out)
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(WeightFileError, match="cannot read weights"):
        tensorslim.load(factory(), out)
    (out / "model.safetensors").unlink()
    with pytest.raises(WeightFileError, match="missing weight file"):
        tensorslim.load(factory(), out)
    (out / "plan.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="not valid JSON"):
        tensorslim.load(factory(), out)
    with pytest.raises(WeightFileError, match="no saved model folder"):
        tensorslim.load(factory(), tmp_path / "nowhere")


def test_plan_for_another_model_is_refused(tmp_path):
    _, _, small, plan, _ = _compressed("resnetish")
    tensorslim.save(small, plan, tmp_path / "out")
    with pytest.raises(PlanMismatchError, match="no layer named"):
        tensorslim.load(MODELS["mlp"][0](), tmp_path / "out")
    d = json.loads((tmp_path / "out" / "plan.json").read_text())
    first = next(lp for lp in d["layers"] if lp["method"] != "dense")
    first["shape"] = [1, 2, 3, 4]
    (tmp_path / "out" / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlanMismatchError, match="weight shape"):
        tensorslim.load(MODELS["resnetish"][0](), tmp_path / "out")


def test_weights_are_never_unpickled_without_trust(tmp_path):
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    load_weights(nn.Linear(3, 2), tmp_path / "sd.pt")  # a plain state_dict is fine

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(WeightFileError):
        read_state_dict(tmp_path / "evil.pt")
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(TensorSlimError, match="--trust-pickle"):
        load_pickled_model(tmp_path / "whole.pt")
    assert isinstance(load_pickled_model(tmp_path / "whole.pt", trust_pickle=True), nn.Linear)


def test_load_weights_reports_mismatch(tmp_path):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(WeightFileError, match="do not fit"):
        load_weights(nn.Linear(4, 2), tmp_path / "sd.pt")
    with pytest.raises(WeightFileError, match="does not exist"):
        load_weights(nn.Linear(4, 2), tmp_path / "none.safetensors")


@pytest.mark.parametrize("name", ["resnetish", "audio1d", "mlp"])
def test_onnx_export_matches_pytorch(tmp_path, name):
    import onnxruntime as ort

    _, _, small, _, x = _compressed(name)
    path = tensorslim.export_onnx(small, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = small(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the batch axis is dynamic
    x2 = torch.cat([x, x])
    got2 = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    assert got2.shape[0] == 2 * x.shape[0]
