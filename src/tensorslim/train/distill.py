"""Recovery without labels: distil the original model's outputs into its compressed version.

`recover(compressed, original, data, epochs=... | steps=...)` trains the compressed model (in place,
Adam) so that its output, and optionally the outputs of named intermediate modules, match the
original's on unlabeled inputs. The original is only ever run in eval mode without gradients.

The distillation loss of a batch is a sum of relative squared errors, one term for the output and
one per feature module: ||s - t||^2 / ||t||^2 (mean squared error divided by the original's mean
square on the batch), so terms of different scales weigh alike; 0 means identical, 1 an error as
large as the signal. Which tensor of an output is compared: a tensor itself; in a mapping (a dict,
a Hugging Face ModelOutput) `logits`, else `last_hidden_state`, else the first floating tensor; in a
tuple or list the first floating tensor (depth first). The same rule picks from both models, whose
picks must have the same shape.

A checkpoint folder (`checkpoint=`) holds `state.safetensors` (the model's weights, Adam's moment
tensors and step counters, the RNG state) and `progress.json` (the arguments it was made with, the
position in the data, the loss history); it is written atomically after every epoch (and every
`checkpoint_every` steps) and a call with the same arguments continues from it. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim._checkpoint import (
    check_same_run,
    cuda_indices,
    damaged,
    load_model_state,
    model_tensors,
    read_folder,
    restore_rng,
    rng_tensors,
    write_folder,
)
from tensorslim._nested import tensors_in
from tensorslim._progress import bar
from tensorslim.calibrate.collect import numbered
from tensorslim.core.modes import eval_mode, kept_modes
from tensorslim.errors import ExampleInputError, TensorSlimError, WeightFileError, is_int
from tensorslim.layers.additive import Compressed
from tensorslim.plan import Plan

CHECKPOINT_FORMAT = 1
DEFAULT_BATCH_SIZE = 32
# The smallest mean square a term is divided by (an all-zero teacher output stays finite).
_TINY = 1e-12
_DATA_KINDS = (
    "a tensor (split into batches along dim 0), a dict of such tensors (keyword inputs), or an "
    "iterable of batches (a list or DataLoader of tensors, tuples of positional inputs or dicts "
    "of keyword inputs)"
)


@dataclass
class RecoverResult:
    """What a recover() call did. `losses`: the mean distillation loss of every epoch (epochs=)
    or the loss of every step (steps=), `per` saying which. `loss_*` / `cosine_*`: the mean
    distillation loss and the mean per-sample cosine similarity between the two models' outputs
    on the first `eval_batches` batches, with the compressed model in eval mode, before and after
    training; `terms_*` that loss by term ("output" and each feature)."""

    losses: list[float]
    per: str
    steps: int
    epochs: int
    seconds: float
    loss_before: float
    loss_after: float
    cosine_before: float
    cosine_after: float
    terms_before: dict[str, float] = field(default_factory=dict)
    terms_after: dict[str, float] = field(default_factory=dict)
    resumed_at: int = 0
    checkpoint: Path | None = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> str:
        return (
            f"distillation loss {self.loss_before:.4g} -> {self.loss_after:.4g}, "
            f"output cosine {self.cosine_before:.4f} -> {self.cosine_after:.4f} "
            f"({self.steps} steps, {self.seconds:.1f} s)"
        )


# -- arguments ---------------------------------------------------------------------------------
def _positive_int(value: Any, name: str) -> int:
    if not is_int(value) or value < 1:
        raise TensorSlimError(f"{name} must be an integer >= 1; got {value!r}")
    return value


def _check_length(epochs: Any, steps: Any) -> tuple[int | None, int | None]:
    if (epochs is None) == (steps is None):
        raise TensorSlimError(
            "give exactly one of epochs= (passes over the data) and steps= (optimizer steps); "
            f"got epochs={epochs!r}, steps={steps!r}"
        )
    if epochs is not None:
        return _positive_int(epochs, "epochs"), None
    return None, _positive_int(steps, "steps")


def _check_lr(lr: Any) -> float:
    if isinstance(lr, (bool, str, bytes)) or not isinstance(lr, (int, float)):
        raise TensorSlimError(f"lr must be a finite number > 0; got {lr!r}")
    value = float(lr)
    if not (math.isfinite(value) and value > 0):
        raise TensorSlimError(f"lr must be a finite number > 0; got {lr!r}")
    return value


def balance_lowrank_(model: nn.Module) -> int:
    """Balance the factors of every low-rank layer of `model` in place (their products, so the
    model's function, unchanged; layers.lowrank_linear.balance_factors_): Adam's per-parameter
    steps are then of one scale for both factors. Returns how many layers were balanced."""
    n = 0
    for m in model.modules():
        fn = getattr(m, "balance_", None)
        if isinstance(m, Compressed) and callable(fn):
            fn()
            n += 1
    return n


def _check_models(compressed: Any, original: Any) -> list[nn.Parameter]:
    for name, m in (("compressed", compressed), ("original", original)):
        if not isinstance(m, nn.Module):
            raise TensorSlimError(f"{name} must be a torch nn.Module; got {type(m).__name__}")
    if compressed is original:
        raise TensorSlimError(
            "compressed and original are the same module; pass the compressed copy and the "
            "original model (tensorslim.compress returns a new module)"
        )
    frozen = {p.data_ptr() for p in original.parameters() if p.numel()}
    frozen |= {b.data_ptr() for b in original.buffers() if b.numel()}
    shared = [
        n
        for n, p in (*compressed.named_parameters(), *compressed.named_buffers())
        if p.numel() and p.data_ptr() in frozen
    ]
    if shared:
        raise TensorSlimError(
            f"the compressed model shares parameters with the original ({', '.join(shared[:3])}"
            + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
            + "); training it would change the original: pass a copy (copy.deepcopy)"
        )
    params = [p for p in compressed.parameters() if p.requires_grad]
    if not params:
        raise TensorSlimError("the compressed model has no trainable parameters (requires_grad)")
    return params


def _check_features(features: Any, compressed: nn.Module, original: nn.Module) -> list[str]:
    if features is None:
        return []
    if isinstance(features, (str, bytes)) or not isinstance(features, (list, tuple)):
        raise TensorSlimError(
            f"features must be a list of module names (e.g. ['encoder.layer.3']); got "
            f"{features!r:.80}"
        )
    s_mods = dict(compressed.named_modules(remove_duplicate=False))
    t_mods = dict(original.named_modules(remove_duplicate=False))
    names: list[str] = []
    for name in features:
        if not isinstance(name, str) or not name:
            raise TensorSlimError(
                f"features must be non-empty module names; got {name!r} (the whole model's output "
                "is always matched)"
            )
        if name in names:
            raise TensorSlimError(f"feature {name!r} is named twice")
        for who, mods in (("original", t_mods), ("compressed", s_mods)):
            if name not in mods:
                known = [n for n in mods if n][:8]
                raise TensorSlimError(
                    f"feature {name!r}: the {who} model has no module of that name (modules "
                    f"include {', '.join(known)}{', ...' if len(mods) > 9 else ''})"
                )
        if s_mods[name] is t_mods[name]:
            raise TensorSlimError(f"feature {name!r} is the same module object in both models")
        names.append(name)
    return names


# -- data --------------------------------------------------------------------------------------
def _samples(batch: Any) -> int:
    """The batch's size along dim 0 of its first tensor (1 if it has none)."""
    for t in tensors_in(batch):
        if t.ndim:
            return int(t.shape[0])
    return 1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


class _Data:
    """The training data as numbered passes: `epoch(e, start)` yields (index, batch) of pass e
    from batch `start`; `head` are the first batches (for the before/after measurement)."""

    def __init__(self, data: Any, batch_size: Any, seed: int, eval_batches: int) -> None:
        self.seed = seed
        self.table: dict[str, torch.Tensor] | torch.Tensor | None = None
        self.one_shot = False
        self.length: int | None = None
        if isinstance(data, (str, bytes)):
            raise TensorSlimError(f"data must be {_DATA_KINDS}; got a {type(data).__name__}")
        if isinstance(data, torch.Tensor) or (
            isinstance(data, Mapping)
            and data
            and all(isinstance(v, torch.Tensor) for v in data.values())
        ):
            self._init_table(data, batch_size)
        elif isinstance(data, Mapping):
            raise TensorSlimError(
                "data as a dict must map input names to tensors of equal length along dim 0; "
                f"got {', '.join(f'{k}: {type(v).__name__}' for k, v in list(data.items())[:4])}"
            )
        else:
            if batch_size is not None:
                raise TensorSlimError(
                    "batch_size is for data given as a tensor (or a dict of tensors); the batches "
                    "of an iterable are used as they come"
                )
            try:
                it = iter(data)
            except TypeError:
                raise TensorSlimError(
                    f"data must be {_DATA_KINDS}; got {type(data).__name__}"
                ) from None
            self.data = data
            self.one_shot = it is data
            with contextlib.suppress(TypeError):
                self.length = len(data)
            self._stream = it
        self.head = self._take_head(eval_batches)
        if not self.head:
            raise TensorSlimError("data is empty: give at least one batch of inputs")

    def _init_table(self, data: Any, batch_size: Any) -> None:
        size = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int(batch_size, "batch_size")
        tensors = [data] if isinstance(data, torch.Tensor) else list(data.values())
        lengths = {int(t.shape[0]) if t.ndim else -1 for t in tensors}
        if -1 in lengths:
            raise TensorSlimError("data tensors need a batch dimension (dim 0); got a 0-d tensor")
        if len(lengths) != 1:
            raise TensorSlimError(
                "data tensors must have the same length along dim 0; got "
                + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in dict(data).items())
            )
        n = lengths.pop()
        if n == 0:
            raise TensorSlimError("data is empty: the tensor has 0 rows")
        self.table = data if isinstance(data, torch.Tensor) else dict(data)
        self.rows, self.batch_size = n, size
        self.length = -(-n // size)

    def _rows(self, idx: torch.Tensor) -> Any:
        if isinstance(self.table, torch.Tensor):
            return self.table[idx]
        return {k: v[idx] for k, v in self.table.items()}

    def _take_head(self, k: int) -> list[Any]:
        if self.table is not None:
            order = torch.arange(self.rows)
            return [
                self._rows(order[s : s + self.batch_size])
                for s in range(0, min(self.rows, k * self.batch_size), self.batch_size)
            ]
        head = []
        for _, batch in _read(self._stream, 0):
            head.append(batch)
            if len(head) >= k:
                break
        if not self.one_shot:
            self._stream = None  # each pass starts a fresh iteration
        return head

    def epoch(self, e: int, start: int) -> Iterator[tuple[int, Any]]:
        if self.table is not None:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, e))
            perm = torch.randperm(self.rows, generator=gen)
            for b in range(start, self.length):
                yield b, self._rows(perm[b * self.batch_size : (b + 1) * self.batch_size])
            return
        if self.one_shot:
            if e == 0:
                stream: Iterable[Any] = _chain(self.head, self._stream)
            else:
                stream = iter(())
        else:
            stream = iter(self.data)
        for b, batch in _read(stream, e):
            if b >= start:
                yield b, batch


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


