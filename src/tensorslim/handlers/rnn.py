"""nn.GRU / nn.LSTM: every gate matrix weight_ih_l{k}[_reverse] (gates*H x in) and
weight_hh_l{k}[_reverse] (gates*H x H), each with its own compression (Maison, du Mas des
Bourboux, Courtat 2023, "Compression of recurrent neural networks using matrix factorization").
Each matrix belongs to one layer and direction and multiplies one vector per timestep and batch
element. The replacement is a LowRankRNN (layers/lowrank_rnn.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.core.handler import Handler, register_handler
from tensorslim.core.target import LayerSite
from tensorslim.layers.lowrank_rnn import LowRankRNN, choose_impl, rnn_matrices


@register_handler(nn.GRU, nn.LSTM)
class RNNHandler(Handler):
    """Biases (and an LSTM's weight_hr, which is refused) stay as they are."""

    name = "rnn"

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0):
            return "LSTM with proj_size > 0 is not supported yet"
        return None

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: getattr(module, n).detach() for n in rnn_matrices(module)}

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        """Timesteps x batch elements for every matrix (None for an unknown input shape, e.g. a
        packed sequence)."""
        p = None
        if site.input_shape is not None:
            p = math.prod(site.input_shape) // module.input_size
        return {n: p for n in rnn_matrices(module)}

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        mats = set(rnn_matrices(module))
        return {n: p.detach() for n, p in module.named_parameters(recurse=False) if n not in mats}

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        if all(op is None for op in ops.values()):
            return module
        return LowRankRNN.from_ops(module, dict(ops)).train(module.training)

    def compressed_flops(self, module, site, targets, compressed) -> int | None:
        """With the "fused" implementation (chosen for small hidden sizes, or any operator that is
        not low-rank) each compressed matrix is rebuilt once per call (2 r m n FLOPs for a rank-r
        product, 2 m n otherwise) and the dense recurrence runs: storage shrinks, compute does
        not. The "lowrank" implementation costs the sum of the parts."""
        p = next(iter(targets.values())).positions if targets else None
        if p is None:
            return None
        ranks = {
            part: lst[0][1].get("rank")
            for part, lst in compressed.items()
            if len(lst) == 1 and lst[0][0].kind == "lowrank"
        }
        generic = len(ranks) < len(compressed)
        every = {part: ranks.get(part) for part in targets}
        if not generic and choose_impl(module, every) == "lowrank":
            return None
        dense = sum(2 * p * t.shape[0] * t.shape[1] for t in targets.values())
        rebuild = 0
        for part in compressed:
            m, n = targets[part].shape
            rebuild += 2 * ranks[part] * m * n if part in ranks else 2 * m * n
        return dense + rebuild

    def pack(self, module: nn.Module, values: Mapping[str, Any]) -> Any:
        """{matrix name: value or None (dense)} naming every gate matrix."""
        return {n: values.get(n) for n in rnn_matrices(module)}

    # -- calibration (Fisher only: input rows are not collected) ------------------------------
    def weight_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: getattr(module, n) for n in rnn_matrices(module)}

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def calibration_reason(self, module: nn.Module) -> str | None:
        return "calibration of GRU/LSTM layers is not supported yet"
