"""The rnn_encoder benchmark's --quick path: a tiny row-by-row LSTM on Fashion-MNIST, trained and
cached (in the session's isolated cache), compressed by every method; rows, metrics and the
written results are checked."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tensorslim.zoo.fashion import FILES, fashion_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(
    not all((fashion_dir() / f).is_file() for f in FILES.values()),
    reason="Fashion-MNIST files not installed (dataset-fashion-mnist)",
)


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("_common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    sys.modules.pop("rnn_encoder", None)
    return importlib.import_module("rnn_encoder")


def test_quick_run_rows_and_results(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    labels = [(r["method"], r["allocator"]) for r in rows]
    assert labels == [
        ("original", "-"),
        ("svd", "uniform"),
        ("svd", "global"),
        ("whitened", "uniform"),
        ("whitened", "global"),
        ("whitened + sequential", "global"),
        ("fwsvd", "uniform"),
        ("fwsvd", "global"),
        ("whitened + recover", "global"),
        ("whitened + sequential + recover", "global"),
        ("fwsvd + recover", "global"),
    ]
    orig = rows[0]
    assert orig["mean cosine"] == 1.0 and orig["min cosine"] == 1.0
    assert orig["achieved keep"] == 1.0 and 0.0 <= orig["accuracy"] <= 1.0
    s = bench.QUICK
    assert orig["LSTM weights"] == 4 * s.hidden * (28 + s.hidden) + 4 * s.hidden * 2 * s.hidden * (
        s.layers - 1
    )
    for r in rows[1:]:
        assert r["keep"] == 0.5 and 0.4 < r["achieved keep"] <= 0.5
        assert r["LSTM weights"] < orig["LSTM weights"]
        assert r["model params"] < orig["model params"]
        assert -1.0 <= r["min cosine"] <= r["mean cosine"] <= 1.0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["ranks"] != "dense"
        assert (r["recover s"] is not None) == r["method"].endswith("recover")
    # the trained weights were cached (atomically, as safetensors) and a second load reuses them
    assert bench.cache_path(s).is_file()
    payload = json.loads((tmp_path / "rnn_encoder_quick.json").read_text())
    assert payload["tables"][bench.TABLE] == rows
    assert payload["seeds"]["torch"] == 0 and payload["setup"]["hidden"] == s.hidden
    goal = payload["tables"][f"Goal: mean cosine >= {bench.GOAL_COSINE} (best row per keep)"]
    assert [g["keep"] for g in goal] == [0.5]
    assert goal[0]["mean cosine"] == max(r["mean cosine"] for r in rows[1:])
    md = (tmp_path / "rnn_encoder_quick.md").read_text()
    assert "Goal:" in md and "| whitened + sequential + recover |" in md


def test_cached_model_is_reloaded(bench):
    s = bench.QUICK
    data = bench.load_fashion_mnist(seed=s.seed)
    x, y = data.x_train[: s.n_train], data.y_train[: s.n_train]
    first, rec1 = bench.pretrained(s, x, y)
    second, rec2 = bench.pretrained(s, x, y)
    assert rec2["cached"] and rec2["losses"] == rec1["losses"]
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
