"""Low-rank GRU and LSTM: nn.GRU / nn.LSTM whose weight matrices are stored as low-rank factors.

Each stacked-gate matrix weight_ih_l{k}[_reverse] / weight_hh_l{k}[_reverse] (PyTorch's layout, as
in Maison, du Mas des Bourboux, Courtat 2023, "Compression of recurrent neural networks using matrix
factorization", arXiv 2310.12688, Sec. 3) is stored as U (m x r) @ V (r x n) with its own rank,
kept dense (rank None), or held by any other operator module (`ops`: forward (..., n) -> (..., m),
`dense_weight()` -> (m, n), e.g. a sum of low-rank and sparse parts); biases are kept. Two
implementations compute the same function:

- "fused": rebuild the dense matrices once per call (sum of 2 r m n FLOPs, independent of the
  sequence length) and run PyTorch's own fused GRU/LSTM kernel on them. Saves storage only; compute
  is the dense module's plus the rebuild. Supports everything the original does (packed sequences,
  h0 / (h0, c0), batch_first, bidirectional, unbatched input, inter-layer dropout).
- "lowrank": compute with the factors. All timesteps' input projections in one (T*B x n) matmul
  per layer and direction, the recurrent product per step as (h V^T) U^T inside a TorchScript loop
  (falls back to an eager loop where scripting is unavailable). Saves compute as well as storage;
  packed sequences are routed to the fused path. Not available when a matrix is held by an
  operator other than U V.
- "auto" (default): "lowrank" when the factored recurrent product costs at most half the dense
  one and hidden_size >= AUTO_MIN_HIDDEN, else "fused". The threshold comes from CPU measurements
  (benchmarks/rnn_vowels.py, "latency" table): below ~128 hidden units per-step dispatch overhead,
  not arithmetic, dominates and the fused kernel wins.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from tensorslim.decompose import truncated_svd
from tensorslim.layers.additive import Compressed
from tensorslim.layers.lowrank_linear import balance_factors_, factors_of

IMPLS = ("auto", "fused", "lowrank")
AUTO_MIN_HIDDEN = 128


def rnn_matrices(module: nn.Module) -> list[str]:
    """Names of the weight matrices of an nn.GRU / nn.LSTM that can be factorized, in order."""
    return [
        n
        for n, p in module.named_parameters(recurse=False)
        if n.startswith("weight_") and p.ndim == 2 and not n.startswith("weight_hr")
    ]


def choose_impl(module: nn.Module, ranks: dict[str, int | None], impl: str = "auto") -> str:
    """The implementation "auto" resolves to for `module` (nn.GRU/LSTM or LowRankRNN) at `ranks`."""
    if impl != "auto":
        return impl
    if module.hidden_size < AUTO_MIN_HIDDEN:
        return "fused"
    dense = factored = 0
    for name in ranks:
        if not name.startswith("weight_hh"):
            continue
        n = module.hidden_size
        m = (4 if _is_lstm(module) else 3) * n
        r = ranks[name]
        dense += m * n
        factored += m * n if r is None else r * (m + n)
    return "lowrank" if dense and factored <= 0.5 * dense else "fused"


def _is_lstm(module: nn.Module) -> bool:
    return isinstance(module, nn.LSTM) or getattr(module, "mode", None) == "LSTM"


# -- per-direction recurrences with the factors (PyTorch's GRU / LSTM equations) --------------------
def _gru_direction(
    gi: torch.Tensor,
    h: torch.Tensor,
    vt: torch.Tensor,
    ut: torch.Tensor,
    factored: bool,
    b_hh: torch.Tensor,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # gi: (T, B, 3H) input projections incl. b_ih. gh = b_hh + h W_hh^T with W_hh = U V.
    t_len = gi.shape[0]
    outs = []
    for s in range(t_len):
        t = t_len - 1 - s if reverse else s
        hv = h.mm(vt)
        gh = torch.addmm(b_hh, hv, ut) if factored else b_hh + hv
        ir, iz, in_ = gi[t].chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    seq = torch.stack(outs)
    # flip the stacked tensor, not the list: the ONNX exporter drops a list's in-place reverse()
    return (seq.flip(0) if reverse else seq), h


def _lstm_direction(
    gi: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    vt: torch.Tensor,
    ut: torch.Tensor,
    factored: bool,
    b_hh: torch.Tensor,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t_len = gi.shape[0]
    outs = []
    for s in range(t_len):
        t = t_len - 1 - s if reverse else s
        hv = h.mm(vt)
        gates = gi[t] + (torch.addmm(b_hh, hv, ut) if factored else b_hh + hv)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    seq = torch.stack(outs)
    return (seq.flip(0) if reverse else seq), h, c


def _check_module(
    module: nn.Module, ranks: dict[str, int | None], ops: dict[str, nn.Module], impl: str
) -> None:
    """ValueError / TypeError where LowRankRNN cannot wrap `module` with these ranks and ops."""
    if not isinstance(module, (nn.GRU, nn.LSTM)):
        raise TypeError(f"LowRankRNN wraps nn.GRU or nn.LSTM, got {type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError("LSTM with proj_size > 0 is not supported")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    unknown = (set(ranks) | set(ops)) - set(rnn_matrices(module))
    if unknown:
        raise ValueError(f"no weight matrix named {sorted(unknown)} in {type(module).__name__}")
    both = sorted(n for n in ops if ranks.get(n) is not None)
    if both:
        raise ValueError(f"matrices {both} have both a rank and an operator")
    if ops and impl == "lowrank":
        raise ValueError(
            f"impl 'lowrank' computes with U V factors; matrices {sorted(ops)} are held by other "
            "operators (use 'fused' or 'auto')"
        )


_SCRIPTED: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """The TorchScript version of a direction loop (compiled once), else the eager function.

    torch.jit.script is deprecated in recent PyTorch but still removes most of the per-step Python
    dispatch overhead on CPU; torch.compile would need a C++ toolchain and seconds of compile time.
    """
    if name not in _SCRIPTED:
        fn = {"gru": _gru_direction, "lstm": _lstm_direction}[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _SCRIPTED[name] = torch.jit.script(fn)
        except Exception:  # noqa: BLE001 - scripting is an optimisation; eager is the same function
            _SCRIPTED[name] = fn
    return _SCRIPTED[name]


class LowRankRNN(nn.Module, Compressed):
    """A GRU or LSTM with compressed weight matrices. `ranks` maps matrix names to a rank or None
    (dense); `ops` maps matrix names to operator modules held as they are.

    Build it with `LowRankRNN.from_dense(module, ranks)` (truncated SVD) or
    `LowRankRNN.from_ops(module, ops)` (each matrix's operator; both return a LowRankGRU or
    LowRankLSTM). Parameters are `<matrix>_u` (m x r) and `<matrix>_v` (r x n) for factorized
    matrices, `ops.<matrix>.*` for operator-held ones and the original names for everything else.
    """

    def __init__(
        self,
        module: nn.Module,
        ranks: dict[str, int | None],
        impl: str = "auto",
        ops: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        ops = dict(ops or {})
        _check_module(module, ranks, ops, impl)
        self.mode = "LSTM" if isinstance(module, nn.LSTM) else "GRU"
        for attr in (
            "input_size",
            "hidden_size",
            "num_layers",
            "bias",
            "batch_first",
            "dropout",
            "bidirectional",
        ):
            setattr(self, attr, getattr(module, attr))
        self.ranks = {n: ranks.get(n) for n in rnn_matrices(module)}
        self.ops = nn.ModuleDict(ops)
        self.impl = "fused" if ops else choose_impl(self, self.ranks, impl)
        self.param_names = [n for n, _ in module.named_parameters(recurse=False)]
        # A parameter-free copy of the original module: its forward (argument checks, packed
        # sequences, hidden-state permutation) runs the fused kernel on weights we hand it.
        shell = copy.deepcopy(module)
        for name in list(shell._parameters):
            shell._parameters[name] = None
        shell._flat_weights = [None] * len(shell._flat_weights_names)
        shell._flat_weight_refs = [None] * len(shell._flat_weights_names)
        object.__setattr__(self, "_shell", shell)  # not a submodule: no state_dict entries
        for name, p in module.named_parameters(recurse=False):
            if name in ops:
                continue
            r = self.ranks.get(name)
            kw = {"device": p.device, "dtype": p.dtype}
            if r is None:
                self.register_parameter(name, nn.Parameter(torch.empty(p.shape, **kw)))
            else:
                m, n = p.shape
                if not 1 <= r <= min(m, n):
                    raise ValueError(f"rank of {name} must be in [1, {min(m, n)}], got {r}")
                self.register_parameter(name + "_u", nn.Parameter(torch.empty(m, r, **kw)))
                self.register_parameter(name + "_v", nn.Parameter(torch.empty(r, n, **kw)))

    @staticmethod
    def _class_for(module: nn.Module) -> type[LowRankRNN]:
        return LowRankLSTM if isinstance(module, nn.LSTM) else LowRankGRU

    @classmethod
    def empty_like(
        cls,
        module: nn.Module,
        ranks: dict[str, int | None],
        impl: str = "auto",
        ops: dict[str, nn.Module] | None = None,
    ) -> LowRankRNN:
        """The structure with unset weights (to load saved weights into)."""
        klass = cls._class_for(module) if cls is LowRankRNN else cls
        return klass(module, ranks, impl, ops)

    @classmethod
    def from_dense(
        cls, module: nn.Module, ranks: dict[str, int | None], impl: str = "auto"
    ) -> LowRankRNN:
        """Truncated SVD of each matrix at its rank (Eckart-Young optimal per matrix)."""
        layer = cls.empty_like(module, ranks, impl)
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                r = layer.ranks.get(name)
                if r is None:
                    getattr(layer, name).copy_(p)
                else:
                    a, b = truncated_svd(p.detach(), r)
                    getattr(layer, name + "_u").copy_(a)
                    getattr(layer, name + "_v").copy_(b)
        return layer

    @classmethod
    def from_ops(
        cls, module: nn.Module, ops: dict[str, nn.Module | None], impl: str = "auto"
    ) -> LowRankRNN:
        """`module` with each matrix `ops[name]` replaced: a bias-free LowRankLinear operator is
        stored as its factors (U = A, V = B, the keys of `from_dense`), None (or a matrix `ops`
        does not name) stays dense, any other operator is held as it is (then impl is "fused":
        the matrix is rebuilt from `op.dense_weight()` on each call)."""
        factors = {n: factors_of(op) for n, op in ops.items() if op is not None}
        ranks = {n: f[0].shape[1] for n, f in factors.items() if f is not None}
        held = {n: op for n, op in ops.items() if op is not None and factors[n] is None}
        layer = cls.empty_like(module, ranks, impl, ops=held)
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                if name in held:
                    continue
                if name in ranks:
                    a, b = factors[name]
                    getattr(layer, name + "_u").copy_(a)
                    getattr(layer, name + "_v").copy_(b)
                else:
                    getattr(layer, name).copy_(p)
        return layer

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter of the original module, matrices rebuilt from their factors or
        operators."""
        out = {}
        for name in self.param_names:
            if name in self.ops:
                out[name] = self.ops[name].dense_weight()
            elif self.ranks.get(name) is None:
                out[name] = getattr(self, name)
            else:
                out[name] = getattr(self, name + "_u") @ getattr(self, name + "_v")
        return out

    @torch.no_grad()
    def balance_(self) -> None:
        """Rescale every factorized matrix's U (m x r) and V (r x n) in place (U D, D^-1 V; the
        product is unchanged) so that each column of U and the matching row of V have equal
        norms (layers.lowrank_linear.balance_factors_); matrices held by operators are balanced
        by theirs where they can be."""
        for name in self.param_names:
            if name in self.ops:
                fn = getattr(self.ops[name], "balance_", None)
                if callable(fn):
                    fn()
            elif self.ranks.get(name) is not None:
                balance_factors_(getattr(self, name + "_u"), getattr(self, name + "_v"))

    def dense_matrices(self) -> dict[str, torch.Tensor]:
        """Every gate matrix (`rnn_matrices` order), as the layer computes with it."""
        w = self.weights()
        return {n: w[n] for n in self.ranks}

    def dense_weight(self) -> torch.Tensor:
        """All weight matrices, flattened and concatenated in `rnn_matrices` order."""
        return torch.cat([w.reshape(-1) for w in self.dense_matrices().values()])

    def to_dense(self) -> nn.Module:
        """A stock nn.GRU / nn.LSTM computing the same function."""
        dense = copy.deepcopy(self._shell)
        for name, t in self.weights().items():
            dense._parameters[name] = nn.Parameter(t.detach().clone())
        dense._init_flat_weights()
        return dense

    def forward(self, input: Any, hx: Any = None) -> Any:
        if self.impl == "lowrank" and isinstance(input, torch.Tensor):
            return self._forward_lowrank(input, hx)
        return self._forward_fused(input, hx)

    def _forward_fused(self, input: Any, hx: Any) -> Any:
        shell = self._shell
        shell.train(self.training)
        w = self.weights()
        shell._flat_weights = [w[n] for n in shell._flat_weights_names]
        try:
            return shell(input, hx)
        finally:
            shell._flat_weights = [None] * len(shell._flat_weights_names)  # no dense copies kept

    # -- compute with the factors ------------------------------------------------------------
    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x W^T for all timesteps at once, with the factors if `name` is factorized."""
        if self.ranks.get(name) is None:
            return x @ getattr(self, name).T
        return (x @ getattr(self, name + "_v").T) @ getattr(self, name + "_u").T

    def _recurrent(self, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(V^T, U^T, True) of a factorized recurrent matrix, (W^T, W^T, False) of a dense one.

        The kernels take a tensor and a flag rather than an Optional tensor: the ONNX exporter
        writes a None branch of an Optional as an untyped tensor that onnxruntime cannot load.
        """
        if self.ranks.get(name) is None:
            wt = getattr(self, name).T
            return wt, wt, False
        return getattr(self, name + "_v").T, getattr(self, name + "_u").T, True

    def _forward_lowrank(self, x: torch.Tensor, hx: Any) -> Any:
        lstm = self.mode == "LSTM"
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        batch = x.shape[1]
        zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
        if hx is None:
            h0, c0 = zeros, zeros
        elif lstm:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        else:
            h0 = hx.unsqueeze(1) if unbatched else hx
        gates = (4 if lstm else 3) * self.hidden_size
        no_bias = x.new_zeros(gates)
        kernel = _kernel("lstm" if lstm else "gru")
        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                gi = self._project(layer_in, "weight_ih" + sfx)  # all timesteps in one matmul
                if self.bias:
                    gi = gi + getattr(self, "bias_ih" + sfx)
                b_hh = getattr(self, "bias_hh" + sfx) if self.bias else no_bias
                vt, ut, factored = self._recurrent("weight_hh" + sfx)
                if lstm:
                    seq, h, c = kernel(gi, h0[k], c0[k], vt, ut, factored, b_hh, bool(d))
                    c_n.append(c)
                else:
                    seq, h = kernel(gi, h0[k], vt, ut, factored, b_hh, bool(d))
                outs.append(seq)
                h_n.append(h)
            layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = nn.functional.dropout(layer_in, self.dropout, True)
        out = layer_in
        h_stack = torch.stack(h_n)
        if unbatched:
            out, h_stack = out.squeeze(1), h_stack.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if lstm:
            c_stack = torch.stack(c_n)
            return out, (h_stack, c_stack.squeeze(1) if unbatched else c_stack)
        return out, h_stack

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}={r}" for n, r in self.ranks.items() if r is not None)
        if self.ops:
            ranks = ", ".join([*([ranks] if ranks else []), *(f"{n}=op" for n in self.ops)])
        return (
            f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}), "
            f"impl={self.impl}, ranks: {ranks or 'none'}"
        )


class LowRankGRU(LowRankRNN):
    """Drop-in replacement of an nn.GRU with low-rank weight matrices (see LowRankRNN)."""

    def __init__(
        self,
        module: nn.Module,
        ranks: dict[str, int | None],
        impl: str = "auto",
        ops: dict[str, nn.Module] | None = None,
    ) -> None:
        if not isinstance(module, nn.GRU):
            raise TypeError(f"LowRankGRU wraps nn.GRU, got {type(module).__name__}")
        super().__init__(module, ranks, impl, ops)


class LowRankLSTM(LowRankRNN):
    """Drop-in replacement of an nn.LSTM with low-rank weight matrices (see LowRankRNN)."""

    def __init__(
        self,
        module: nn.Module,
        ranks: dict[str, int | None],
        impl: str = "auto",
        ops: dict[str, nn.Module] | None = None,
    ) -> None:
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"LowRankLSTM wraps nn.LSTM, got {type(module).__name__}")
        super().__init__(module, ranks, impl, ops)
