"""Proof of the design: a new compressor kind, added here with the decorator and no other edit,
works through compress -> save -> load -> apply_plan on a Linear, a Conv2d and an LSTM.

The kind is "rank plus diagonal": W ~= A B + diag(d), d on the first min(m, n) diagonal entries
(the low-rank-plus-diagonal model of, e.g., factor analysis). Its projection alternates the two
exact partial minimisers (d = diag(W - A B); A B = SVD_r(W - diag(d))), which never increases
||W - A B - diag(d)||.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.core import unregister_compressor


class RankDiagOp(nn.Module):
    """x -> x B^T A^T + d * x (on the first min(m, n) coordinates)."""

    def __init__(self, m: int, n: int, r: int, dtype=None, device=None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.a = nn.Parameter(torch.zeros(m, r, **kw))
        self.b = nn.Parameter(torch.zeros(r, n, **kw))
        self.d = nn.Parameter(torch.zeros(min(m, n), **kw))
        self.m, self.n = m, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.b.T) @ self.a.T
        k = self.d.shape[0]
        diag = x[..., :k] * self.d
        if self.m > k:
            diag = torch.cat([diag, diag.new_zeros(*diag.shape[:-1], self.m - k)], -1)
        return y + diag

    def dense_weight(self) -> torch.Tensor:
        k = self.d.shape[0]
        diag = torch.nn.functional.pad(torch.diag(self.d), (0, self.n - k, 0, self.m - k))
        return self.a @ self.b + diag


def _factors(w: torch.Tensor, r: int, iters: int):
    w64 = w.detach().to(torch.float64)
    k = min(w64.shape)
    d = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        resid = w64.clone()
        resid[range(k), range(k)] -= d
        u, s, vh = torch.linalg.svd(resid, full_matrices=False)
        a, b = u[:, :r] * s[:r], vh[:r]
        d = torch.diagonal(w64 - a @ b)[:k].clone()
    return a, b, d


def _define():
    @tensorslim.register_compressor("rank_diag")
    class RankDiag(tensorslim.Compressor):
        @dataclass(frozen=True)
        class Options:
            iters: int = 5

        def check(self, target, params):
            r, full = params.get("rank"), min(target.shape)
            if isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= full:
                return None
            return f"rank must be an integer in [1, {full}]; got {r!r}"

        def cost(self, target, params):
            (m, n), r = target.shape, params["rank"]
            count = r * (m + n) + min(m, n)
            return tensorslim.Cost(count, count * 32, target.flops(count))

        def grid(self, target):
            m, n = target.shape
            return [
                {"rank": r}
                for r in range(1, min(m, n) + 1)
                if r * (m + n) + min(m, n) < m * n
            ]

        def project(self, weight, params):
            a, b, d = _factors(weight, params["rank"], self.options.iters)
            k = d.shape[0]
            out = a @ b
            out[range(k), range(k)] += d
            return out.to(weight.dtype)

        def build(self, target, params):
            op = self.empty(target, params)
            a, b, d = _factors(target.weight, params["rank"], self.options.iters)
            with torch.no_grad():
                op.a.copy_(a)
                op.b.copy_(b)
                op.d.copy_(d)
            return op, {}

        def empty(self, target, params):
            m, n = target.shape
            return RankDiagOp(m, n, params["rank"], dtype=target.dtype, device=target.device)

    return RankDiag


@pytest.fixture(scope="module")
def rank_diag():
    cls = _define()
    yield cls
    unregister_compressor("rank_diag")


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(12, 16, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 6)), (3, 24)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU()), (2, 4, 6, 6)),
    "lstm": (LSTMNet, (2, 5, 12)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_new_kind_through_compress_save_load_apply(case, rank_diag, tmp_path):
    torch.manual_seed(0)
    make, shape = CASES[case]
    model = make().eval()
    x = torch.randn(*shape)
    small, plan = tensorslim.compress(model, 0.6, method="rank_diag", example_input=x)

    compressed = [lp for lp in plan.layers if lp.factorized]
    assert compressed, plan
    for lp in compressed:
        assert lp.method == "rank_diag"
        assert all(c["kind"] == "rank_diag" for c in lp.spec)
        assert lp.params_after < lp.params_before
        assert lp.bits_after < lp.bits_before
    ops = [m for m in small.modules() if type(m).__name__ == "RankDiagOp"]
    assert ops, "the new kind's operator is in the model"
    with torch.no_grad():
        y_small, y_dense = small(x), model(x)
    assert y_small.shape == y_dense.shape

    tensorslim.save(small, plan, tmp_path / "out")
    loaded = tensorslim.load(make().eval(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_small)

    plan2 = tensorslim.Plan.from_json(tmp_path / "out" / "plan.json")
    again = tensorslim.apply_plan(model, plan2)
    with torch.no_grad():
        torch.testing.assert_close(again(x), y_small, rtol=1e-4, atol=1e-5)


def test_new_kind_projection_is_exact_at_full_rank(rank_diag):
    w = torch.randn(9, 7, dtype=torch.float64)
    comp = tensorslim.core.get_compressor("rank_diag")
    torch.testing.assert_close(comp.project(w, {"rank": 7}), w)


def test_new_kind_options_are_typed(rank_diag):
    with pytest.raises(tensorslim.TensorSlimError, match="its options are: iters"):
        tensorslim.core.get_compressor("rank_diag", {"iter": 3})
