"""nn.GRU / nn.LSTM: every gate matrix weight_ih_l{k}[_reverse] (gates*H x in) and
weight_hh_l{k}[_reverse] (gates*H x H), each with its own compression (Maison, du Mas des
Bourboux, Courtat 2023, "Compression of recurrent neural networks using matrix factorization").
Each matrix belongs to one layer and direction and multiplies one vector per timestep and batch
element. The replacement is a LowRankRNN (layers/lowrank_rnn.py). Calibration sees each
matrix's input rows (the layer inputs or the previous hidden states, `RNNHandler.rows`) and its
gradient."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

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

    # -- calibration --------------------------------------------------------------------------
    def weight_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: getattr(module, n) for n in rnn_matrices(module)}

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def calibration_reason(self, module: nn.Module) -> str | None:
        return None

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """The vectors each gate matrix multiplies during this forward call (PyTorch's nn.GRU /
        nn.LSTM equations, layer k, direction d, step t):

            GRU:  r_t = s(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr), z_t likewise,
                  n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn)),
                  h_t = (1 - z_t) * n_t + z_t * h_{t-1}
            LSTM: [i f g o]_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, c_t = s(f) c_{t-1} + s(i)
                  tanh(g), h_t = s(o) tanh(c_t)   (h_t = W_hr (...) with proj_size)

        so weight_ih_l{k}[_reverse] (the stacked W_i*) multiplies x_t, the layer's input: the
        model's input for k = 0, the previous layer's output (both directions concatenated, as
        PyTorch feeds it) for k > 0; and weight_hh_l{k}[_reverse] multiplies h_{t-1}: h0 (zeros or
        the given initial state) at the first step, the previous step's output after; the reverse
        direction runs from the last step down, so its h_{t-1} is its output at step t + 1 (h0 at
        each sequence's last step). Rows are taken for every valid (step, sequence) pair: a
        packed sequence is unpacked and padding steps are skipped. The per-layer sequences come
        from re-running the module's layers one at a time (single-layer copies sharing its
        weights, without gradients). Dropout between layers is not applied (inputs as in eval
        mode)."""
        x, hx = _bind(args, kwargs)
        return _rnn_rows(module, x, hx)


def _bind(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(input, hx) of a GRU/LSTM forward call: forward(input, hx=None)."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def _single_layer(module: nn.Module, k: int) -> nn.Module:
    """Layer k of `module` as a one-layer GRU/LSTM (time-major, no dropout) sharing its weights;
    built on the meta device so that no parameter memory is allocated. The weights are detached
    aliases, not the module's own Parameters: on CUDA the copy's first forward re-flattens its
    weights for cuDNN, in place, which would otherwise move the module's parameters into the
    copy's buffer."""
    cls = nn.LSTM if isinstance(module, nn.LSTM) else nn.GRU
    d = 2 if module.bidirectional else 1
    in_size = module.input_size if k == 0 else d * (module.proj_size or module.hidden_size)
    extra = {"proj_size": module.proj_size} if cls is nn.LSTM else {}
    layer = cls(
        in_size,
        module.hidden_size,
        num_layers=1,
        bias=module.bias,
        bidirectional=module.bidirectional,
        device="meta",
        **extra,
    )
    for name in layer._flat_weights_names:
        src = name.replace("_l0", f"_l{k}")
        setattr(layer, name, nn.Parameter(getattr(module, src).detach(), requires_grad=False))
    return layer.eval()


def _flat(seq: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(T, B, n) -> (N, n): every (step, batch element), or only the `valid` ones."""
    return seq.reshape(-1, seq.shape[-1]) if valid is None else seq[valid]


def _rnn_rows(module: nn.Module, x: Any, hx: Any) -> dict[str, torch.Tensor]:
    lstm = isinstance(module, nn.LSTM)
    d = 2 if module.bidirectional else 1
    h_out = module.proj_size or module.hidden_size
    packed = isinstance(x, PackedSequence)
    if packed:
        lengths = pad_packed_sequence(x)[1]  # original batch order, like hx
        batch = len(lengths)
    else:
        unbatched = x.dim() == 2
        seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if module.batch_first else x)
        batch = seq.shape[1]
        if hx is not None and unbatched:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    h0 = hx[0] if lstm and hx is not None else hx  # (d * layers, B, h_out) or None
    rows: dict[str, torch.Tensor] = {}
    with torch.no_grad(), warnings.catch_warnings():
        # cuDNN warns that the shared weights are not one contiguous chunk; they need not be
        warnings.filterwarnings("ignore", "RNN module weights are not part of single contiguous")
        layer_in: Any = x if packed else seq
        for k in range(module.num_layers):
            state = None
            if hx is not None:
                part = slice(k * d, (k + 1) * d)
                state = (hx[0][part], hx[1][part]) if lstm else hx[part]
            layer_out, _ = _single_layer(module, k)(layer_in, state)
            if packed:
                inp, _ = pad_packed_sequence(layer_in)
                out, _ = pad_packed_sequence(layer_out)
            else:
                inp, out = layer_in, layer_out
            t_len = inp.shape[0]
            valid = None
            if packed:
                steps = torch.arange(t_len, device=lengths.device)
                valid = (steps[:, None] < lengths[None, :]).to(inp.device)  # (T, B)
            for j in range(d):
                sfx = "_reverse" if j else ""
                rows[f"weight_ih_l{k}{sfx}"] = _flat(inp, valid)
                h = out[..., j * h_out : (j + 1) * h_out]  # (T, B, h_out)
                first = (
                    h0[k * d + j].to(h.dtype)
                    if h0 is not None
                    else torch.zeros(batch, h_out, dtype=h.dtype, device=h.device)
                )
                if j == 0:  # h_{t-1}: h0, then the output of step t - 1
                    prev = torch.cat([first[None], h[:-1]])
                else:  # reverse: the output of step t + 1, h0 at each sequence's last step
                    prev = torch.cat([h[1:], first[None]])
                    if valid is not None:
                        last = (steps[:, None] == (lengths[None, :] - 1)).to(h.device)
                        prev = torch.where(last[..., None], first[None], prev)
                rows[f"weight_hh_l{k}{sfx}"] = _flat(prev, valid)
            layer_in = layer_out
    return rows
