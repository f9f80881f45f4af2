"""Save and load compressed models (plan.json + model.safetensors), read user weights, ONNX export.

Nothing here unpickles a file unless the caller passes `trust_pickle=True`. Every output is written
under a temporary name in the destination's folder and renamed into place, so an error never leaves
a half-written output or damages an existing one. A folder is only ever replaced if tensorslim wrote
it: every saved folder holds a `.tensorslim` marker listing the SHA-256 of each file written, and a
non-empty folder without a valid marker (or with files added or changed since) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim._nested import tensors_in
from tensorslim._version import __version__
from tensorslim.core.modes import eval_mode
from tensorslim.errors import ExampleInputError, TensorSlimError, WeightFileError
from tensorslim.plan import Plan
from tensorslim.plan.apply import apply_plan

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = ".tensorslim"
MARKER_FORMAT = 1
_MAX_MARKER_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# How many key names an error message lists before "(and N more)".
_SHOWN = 3


# -- output paths ------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, exc: BaseException) -> WeightFileError:
    """A WeightFileError naming `path` and the OS's reason for a failed write."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return WeightFileError(f"cannot write {str(path)!r}: {reason}")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _check_location(out: Path) -> None:
    """Refuse the working directory (or above it) and a path under a regular file."""
    real = _real(out)
    if _is_within(_real(os.getcwd()), real):
        raise WeightFileError(
            f"refusing to write to {str(out)!r}: it is the current directory or one of its "
            "parents; choose a new or empty output folder"
        )
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WeightFileError(
                    f"cannot write {str(out)!r}: {str(parent)!r} is a regular file, not a folder"
                )
            break


def check_not_inputs(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is one of `inputs`, lies inside one, or contains one."""
    real = _real(out)
    for item in inputs:
        src = _real(item)
        if _is_within(src, real) or _is_within(real, src):
            raise WeightFileError(
                f"refusing to write {str(out)!r}: it would replace {str(item)!r}, an input of "
                "this command; choose another output path"
            )


def check_output_dir(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Raise unless `out` may become (or be replaced by) a tensorslim output folder."""
    out = Path(out)
    _check_location(out)
    check_not_inputs(out, inputs)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise WeightFileError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir():
        try:
            why = _not_ours(out)
        except OSError as exc:  # an unreadable folder is never ours to delete
            why = f"cannot read it ({exc.strerror or exc})"
        if why:
            raise WeightFileError(
                f"refusing to replace folder {str(out)!r}: {why}; choose a new or empty output "
                "folder (tensorslim only replaces folders it wrote itself)"
            )
    return out


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Raise unless `path` may be written (or replaced) as a single output file."""
    path = Path(path)
    _check_location(path)
    check_not_inputs(path, inputs)
    if path.is_dir():
        raise WeightFileError(f"output {str(path)!r} is a folder; name a file")
    return path


# -- the .tensorslim marker ------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _raise(exc: OSError) -> None:
    raise exc


def _files_below(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files below `folder` by relative path, and entries that are links or special."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    for root, dirs, names in os.walk(folder, onerror=_raise):
        for name in dirs + names:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                odd.append(rel)
            elif p.is_file():
                files[rel] = p
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    return files, odd


def _marker_text(hashes: dict[str, str]) -> str:
    """The marker's JSON: format, tensorslim's version and {relative path: sha256}."""
    files = dict(sorted(hashes.items()))
    marker = {"format": MARKER_FORMAT, "tensorslim": __version__, "files": files}
    return json.dumps(marker, indent=2)


def _write_marker(folder: Path) -> None:
    """Record the hash of every file in `folder` (the marker aside)."""
    files, _ = _files_below(folder)
    files.pop(MARKER_FILE, None)
    (folder / MARKER_FILE).write_text(_marker_text({rel: _sha256(p) for rel, p in files.items()}))


def _read_marker(folder: Path) -> dict[str, str] | None:
    """The marker's {file: sha256}, or None if it is missing or not a valid marker."""
    marker = folder / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        if marker.stat().st_size > _MAX_MARKER_BYTES:
            return None
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in files.items()
    ):
        return None
    return files


