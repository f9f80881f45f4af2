"""Truncated-SVD factorizer for nn.GRU and nn.LSTM (method "svd"): one rank per weight matrix.

A recurrent module holds 2 * num_layers * directions matrices, each with its own rank (Maison et
al. 2023). The allocators choose one option per module, so the options are a path through the
per-matrix ranks: starting from rank 1 everywhere, each step takes the cheapest error reduction
(one more rank for one matrix, or that matrix back to dense), the same greedy rule the global
allocator uses between layers. Every point on the path is an option with a dict rank
{matrix name: rank or None (dense)}; its error is the sum of the matrices' relative squared errors.
Matrices too small to gain (r(m+n) >= mn for every r, e.g. an input size of 1) stay dense, and
the plan's LayerPlan.extra["dense_matrices"] says why. FLOPs follow the implementation the layer
will run (layers.lowrank_rnn.choose_impl): "lowrank" computes with the factors, "fused" rebuilds
the dense matrices and runs the dense kernel, so its FLOPs are the dense ones plus the rebuild.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose import max_useful_rank, singular_values, tail_energy
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.lowrank_rnn import LowRankRNN, choose_impl, rnn_matrices
from tensorslim.model.factorizers import refuse_overflow
from tensorslim.model.registry import (
    Factorizer,
    LayerSite,
    Option,
    register,
)


class RNNSVD(Factorizer):
    def _mats(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: getattr(module, n).detach() for n in rnn_matrices(module)}

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0):
            return "LSTM with proj_size > 0 is not supported yet"
        if all(max_useful_rank(*w.shape) == 0 for w in self._mats(module).values()):
            return "too small to gain: no weight matrix has a rank r with r(m+n) < mn"
        return None

    def small_matrices(self, module: nn.Module) -> list[str]:
        """Matrices left dense because no rank saves parameters."""
        return [n for n, w in self._mats(module).items() if max_useful_rank(*w.shape) == 0]

    def dense_params(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def _positions(self, module: nn.Module, site: LayerSite) -> int | None:
        if site.input_shape is None:
            return None  # e.g. a packed sequence
        return math.prod(site.input_shape) // module.input_size

    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        p = self._positions(module, site)
        return None if p is None else 2 * p * sum(w.numel() for w in self._mats(module).values())

    def _params(self, module: nn.Module, ranks: dict[str, int | None]) -> int:
        total = self.dense_params(module)
        for n, w in self._mats(module).items():
            r = ranks.get(n)
            if r is not None:
                total -= w.numel() - r * sum(w.shape)
        return total

    def _flops(
        self, module: nn.Module, site: LayerSite, ranks: dict[str, int | None]
    ) -> int | None:
        p = self._positions(module, site)
        if p is None:
            return None
        mats = self._mats(module)
        if choose_impl(module, ranks) == "lowrank":
            # Every matrix is applied once per position (timestep x batch element).
            return (
                2
                * p
                * sum(
                    w.numel() if ranks.get(n) is None else ranks[n] * sum(w.shape)
                    for n, w in mats.items()
                )
            )
        # "fused": each factorized matrix is rebuilt once per call (2 r m n FLOPs), then the
        # dense recurrence runs: storage shrinks, compute does not.
        dense = 2 * p * sum(w.numel() for w in mats.values())
        return dense + sum(2 * r * mats[n].numel() for n, r in ranks.items() if r is not None)

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        mats = self._mats(module)
        tails = {
            n: tail_energy(singular_values(w)).tolist()
            for n, w in mats.items()
            if max_useful_rank(*w.shape) > 0
        }
        r_max = {n: max_useful_rank(*mats[n].shape) for n in tails}
        ranks: dict[str, int | None] = {n: (1 if n in tails else None) for n in mats}
        dense = self.dense_params(module)

        def err(rk: dict[str, int | None]) -> float:
            return sum(tails[n][r] for n, r in rk.items() if r is not None)

        opts = []
        while True:
            params = self._params(module, ranks)
            if params < dense:
                opts.append(
                    Option(dict(ranks), params, self._flops(module, site, ranks), err(ranks))
                )
            best, best_score = None, -1.0
            for n in tails:
                r = ranks[n]
                if r is None:
                    continue
                size = sum(mats[n].shape)
                steps = [(r + 1, size)] if r < r_max[n] else []
                steps.append((None, mats[n].numel() - r * size))
                for new, dc in steps:
                    gain = tails[n][r] - (0.0 if new is None else tails[n][new])
                    score = gain / dc if dc > 0 else math.inf
                    if score > best_score:
                        best, best_score = (n, new), score
            if best is None:
                break
            ranks[best[0]] = best[1]
        return opts

    def option_for(
        self, module: nn.Module, site: LayerSite, ranks: dict[str, int | None]
    ) -> Option:
        """The option for an arbitrary dict rank (Rank-Tuning chooses each matrix's rank itself)."""
        err = 0.0
        for n, r in ranks.items():
            if r is not None:
                err += tail_energy(singular_values(getattr(module, n).detach()))[r].item()
        return Option(
            dict(ranks), self._params(module, ranks), self._flops(module, site, ranks), err
        )

    def rank_for_keep(self, module: nn.Module, keep: float) -> Any:
        fits = [
            o
            for o in self.options(module, LayerSite(""))
            if o.params <= keep * self.dense_params(module)
        ]
        return fits[-1].rank if fits else None

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """An object {matrix name: rank or null (dense)} over `rnn_matrices(module)` (a matrix it
        leaves out stays dense), each rank an integer in [1, min(m, n)] of its matrix, at least
        one integer."""
        full = {n: min(getattr(module, n).shape) for n in rnn_matrices(module)}
        if len(set(full.values())) == 1:
            bounds = f"{', '.join(full)}, each in [1, {next(iter(full.values()))}]"
        else:
            bounds = ", ".join(f"{n} in [1, {f}]" for n, f in full.items())
        form = (
            "rank must be an object mapping weight matrices to an integer rank or null (dense), "
            f"with at least one integer: {bounds} (the full ranks)"
        )
        got = f"got {short_repr(rank, 120)}"
        if not isinstance(rank, dict):
            return f"{form}; {got}"
        unknown = [k for k in rank if k not in full]
        if unknown:
            kind = type(module).__name__
            return f"no weight matrix named {short_repr(unknown)} in this {kind}; {form}; {got}"
        for n, r in rank.items():
            if r is not None and not (is_int(r) and 1 <= r <= full[n]):
                return (
                    f"the rank of {n} must be null or an integer in [1, {full[n]}] (the full "
                    f"rank of its {'x'.join(map(str, getattr(module, n).shape))} matrix); "
                    f"got {short_repr(r)}"
                )
        if all(r is None for r in rank.values()):
            return f"{form}; {got}"
        return None

    def apply(self, module: nn.Module, rank: Any) -> nn.Module:
        return LowRankRNN.from_dense(module, dict(rank))

    def apply_site(
        self, module: nn.Module, rank: Any, site: LayerSite
    ) -> tuple[nn.Module, dict[str, Any]]:
        new = refuse_overflow(self.apply(module, rank), module, site, self.method, rank)
        why = "too small to gain: no rank r gives r(m+n) < mn"
        extra: dict[str, Any] = {"impl": new.impl}
        small = self.small_matrices(module)
        if small:
            extra["dense_matrices"] = {n: why for n in small}
        return new, extra

    def empty(self, module: nn.Module, rank: Any) -> nn.Module:
        return LowRankRNN.empty_like(module, dict(rank))

    def weight(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([w.reshape(-1) for w in self._mats(module).values()])

    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        return factorized.dense_weight().detach()


def register_rnn() -> None:
    for t in (nn.GRU, nn.LSTM):
        register(t, "svd", RNNSVD())