def _read(stream: Iterable[Any], epoch: int) -> Iterator[tuple[int, Any]]:
    """(index, batch) pairs; an error raised while reading the data names the batch."""
    return numbered(stream, lambda i: f"batch {i} of epoch {epoch + 1} from the data")


def _fingerprint(batches: list[Any]) -> list[list[Any]]:
    """Shapes, dtypes and sums of the first batches' tensors: a resumed run must see the same."""
    out = []
    for batch in batches:
        for t in tensors_in(batch):
            t = t.detach()
            total = repr(float(t.double().sum())) if not t.is_complex() else ""
            out.append([list(t.shape), str(t.dtype).removeprefix("torch."), total])
    return out


# -- running the models ------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    return obj


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor of shape {tuple(batch.shape)}, dtype {batch.dtype}"
    if isinstance(batch, Mapping):
        return "dict with keys " + ", ".join(map(str, batch))
    if isinstance(batch, (tuple, list)):
        return f"{len(batch)} positional inputs"
    return type(batch).__name__


def _call(model: nn.Module, batch: Any, who: str, where: str) -> Any:
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except TensorSlimError:
        raise
    except Exception as exc:  # the model's own error is a problem with the user's input
        raise ExampleInputError(
            f"the {who} model rejected {where} ({_describe(batch)}): {type(exc).__name__}: "
            f"{exc}; data must be model inputs: {_DATA_KINDS}"
        ) from exc