def _not_ours(folder: Path) -> str | None:
    """Why `folder` may not be replaced, or None if it is empty or exactly what tensorslim wrote."""
    if not any(folder.iterdir()):
        return None
    recorded = _read_marker(folder)
    if recorded is None:
        return f"it was not written by tensorslim (no valid {MARKER_FILE} marker)"
    found, odd = _files_below(folder)
    found.pop(MARKER_FILE, None)
    foreign = odd + sorted(set(found) - set(recorded))
    if foreign:
        return f"it holds files tensorslim did not write ({_names(foreign)})"
    changed = [rel for rel in sorted(found) if _sha256(found[rel]) != recorded[rel]]
    if changed:
        return f"{_names(changed)} changed since tensorslim wrote it"
    return None


def _is_ours(folder: Path) -> bool:
    """True if `folder` holds a valid marker and exactly the files it lists."""
    try:  # _not_ours accepts an empty folder: require the marker file first
        return (folder / MARKER_FILE).is_file() and _not_ours(folder) is None
    except OSError:
        return False


def _record_in_marker(path: Path) -> None:
    """Add a file just written into a tensorslim folder to that folder's marker."""
    recorded = _read_marker(path.parent)
    if recorded is None:
        return
    recorded[path.name] = _sha256(path)
    text = _marker_text(recorded)
    atomic_write_file(path.parent / MARKER_FILE, lambda p: p.write_text(text))


