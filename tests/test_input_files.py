"""tensorslim.input_files: the one reader of model inputs for compress --calibration,
recover --data and lc --data."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tensorslim.errors import TensorSlimError
from tensorslim.input_files import checked_inputs, data_set, read_inputs


def test_one_tensor_reads_only_the_samples_asked_for(tmp_path):
    x = torch.randn(20, 3)
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    got, name = read_inputs(str(tmp_path / "a.safetensors"), flag="--data", samples=7)
    assert torch.equal(got, x[:7]) and "'x'" in name
    np.save(tmp_path / "a.npy", x.numpy())
    got, _ = read_inputs(str(tmp_path / "a.npy"), flag="--data", samples=5)
    assert torch.equal(got, x[:5])
    got, _ = read_inputs(str(tmp_path / "a.npy"), flag="--data")
    assert torch.equal(got, x)


def test_several_tensors_are_keyword_inputs_or_need_a_key(tmp_path):
    ids, mask = torch.arange(24).reshape(6, 4), torch.ones(6, 4, dtype=torch.long)
    path = str(tmp_path / "kw.safetensors")
    save_file({"input_ids": ids, "attention_mask": mask}, path)
    got, _ = read_inputs(path, flag="--data", samples=4)
    assert set(got) == {"input_ids", "attention_mask"} and torch.equal(got["input_ids"], ids[:4])
    got, _ = read_inputs(path, flag="--calibration", key="input_ids", several=False)
    assert torch.equal(got, ids)
    with pytest.raises(TensorSlimError, match="holds 2 tensors.*--calibration-key"):
        read_inputs(path, flag="--calibration", several=False)
    with pytest.raises(TensorSlimError, match="--data-key 'nope' is not a tensor"):
        read_inputs(path, flag="--data", key="nope")
    save_file({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(TensorSlimError, match="different numbers of samples"):
        read_inputs(str(tmp_path / "odd.safetensors"), flag="--data")


def test_bad_files_are_rejected_with_clear_messages(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "x.pt").write_bytes(b"\x80\x04junk")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    save_file({"s": torch.tensor(1.0)}, str(tmp_path / "scalar.safetensors"))
    cases = [
        ("obj.npy", "allow_pickle=False"),
        ("x.pt", "give a .safetensors file"),
        ("bad.safetensors", "cannot read inputs"),
        ("scalar.safetensors", "single number"),
        ("missing.npy", "does not exist: it is neither a file nor a data set name"),
    ]
    for file, words in cases:
        with pytest.raises(TensorSlimError, match=words):
            read_inputs(str(tmp_path / file), flag="--data")
    with pytest.raises(TensorSlimError, match="--data-key names a tensor of a .safetensors"):
        read_inputs(str(tmp_path / "obj.npy"), flag="--data", key="x")


def test_checked_inputs_casts_and_rejects_nan_empty_complex():
    x = torch.randn(5, 2, dtype=torch.float64)
    out = checked_inputs({"a": x, "ids": torch.arange(5)}, "file", torch.float32)
    assert out["a"].dtype == torch.float32 and out["ids"].dtype == torch.int64
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(TensorSlimError, match=r"0 NaN and 1 Inf values \(first in sample 2\)"):
        checked_inputs(bad, "file", torch.float32)
    with pytest.raises(TensorSlimError, match="holds no samples"):
        checked_inputs(torch.zeros(0, 3), "file", torch.float32)
    with pytest.raises(TensorSlimError, match="complex"):
        checked_inputs(torch.zeros(2, 3, dtype=torch.complex64), "file", torch.float32)


def test_a_data_set_name_gives_its_training_inputs():
    split = data_set("digits")
    got, name = read_inputs("digits", flag="--calibration", samples=10)
    assert torch.equal(got, split.x_train[:10]) and name == "data set 'digits'"
    assert data_set("not-a-data-set") is None