def pick_output(out: Any, depth: int = 0) -> torch.Tensor | None:
    """The tensor of a model (or module) output that distillation compares: the output if it is
    a floating tensor; in a mapping (dict, ModelOutput) `logits`, else `last_hidden_state`, else
    the first floating tensor; in a tuple or list the first floating tensor, depth first."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if depth >= 16:
        return None
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            v = out.get(key)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
        items: Sequence[Any] = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return None
    for item in items:
        found = pick_output(item, depth + 1)
        if found is not None:
            return found
    return None


class _Taps:
    """Forward hooks recording the outputs of the feature modules of both models."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
        self.names = names
        self.store: dict[str, dict[str, list[Any]]] = {"s": {}, "t": {}}
        self.handles: list[Any] = []
        for key, model in (("s", student), ("t", teacher)):
            mods = dict(model.named_modules(remove_duplicate=False))
            for name in names:
                self.handles.append(mods[name].register_forward_hook(self._hook(key, name)))
        self.clear()

    def _hook(self, key: str, name: str) -> Callable[..., None]:
        def hook(_module, _args, output) -> None:
            picked = pick_output(output)
            if picked is not None and key == "t":
                picked = picked.detach()
            self.store[key][name].append(picked)

        return hook

    def clear(self) -> None:
        for key in ("s", "t"):
            self.store[key] = {n: [] for n in self.names}

    def take(self, key: str) -> dict[str, list[Any]]:
        got, self.store[key] = self.store[key], {n: [] for n in self.names}
        return got

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _rel_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(t.dtype, torch.float32)
    s, t = s.to(dtype), t.to(device=s.device, dtype=dtype)
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(_TINY)