# -- atomic writes ----------------------------------------------------------------------------
def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and put back on failure."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Folders 0o777 and files 0o666 under the umask, as any tool creates them (mkdtemp makes
    0o700 and some writers 0o600, which a serving account could not read)."""
    mask = _umask()
    for root, _, names in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            p = Path(root) / name
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~mask)


def atomic_write_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, add the .tensorslim marker and move tmp_dir to `out`.

    An existing `out` is replaced only if it is empty or a folder tensorslim wrote (see the module
    docstring). The folder and its files get the usual permissions under the umask. OSErrors
    become WeightFileError naming the folder and the OS's reason; nothing is left behind."""
    out = check_output_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        write(tmp)
        _write_marker(tmp)
        _follow_umask(tmp)
        _swap_in(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(out, exc) from exc
        raise
    return out


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it to `path`.

    The file gets the usual permissions under the umask; OSErrors become WeightFileError naming
    `path` and the OS's reason. A file written into a tensorslim folder joins its marker."""
    path = check_output_file(path)
    adopt = path.name != MARKER_FILE and _is_ours(path.parent)  # before the temp file exists
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise
    if adopt:
        _record_in_marker(path)
    return path


# Set by tensorslim.speed.levers on a model returned with levers kept (their names), and by the
# speed search (the model before the levers): such a model's state dict no longer matches its plan
# (folded BatchNorm, merged stages), so save() writes the model before the levers or refuses.
LEVERS_ATTR = "_tensorslim_levers"
LEVERS_BASE_ATTR = "_tensorslim_before_levers"


def save(model: nn.Module, plan: Plan, out_dir: str | Path) -> Path:
    """Write `out_dir/plan.json` and `out_dir/model.safetensors` atomically; returns the folder.

    A model with inference levers applied (tensorslim.speed.levers: folded BatchNorm, merged
    stages) no longer matches its plan: the model before the levers is written if the speed
    search kept it (compress(speedup=...)), else it is refused before anything is written."""
    levers = getattr(model, LEVERS_ATTR, ())
    if levers:
        base = getattr(model, LEVERS_BASE_ATTR, None)
        if base is None:
            raise TensorSlimError(
                f"this model has inference levers applied ({', '.join(levers)}), so its weights "
                "no longer match the plan and could not be loaded back: save the model before "
                "tensorslim.speed.levers.apply_levers and apply the levers again after loading"
            )
        model = base

    def write(tmp: Path) -> None:
        plan.to_json(tmp / PLAN_FILE)
        save_weights(model, tmp / WEIGHTS_FILE)

    return atomic_write_dir(out_dir, write)


def save_weights(model: nn.Module, path: Path) -> None:
    """safetensors' save_model, with its I/O errors raised as OSError (errno and reason kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        save_model(model, str(path))
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


# -- reading weights ----------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

Entry = tuple[tuple[int, ...], Any]  # (shape, torch.dtype or the file's dtype name)


def _kind(dtype: Any) -> str:
    if not isinstance(dtype, torch.dtype):
        return "unknown"
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _expected(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """The model's state_dict and its groups of names sharing one tensor (tied weights)."""
    state = model.state_dict()
    groups: dict[Any, list[str]] = {}
    for k, v in state.items():
        ptr = v.data_ptr() if v.numel() else 0
        groups.setdefault((ptr, v.dtype, tuple(v.shape)) if ptr else k, []).append(k)
    return state, list(groups.values())


def fit_problems(model: nn.Module, entries: Mapping[str, Entry], exact_dtype: bool) -> list[str]:
    """What keeps tensors (name -> (shape, dtype)) from loading strictly into `model`.

    Missing and unexpected keys, shape mismatches and dtype mismatches: a different kind (integer
    or bool vs floating point) always, a different precision too when `exact_dtype`. A tied weight
    stored under only one of its names counts as present. Empty when everything fits."""
    state, groups = _expected(model)
    missing = [g[0] for g in groups if not any(k in entries for k in g)]
    unexpected = [k for k in entries if k not in state]
    shapes, dtypes = [], []
    for k, (shape, dtype) in entries.items():
        want = state.get(k)
        if want is None:
            continue
        if tuple(shape) != tuple(want.shape):
            shapes.append(
                f"{k!r} has shape {list(shape)} in the file, the model's is {list(want.shape)}"
            )
        elif _kind(dtype) != _kind(want.dtype) or (exact_dtype and dtype != want.dtype):
            dtypes.append((k, dtype, want.dtype))
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    problems += shapes[:_SHOWN]
    problems += [
        f"{k!r} is {_dtype_name(got)} in the file, the model's is {_dtype_name(want)}"
        for k, got, want in dtypes[:_SHOWN]
    ]
    if dtypes:
        problems.append(_dtype_rule(dtypes))
    return problems


def _dtype_rule(dtypes: list[tuple[str, Any, torch.dtype]]) -> str:
    """Why the dtype mismatches in `dtypes` are refused, and what to do."""
    if any(_kind(got) != _kind(want) for _, got, want in dtypes):
        return "integer or bool tensors never load into floating-point ones, or the reverse"
    got = _dtype_name(dtypes[0][1])
    return (
        f"a saved folder loads only into a model of the same dtype: build the model in {got} "
        f"(e.g. model.to(torch.{got}))"
    )


def safetensors_entries(path: Path) -> dict[str, Entry]:
    """name -> (shape, dtype) from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = f.get_slice(k)
                name = sl.get_dtype()
                out[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(name, name))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(f"cannot read weights from {str(path)!r}: {exc}") from exc


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a saved compressed model: `model` is a fresh instance of the original architecture
    (its weights do not matter); the plan in `path` gives the structure, the safetensors file the
    weights, which must match the rebuilt model's keys, shapes and dtypes exactly (no casts).
    Returns a new module; `model` is not modified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_dir():
        raise WeightFileError(f"no saved model folder at {str(path)!r}")
    plan = Plan.from_json(path / PLAN_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightFileError(f"missing weight file {str(weights)!r}")
    restored = apply_plan(model, plan, weights="empty")
    problems = fit_problems(restored, safetensors_entries(weights), exact_dtype=True)
    if problems:
        raise WeightFileError(
            f"weights in {str(weights)!r} do not fit the model rebuilt from the plan: "
            + "; ".join(problems)
        )
    try:
        load_model(restored, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightFileError(f"cannot read weights from {str(weights)!r}: {exc}") from exc
    except RuntimeError as exc:  # not expected after fit_problems; keep the whole message
        raise WeightFileError(
            f"weights in {str(weights)!r} do not fit the model rebuilt from the plan: "
            + " ".join(str(exc).split())
        ) from exc
    return restored


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a state_dict .pt/.pth/.bin read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise WeightFileError(f"cannot read weights from {str(path)!r}: {exc}") from exc
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise WeightFileError(
            f"{str(path)!r} is not a plain state_dict (refused to unpickle it: "
            f"{type(exc).__name__}); save weights with safetensors or model.state_dict()"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{str(path)!r} does not hold a mapping of names to tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weight file into `model` in place: every key, with matching shapes.

    Floating-point tensors are cast to the parameter's floating-point dtype (a float16 file into a
    float32 model is fine); integer or bool tensors are never loaded into floating-point parameters
    or the reverse. On any mismatch WeightFileError names the keys and `model` is unchanged."""
    state = read_state_dict(path)
    entries = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    problems = fit_problems(model, entries, exact_dtype=False)
    if problems:
        raise WeightFileError(
            f"weights in {str(path)!r} do not fit the model: "
            + "; ".join(problems)
        )
    try:  # fit_problems checked the keys (tied weights may be stored once): not strict here
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightFileError(
            f"weights in {str(path)!r} do not fit the model: {' '.join(str(exc).split())}"
        ) from exc
    return model


def load_pickled_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """A whole pickled nn.Module. Unpickling runs arbitrary code, so it needs `trust_pickle=True`."""
    path = Path(path)
    if not trust_pickle:
        raise TensorSlimError(
            f"{str(path)!r} would have to be unpickled, which can run arbitrary code; pass "
            "--trust-pickle (trust_pickle=True) only for files you trust, or give --model "
            "package.module:factory with --weights"
        )
    if not path.is_file():
        raise WeightFileError(f"model file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightFileError(f"cannot unpickle {str(path)!r}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise WeightFileError(f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module")
    return obj


# -- ONNX ---------------------------------------------------------------------------------------
# Allowed max |onnxruntime - PyTorch|, relative to 1 + max |PyTorch output|, by output dtype.
ONNX_TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExampleInputError(
            f"the exported ONNX model does not load in onnxruntime ({' '.join(str(exc).split())})"
        ) from exc


def verify_onnx(path: Path, model: nn.Module, args: tuple, compare: bool) -> float | None:
    """Load `path` with onnxruntime and, if `compare`, check its outputs against `model`'s.

    Returns the largest absolute difference (None when not compared); ExampleInputError if the
    file does not load or the outputs differ beyond ONNX_TOLERANCE for their dtype."""
    import numpy as np

    sess = _onnx_session(path)
    feeds = [a for a in args if isinstance(a, torch.Tensor)]
    if not compare or any(a.dtype == torch.bfloat16 for a in feeds):  # numpy has no bfloat16
        return None
    inputs = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), feeds)}
    try:
        got = sess.run(None, inputs)
    except Exception as exc:
        raise ExampleInputError(
            f"onnxruntime cannot run the exported model: {' '.join(str(exc).split())}"
        ) from exc
    with torch.no_grad():
        want = tensors_in(model(*args))
    worst = 0.0
    for g, w in zip(got, want):
        w32 = w.detach().float().cpu().numpy()
        diff = float(np.abs(np.asarray(g, dtype=np.float64) - w32).max()) if w32.size else 0.0
        tol = ONNX_TOLERANCE.get(w.dtype, 0.0) * (1.0 + float(np.abs(w32).max(initial=0.0)))
        if not diff <= tol:  # also catches NaN
            raise ExampleInputError(
                f"onnxruntime's output differs from PyTorch's by {diff:.3g} (allowed {tol:.3g} "
                f"for {_dtype_name(w.dtype)}); skip the comparison with check=False (--no-check)"
            )
        worst = max(worst, diff)
    return worst


