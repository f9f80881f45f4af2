"""Training adaptations that prepare a network for low-rank compression (Maison, du Mas des Bourboux,
Courtat 2023, "Compression of recurrent neural networks using matrix factorization", arXiv
2310.12688, Sec. 3.2):

- nuclear-norm regularization: loss + lam * c(e) * sum_W ||W||_*, with the ramp c(e) = 0 before
  epoch a, (e - a) / (b - a) between a and b, and 1 after b (the paper uses a, b = 5, 25 or 10, 120
  and lam = 1e-3 or 1e-4). The nuclear norm is the convex surrogate of the rank: it pushes the small
  singular values to zero so that truncation later costs little.
- hard low-rank approximation: every N epochs overwrite each matrix with its rank-R truncated SVD
  (the paper: N = 20, R = 20 or 40); training continues from the truncated weights.

The matrices are those each layer's handler exposes (core.handler): the stacked-gate weight_ih /
weight_hh of every nn.GRU / nn.LSTM by default (as in the paper), optionally those of nn.Linear,
convolutions, GPT-2's Conv1D or attention. The hard step is the "lowrank" compressor's projection
(compressors/lowrank.py) of each handler matrix, written back into its parameter through its
MatrixLayout. `fit_lowrank` is the training loop with both adaptations (Adam, learning rate x
`lr_decay` per epoch as in the paper's experiments).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import get_compressor
from tensorslim.core.handler import Handler, handler_for
from tensorslim.errors import TensorSlimError
from tensorslim.train.loop import fit


def ramp(epoch: float, a: float, b: float) -> float:
    """c(e): 0 for e < a, rising linearly to 1 at e = b, then 1 (a == b is a step at a)."""
    if epoch < a:
        return 0.0
    if epoch >= b:
        return 1.0
    return (epoch - a) / (b - a)


class MatrixLayout:
    """Where the entries of a handler's matrix W (m x n) lie in the parameter holding it: a
    reshape of the parameter ("reshape": Linear, RNN gates, attention; a conv kernel as
    out x in * prod(k)), the transpose of a 2-D parameter ("transpose": GPT-2's Conv1D stores
    W^T), or any other rearrangement ("gather": `index[i, j]` is the flat position of W[i, j]).

    `of` finds it by passing a probe (the parameter's flat positions, shaped like it) through the
    handler's `grad_matrix`, which maps a parameter-shaped tensor to the part's (m x n) layout, and
    checks that the probe gives a rearrangement of the parameter's entries that reproduces
    `handler.matrices(module)[part]` exactly; so `write_` puts the handler's matrix back in the
    parameter's layout.
    """

    def __init__(self, index: torch.Tensor) -> None:
        rows, cols = index.shape
        self.shape = (int(rows), int(cols))
        flat = torch.arange(index.numel(), device=index.device)
        self.view = "gather"
        self.index: torch.Tensor | None = index  # kept only for "gather"
        if torch.equal(index, flat.reshape(rows, cols)):
            self.view, self.index = "reshape", None
        elif torch.equal(index, flat.reshape(cols, rows).T):
            self.view, self.index = "transpose", None

    @classmethod
    def of(cls, handler: Handler, module: nn.Module, part: str) -> MatrixLayout:
        """The layout of matrix `part` of `module` in `handler.weight_parameters(module)[part]`;
        TensorSlimError if the handler's grad_matrix is not a rearrangement of the entries."""
        param = handler.weight_parameters(module)[part]
        probe = torch.arange(param.numel(), device=param.device).reshape(param.shape)
        index = handler.grad_matrix(module, part, probe)
        expected = handler.matrices(module)[part]
        where = f"{type(handler).__name__} matrix {part!r}"
        if index.ndim != 2 or tuple(index.shape) != tuple(expected.shape):
            raise TensorSlimError(
                f"{where}: grad_matrix gives shape {tuple(index.shape)}, the matrix is "
                f"{tuple(expected.shape)}"
            )
        if not torch.equal(index.reshape(-1).sort().values, probe.reshape(-1)):
            raise TensorSlimError(
                f"{where}: grad_matrix is not a rearrangement of the parameter's entries; "
                "cannot write the matrix back into the parameter"
            )
        layout = cls(index)
        got = layout.matrix(param.detach())
        if not torch.isclose(got, expected, rtol=0, atol=0, equal_nan=True).all():
            raise TensorSlimError(f"{where}: grad_matrix does not match the handler's matrices")
        return layout

    @classmethod
    def rows(cls, param: torch.Tensor) -> MatrixLayout:
        """The default layout: the parameter as (shape[0] x rest), a kernel's out x in * prod(k)."""
        rows = param.shape[0] if param.ndim else 1
        return cls(torch.arange(param.numel()).reshape(rows, -1))

    def matrix(self, param: torch.Tensor) -> torch.Tensor:
        """The matrix (m x n) of `param`, differentiable (a view unless the layout is "gather")."""
        rows, cols = self.shape
        if self.view == "reshape":
            return param.reshape(rows, cols)
        if self.view == "transpose":
            return param.reshape(cols, rows).T
        return param.reshape(-1)[self.index.to(param.device)]

    @torch.no_grad()
    def write_(self, param: torch.Tensor, matrix: torch.Tensor) -> None:
        """Overwrite `param` in place so that its matrix is `matrix` (cast to its dtype)."""
        matrix = matrix.to(device=param.device, dtype=param.dtype)
        if self.view == "reshape":
            param.copy_(matrix.reshape(param.shape))
        elif self.view == "transpose":
            param.copy_(matrix.T.reshape(param.shape))
        else:
            flat = param.detach().reshape(-1).clone()
            flat[self.index.to(param.device).reshape(-1)] = matrix.reshape(-1)
            param.copy_(flat.reshape(param.shape))


class LowRankMatrices(dict):
    """{dotted parameter name: parameter} (what `lowrank_matrices` returns) with each matrix's
    layout in its parameter (`layouts[name]`, see MatrixLayout)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layouts: dict[str, MatrixLayout] = {}


def lowrank_matrices(
    model: nn.Module, kinds: Sequence[type[nn.Module]] = (nn.GRU, nn.LSTM)
) -> LowRankMatrices:
    """{dotted parameter name: parameter} of the matrices the adaptations act on: every matrix
    that the handler of a module of `kinds` exposes (by default every stacked-gate matrix of the
    GRU/LSTM modules, as in the paper; add nn.Linear, nn.Conv2d, ... for theirs). A parameter
    reached from several modules is listed once, under its first name."""
    out = LowRankMatrices()
    seen: set[int] = set()
    for name, module in model.named_modules():
        handler = handler_for(module) if isinstance(module, tuple(kinds)) else None
        if handler is None:
            continue
        local = {id(p): n for n, p in module.named_parameters()}
        for part, param in handler.weight_parameters(module).items():
            if id(param) in seen:
                continue
            seen.add(id(param))
            key = f"{name}.{local[id(param)]}" if name else local[id(param)]
            out[key] = param
            out.layouts[key] = MatrixLayout.of(handler, module, part)
    return out


def _layout(matrices: Mapping[str, torch.Tensor], name: str, w: torch.Tensor) -> MatrixLayout:
    """The layout `lowrank_matrices` recorded for `name`, else the parameter as (rows x rest)."""
    layouts = getattr(matrices, "layouts", {})
    return layouts[name] if name in layouts else MatrixLayout.rows(w)


def _rows(w: torch.Tensor) -> torch.Tensor:
    """`w` as a matrix: itself, or a kernel as (shape[0] x rest) (MatrixLayout.rows, no copy)."""
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1)


def nuclear_norm(matrices: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the nuclear norms (sums of singular values) of the matrices; differentiable. A
    tensor with more than two dimensions (a kernel) counts as its (shape[0] x rest) matrix; the
    result of `lowrank_matrices` is read in each handler's layout."""
    layouts = getattr(matrices, "layouts", {})
    items = matrices.items() if isinstance(matrices, Mapping) else enumerate(matrices)
    mats = [layouts[k].matrix(w) if k in layouts else _rows(w) for k, w in items]
    if not mats:
        raise TensorSlimError("nuclear_norm needs at least one matrix")
    # svdvals: the same value and (sub)gradient U V^T as matrix_norm(ord="nuc"), ~2x cheaper on CPU.
    return sum(torch.linalg.svdvals(w).sum() for w in mats)


@torch.no_grad()
def hard_lowrank_(matrices: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    """Overwrite each matrix in place with its rank-`rank` truncated SVD: the projection of the
    "lowrank" compressor (exact SVD) on the handler's matrix, written back into the parameter
    through its layout (matrices whose smaller side is <= rank are left alone). Returns each
    truncated matrix's relative Frobenius error."""
    if rank < 1:
        raise TensorSlimError(f"hard low-rank rank must be >= 1; got {rank}")
    lowrank = get_compressor("lowrank", {"svd": "full"})
    errors = {}
    for name, w in matrices.items():
        layout = _layout(matrices, name, w)
        mat = layout.matrix(w.detach()).to(torch.float64)
        if min(mat.shape) <= rank:
            continue
        w_r = lowrank.project(mat, {"rank": rank})
        norm = float(mat.norm())
        errors[name] = float((mat - w_r).norm()) / norm if norm > 0 else 0.0
        layout.write_(w, w_r)
    return errors


@dataclass
class Adaptations:
    """Which training adaptations to use (None disables one).

    nuclear: (lam, a, b) for loss + lam * c(e) * sum ||W||_*; hard: (every N epochs, rank R).
    """

    nuclear: tuple[float, float, float] | None = None
    hard: tuple[int, int] | None = None
    kinds: tuple[type[nn.Module], ...] = (nn.GRU, nn.LSTM)


def fit_lowrank(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    adaptations: Adaptations | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    lr_decay: float = 0.96,
    batch_size: int = 256,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    description: str = "Training",
) -> list[dict[str, float]]:
    """Train `model` in place with Adam (lr x lr_decay after every epoch, seeded shuffling) and the
    given adaptations. Returns per-epoch records: mean task loss, c(e), nuclear norm, and the
    truncation errors when a hard low-rank step ran at the end of that epoch.

    forward(model, xb) defaults to model(xb); loss_fn defaults to cross-entropy.
    """
    ad = adaptations or Adaptations()
    mats = lowrank_matrices(model, ad.kinds)
    if (ad.nuclear or ad.hard) and not mats:
        raise TensorSlimError(
            "the adaptations need GRU/LSTM (or other `kinds`) matrices; found none"
        )
    coefficients: list[float] = []
    facts: list[dict[str, float]] = []

    def penalty(epoch: int):
        c = ramp(epoch, ad.nuclear[1], ad.nuclear[2]) if ad.nuclear else 0.0
        coefficients.append(c)
        if ad.nuclear and c > 0:
            return lambda: ad.nuclear[0] * c * nuclear_norm(mats)
        return None

    def after_epoch(epoch: int, _model: nn.Module) -> None:
        rec: dict[str, float] = {}
        if ad.nuclear:
            with torch.no_grad():
                rec["nuclear_norm"] = float(nuclear_norm(mats))
        if ad.hard and epoch % ad.hard[0] == 0:
            errs = hard_lowrank_(mats, ad.hard[1])
            rec["hard_rel_error"] = max(errs.values()) if errs else 0.0
        facts.append(rec)

    losses = fit(
        model, x, y, epochs=epochs, lr=lr, lr_decay=lr_decay, batch_size=batch_size, seed=seed,
        loss_fn=loss_fn, forward=forward, penalty=penalty, progress=progress,
        description=description, on_epoch=after_epoch,
    )
    return [
        {"epoch": i + 1, "loss": loss, "c": c, **f}
        for i, (loss, c, f) in enumerate(zip(losses, coefficients, facts))
    ]