def _mismatch(what: str, s: Any, t: Any, where: str) -> TensorSlimError:
    shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else "no floating tensor"  # noqa: E731
    return TensorSlimError(
        f"{where}: {what} of the compressed model ({shape(s)}) does not match the original's "
        f"({shape(t)}); recover needs models whose outputs have the same shapes"
    )


def _terms(
    s_out: Any,
    t_out: Any,
    s_feats: dict[str, list[Any]],
    t_feats: dict[str, list[Any]],
    where: str,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch: "output" and one per feature module."""
    s, t = pick_output(s_out), pick_output(t_out)
    if t is None:
        raise TensorSlimError(
            f"{where}: the original model's output holds no floating-point tensor to distil"
        )
    if s is None or s.shape != t.shape:
        raise _mismatch("the output", s, t, where)
    terms = {"output": _rel_mse(s, t)}
    for name in t_feats:
        ss, ts = s_feats[name], t_feats[name]
        if len(ss) != len(ts) or not ts:
            raise TensorSlimError(
                f"{where}: feature {name!r} ran {len(ts)} times in the original model and "
                f"{len(ss)} times in the compressed one; name modules that run alike in both"
            )
        parts = []
        for a, b in zip(ss, ts):
            if b is None:
                raise TensorSlimError(
                    f"{where}: feature {name!r}'s output holds no floating-point tensor"
                )
            if a is None or a.shape != b.shape:
                raise _mismatch(f"the output of feature {name!r}", a, b, where)
            parts.append(_rel_mse(a, b))
        terms[name] = torch.stack(parts).mean() if len(parts) > 1 else parts[0]
    return terms


def _cosines(s_out: Any, t_out: Any) -> tuple[float, int]:
    """Sum and count of the per-sample cosine similarities of the compared outputs."""
    s, t = pick_output(s_out), pick_output(t_out)
    dtype = torch.promote_types(t.dtype, torch.float32)
    s, t = s.detach().to(dtype), t.detach().to(device=s.device, dtype=dtype)
    if s.ndim >= 2:
        s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    else:
        s, t = s.reshape(1, -1), t.reshape(1, -1)
    cos = nn.functional.cosine_similarity(s, t, dim=1)
    return float(cos.sum()), int(cos.numel())


class _Pair:
    """The two models, their devices and the feature taps: one distillation forward pass."""

    def __init__(self, student: nn.Module, teacher: nn.Module, taps: _Taps) -> None:
        self.student, self.teacher, self.taps = student, teacher, taps
        self.s_dev, self.t_dev = _device(student), _device(teacher)

    def forward(self, batch: Any, where: str) -> tuple[dict[str, torch.Tensor], Any, Any]:
        self.taps.clear()
        with torch.no_grad():
            t_out = _call(self.teacher, _to(batch, self.t_dev), "original", where)
        t_feats = self.taps.take("t")
        s_out = _call(self.student, _to(batch, self.s_dev), "compressed", where)
        s_feats = self.taps.take("s")
        return _terms(s_out, t_out, s_feats, t_feats, where), s_out, t_out


def _nonfinite_error(batch: Any, terms: dict[str, torch.Tensor], where: str) -> TensorSlimError:
    bad_input = [
        t for t in tensors_in(batch) if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    bad_terms = [k for k, v in terms.items() if not math.isfinite(float(v.detach()))]
    cause = (
        "the batch itself holds NaN/Inf values"
        if bad_input
        else f"the term(s) {', '.join(bad_terms)} are not finite: the model diverged or "
        "overflows; lower lr"
    )
    return TensorSlimError(
        f"the distillation loss is NaN/Inf at {where}: {cause} (the compressed model keeps the "
        "weights of the last finite step)"
    )


@torch.no_grad()
def _measure(pair: _Pair, batches: list[Any], when: str) -> tuple[float, float, dict[str, float]]:
    """Mean loss (weighted by samples), mean per-sample output cosine, mean loss by term."""
    loss_sum, n, cos_sum, cos_n = 0.0, 0, 0.0, 0
    term_sums: dict[str, float] = {}
    with eval_mode(pair.student):
        for i, batch in enumerate(batches):
            where = f"batch {i} (counting from 0) {when}"
            terms, s_out, t_out = pair.forward(batch, where)
            k = _samples(batch)
            values = {name: float(v) for name, v in terms.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise _nonfinite_error(batch, terms, where)
            for name, v in values.items():
                term_sums[name] = term_sums.get(name, 0.0) + v * k
            loss_sum += sum(values.values()) * k
            n += k
            c, m = _cosines(s_out, t_out)
            cos_sum, cos_n = cos_sum + c, cos_n + m
    return loss_sum / n, cos_sum / max(1, cos_n), {k: v / n for k, v in term_sums.items()}


# -- checkpoint ---------------------------------------------------------------------------------
def _seed_rng(seed: int, cuda: list[int]) -> None:
    torch.random.default_generator.manual_seed(seed)
    for i in cuda:
        torch.cuda.default_generators[i].manual_seed(seed)


def _write_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cuda: list[int],
    progress: dict[str, Any],
) -> None:
    tensors = model_tensors(model)
    scalars: dict[str, Any] = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars[f"{idx}/{k}"] = v
    tensors.update(rng_tensors(cuda))
    write_folder(path, tensors, {**progress, "optim_scalars": scalars})


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(progress, tensors) of a checkpoint folder; None if there is none yet."""
    return read_folder(path, "a recover", CHECKPOINT_FORMAT)


def _bad(path: Path, what: str) -> WeightFileError:
    return damaged(path, what)


def _restore(
    path: Path,
    progress: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cuda: list[int],
) -> None:
    """Load the model weights, Adam's state and the RNG states of a checkpoint."""
    load_model_state(path, tensors, model)
    scalars = progress.get("optim_scalars")
    if not isinstance(scalars, dict):
        raise _bad(path, "optim_scalars is not an object")
    n = len(opt.param_groups[0]["params"])
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in [
        *((k.removeprefix("optim/"), v) for k, v in tensors.items() if k.startswith("optim/")),
        *scalars.items(),
    ]:
        idx, _, name = key.partition("/")
        if not (idx.isdigit() and int(idx) < n and name):
            raise _bad(path, f"unknown optimizer entry {key!r}")
        opt_state.setdefault(int(idx), {})[name] = v
    try:
        opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise _bad(path, f"optimizer state: {exc}") from exc
    restore_rng(path, tensors, cuda)


def _progress_state(saved: dict[str, Any], path: Path) -> dict[str, Any]:
    """The counters of a checkpoint's progress, type-checked."""
    p = saved.get("progress")
    ints = ("step", "epoch", "batch", "epoch_count")
    if not isinstance(p, dict) or not all(is_int(p.get(k)) and p[k] >= 0 for k in ints):
        raise _bad(path, "progress counters missing or not integers >= 0")
    floats = ("epoch_total", "seconds")
    if not all(isinstance(p.get(k), (int, float)) for k in floats):
        raise _bad(path, "progress totals missing")
    losses = p.get("losses")
    if not isinstance(losses, list) or not all(isinstance(v, (int, float)) for v in losses):
        raise _bad(path, "loss history is not a list of numbers")
    before = p.get("before")
    if not (
        isinstance(before, dict)
        and isinstance(before.get("loss"), (int, float))
        and isinstance(before.get("cosine"), (int, float))
        and isinstance(before.get("terms"), dict)
    ):
        raise _bad(path, "no before-training measurement")
    return p


# -- the loop -----------------------------------------------------------------------------------
def recover(
    compressed: nn.Module,
    original: nn.Module,
    data: Any,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-4,
    features: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    train_mode: bool = True,
    plan: Plan | None = None,
    eval_batches: int = 4,
    checkpoint_every: int | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> RecoverResult:
    """Distil `original` into `compressed` (trained in place with Adam at `lr`) on unlabeled
    `data`, for `epochs` passes over it or `steps` optimizer steps (exactly one).

    data: model inputs like compress's `calibration=`: an iterable of batches (tensors, tuples of
    positional inputs, dicts of keyword inputs; a list or DataLoader is read once per epoch, a
    one-shot iterator or generator only once: epochs=1, or steps up to its length), or a tensor
    (or a dict of tensors) split into shuffled batches of `batch_size` rows (default 32; a new
    seeded order every epoch). features: names of modules (in both models) whose outputs are
    matched too. The loss is the sum of relative squared errors described in the module
    docstring. `original` runs in eval mode without gradients and is never modified;
    `compressed` trains in train mode (dropout, BatchNorm statistics) unless `train_mode=False`;
    both models' modes are restored afterwards. The loss and cosine before/after are measured on
    the first `eval_batches` batches in eval mode.

    checkpoint: a folder written atomically after every epoch (and every `checkpoint_every`
    steps) and at the end; a call with the same arguments and data resumes from it, with weights
    identical to an uninterrupted run's wherever the run itself is reproducible (CPU; CUDA with
    torch.use_deterministic_algorithms(True)) and an iterable yields its batches in the same
    order (a list, or a DataLoader with a seeded generator). A finished checkpoint makes the same
    call return at once with the final weights; delete the folder to start over. Before training,
    the factors of every low-rank layer are balanced (balance_lowrank_: same function, equal
    factor norms per rank index), without which Adam's uniform step size wrecks the small
    factor of a whitened layer. plan: a tensorslim Plan whose meta["recover"] list gets
    a record of this run. on_epoch(epoch, model) (epoch counted from 1) runs after each epoch's
    checkpoint. Dropout draws from torch's global generator, seeded with `seed` (and restored on
    resume) inside a fork, so the caller's random state is left as it was.

    Raises TensorSlimError for bad arguments, models whose outputs differ in shape, and a NaN/Inf
    loss (naming the step; the model keeps the last finite step's weights).
    """
    params = _check_models(compressed, original)
    epochs, steps = _check_length(epochs, steps)
    lr = _check_lr(lr)
    names = _check_features(features, compressed, original)
    if not is_int(seed):
        raise TensorSlimError(f"seed must be an integer; got {seed!r}")
    if not isinstance(train_mode, bool):
        raise TensorSlimError(f"train_mode must be True or False; got {train_mode!r}")
    eval_batches = _positive_int(eval_batches, "eval_batches")
    if checkpoint_every is not None:
        checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
    if plan is not None and not isinstance(plan, Plan):
        raise TensorSlimError(f"plan must be a tensorslim Plan; got {type(plan).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise TensorSlimError(f"checkpoint must be a folder path; got {checkpoint!r:.60}")
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        from tensorslim.io import check_output_dir

        check_output_dir(ck)  # before any work: a folder we may not replace is refused now
    source = _Data(data, batch_size, seed, eval_batches)
    if source.one_shot and epochs is not None and epochs > 1:
        raise TensorSlimError(
            f"data is a one-shot iterator ({type(data).__name__}), which can be read once: "
            "pass epochs=1 or steps= (at most its number of batches), or a list / DataLoader "
            "for several epochs"
        )

    config = {
        "epochs": epochs,
        "steps": steps,
        "lr": lr,
        "features": names,
        "batch_size": getattr(source, "batch_size", None),
        "seed": seed,
        "train_mode": train_mode,
        "eval_batches": eval_batches,
        "checkpoint_every": checkpoint_every,
        "params": [
            [n, list(p.shape), str(p.dtype).removeprefix("torch.")]
            for n, p in compressed.named_parameters()
            if p.requires_grad
        ],
        "data": _fingerprint(source.head),
    }
    saved = _read_checkpoint(ck) if ck is not None else None
    if saved is not None:
        check_same_run(ck, saved[0], config)
    balanced = balance_lowrank_(compressed)  # a resumed run loads its (balanced) weights after
    opt = torch.optim.Adam(params, lr=lr)
    cuda = cuda_indices(compressed)
    per = "epoch" if epochs is not None else "step"

    taps = _Taps(compressed, original, names)
    try:
        with (
            kept_modes(compressed),
            eval_mode(original),
            torch.random.fork_rng(devices=cuda),
        ):
            pair = _Pair(compressed, original, taps)
            if saved is not None:
                prog = _progress_state(saved[0], ck)
                _restore(ck, saved[0], saved[1], compressed, opt, cuda)
                before = prog["before"]
            else:
                loss0, cos0, terms0 = _measure(pair, source.head, "before training")
                before = {"loss": loss0, "cosine": cos0, "terms": terms0}
                prog = {
                    "step": 0,
                    "epoch": 0,
                    "batch": 0,
                    "epoch_total": 0.0,
                    "epoch_count": 0,
                    "seconds": 0.0,
                    "losses": [],
                    "before": before,
                }
                _seed_rng(seed, cuda)
            resumed_at = prog["step"]
            prog = _train(
                pair,
                source,
                opt,
                params,
                prog,
                epochs=epochs,
                steps=steps,
                per=per,
                train_mode=train_mode,
                progress=progress,
                ck=ck,
                cuda=cuda,
                config=config,
                checkpoint_every=checkpoint_every,
                on_epoch=on_epoch,
            )
            loss1, cos1, terms1 = _measure(pair, source.head, "after training")
    finally:
        taps.close()

    result = RecoverResult(
        losses=[float(v) for v in prog["losses"]],
        per=per,
        steps=prog["step"],
        epochs=prog["epoch"],
        seconds=float(prog["seconds"]),
        loss_before=float(before["loss"]),
        loss_after=loss1,
        cosine_before=float(before["cosine"]),
        cosine_after=cos1,
        terms_before={k: float(v) for k, v in before["terms"].items()},
        terms_after=terms1,
        resumed_at=resumed_at,
        checkpoint=ck,
    )
    if plan is not None:
        record = {
            "epochs": epochs,
            "steps": steps,
            "steps_run": result.steps,
            "lr": lr,
            "features": names,
            "batch_size": config["batch_size"],
            "seed": seed,
            "final_loss": result.final_loss,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "cosine_before": result.cosine_before,
            "cosine_after": result.cosine_after,
            "seconds": round(result.seconds, 3),
            "balanced_layers": balanced,
        }
        runs = plan.meta.get("recover")
        if isinstance(runs, dict):
            runs = [runs]
        elif not isinstance(runs, list):
            runs = []
        plan.meta["recover"] = [*runs, record]
    return result


def _train(
    pair: _Pair,
    source: _Data,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    prog: dict[str, Any],
    *,
    epochs: int | None,
    steps: int | None,
    per: str,
    train_mode: bool,
    progress: bool,
    ck: Path | None,
    cuda: list[int],
    config: dict[str, Any],
    checkpoint_every: int | None,
    on_epoch: Callable[[int, nn.Module], None] | None,
) -> dict[str, Any]:
    """The distillation loop from the counters in `prog` (updated and returned)."""
    model = pair.student
    step, epoch, pos = prog["step"], prog["epoch"], prog["batch"]
    epoch_total, epoch_count = float(prog["epoch_total"]), prog["epoch_count"]
    losses = list(prog["losses"])
    seconds = float(prog["seconds"])
    start = time.perf_counter()

    def snapshot() -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            "batch": pos,
            "epoch_total": epoch_total,
            "epoch_count": epoch_count,
            "losses": losses,
            "before": prog["before"],
            "seconds": seconds + time.perf_counter() - start,
        }

    def save() -> None:
        if ck is not None:
            payload = {"format": CHECKPOINT_FORMAT, "config": config, "progress": snapshot()}
            _write_checkpoint(ck, model, opt, cuda, payload)

    def finished() -> bool:
        return (epochs is not None and epoch >= epochs) or (steps is not None and step >= steps)

    if epochs is not None:
        total = epochs * source.length if source.length is not None else None
    else:
        total = steps
    with bar(progress, "Recovering", total, ("loss",), completed=step) as update:
        while not finished():
            model.train(train_mode)
            seen = 0
            for seen, (b, batch) in enumerate(source.epoch(epoch, pos), 1):  # noqa: B007
                where = f"step {step + 1} (epoch {epoch + 1}, batch {b + 1}, counting from 1)"
                opt.zero_grad(set_to_none=True)
                terms, _, _ = pair.forward(batch, where)
                loss = sum(terms.values())
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise _nonfinite_error(batch, terms, where)
                loss.backward()
                bad = [
                    p
                    for p in params
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                ]
                if bad:
                    raise TensorSlimError(
                        f"the gradients hold NaN/Inf at {where} although the loss is finite "
                        f"({value:.4g}); lower lr (the model keeps the last finite step's weights)"
                    )
                opt.step()
                step, pos = step + 1, b + 1
                k = _samples(batch)
                epoch_total, epoch_count = epoch_total + value * k, epoch_count + k
                if per == "step":
                    losses.append(value)
                update(loss=float(value))
                if checkpoint_every is not None and step % checkpoint_every == 0 and not finished():
                    save()
                if steps is not None and step >= steps:
                    break
            else:
                if seen == 0 and pos == 0:
                    raise _ran_out(source, step, steps, epoch)
                if per == "epoch":
                    losses.append(epoch_total / max(1, epoch_count))
                epoch, pos, epoch_total, epoch_count = epoch + 1, 0, 0.0, 0
                if not finished():
                    save()
                if on_epoch is not None:
                    on_epoch(epoch, model)
                continue
            break
    if step > prog["step"] or epoch > prog["epoch"]:
        save()
    return snapshot()


def _ran_out(source: _Data, step: int, steps: int | None, epoch: int) -> TensorSlimError:
    if source.one_shot:
        return TensorSlimError(
            f"data is a one-shot iterator and ran out after {step} batches, at step {step + 1} of "
            f"{steps}; pass steps <= {step}, or a list / DataLoader (read again every epoch)"
        )
    return TensorSlimError(f"data yielded no batches in epoch {epoch + 1}")