def export_onnx_checked(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    opset: int | None = None,
    check: bool = True,
) -> tuple[Path, float | None]:
    """Like export_onnx; also returns the max |onnxruntime - PyTorch| (None without `check`)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    diff: list[float | None] = [None]

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
        if opset is not None:
            kwargs["opset_version"] = opset
        try:  # the TorchScript exporter is fast and needs no extra packages
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model,
                    args,
                    str(tmp),
                    dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                    **kwargs,
                )
        except TypeError:  # a torch without the legacy exporter
            torch.onnx.export(model, args, str(tmp), dynamo=True, **kwargs)
        diff[0] = verify_onnx(tmp, model, args, check)  # before the rename: a bad file never lands

    try:
        with eval_mode(model):
            written = atomic_write_file(path, write)
    except TensorSlimError as exc:
        if isinstance(exc, ExampleInputError):
            raise ExampleInputError(f"{exc}; {str(path)!r} was not written") from exc
        raise
    except Exception as exc:
        raise ExampleInputError(
            f"ONNX export failed: {type(exc).__name__}: {' '.join(str(exc).split())}; "
            f"{str(path)!r} was not written"
        ) from exc
    return written, diff[0]


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Write `model` as ONNX to `path` atomically (traced on `example_input`, batch axis dynamic).

    The file is loaded with onnxruntime (and with `check`, its outputs compared with PyTorch's)
    before it replaces `path`: on failure an existing file at `path` stays as it was."""
    return export_onnx_checked(model, example_input, path, opset, check)[0]

