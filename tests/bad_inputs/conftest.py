"""Shared checks for the bad-input corpus (tests/bad_inputs/test_bad_*.py).

Every case asserts the same contract:
- API: a `TensorSlimError` subclass whose message names the layer / field / value and what is
  accepted (`expect_error`).
- CLI: exit status 2 and exactly one `error:` line, no traceback (`assert_cli_error`).
- Both: the input model, input files and earlier outputs are unchanged afterwards (`Snapshot`,
  `state_of` / `assert_same_state`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tensorslim.cli import app
from tensorslim.errors import TensorSlimError

_runner = CliRunner()


def cli(*args):
    """Run the tensorslim CLI in-process; returns click's Result."""
    return _runner.invoke(app, [str(a) for a in args])


def cli_output(result) -> str:
    out = result.output or ""
    with contextlib.suppress(ValueError, AttributeError):  # stderr not captured separately
        if result.stderr and result.stderr not in out:
            out += result.stderr
    return out


def assert_cli_error(result, *words: str) -> str:
    """Exit 2, one `error:` line naming every word in `words` (case-insensitive), no traceback."""
    out = cli_output(result)
    assert result.exit_code == 2, f"exit {result.exit_code}, output:\n{out}\n{result.exception!r}"
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"expected one error: line, got:\n{out}"
    # rich may wrap a long message onto following lines: match against the whole error text
    text = out[out.index("error:") :].lower()
    for w in words:
        assert w.lower() in text, f"{w!r} not in error message:\n{out}"
    return text


@contextlib.contextmanager
def expect_error(*words: str, error: type[TensorSlimError] = TensorSlimError):
    """The block raises `error` (a TensorSlimError subclass) whose message contains every word."""
    with pytest.raises(error) as info:
        yield info
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in error message: {info.value}"


def _digest(path: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256 or '<dir>', mode) for a file or every entry below a folder."""
    path = Path(path)
    if not path.exists():
        return {}
    items = [path] if path.is_file() else [path, *sorted(path.rglob("*"))]
    out = {}
    for p in items:
        rel = str(p.relative_to(path)) if p != path else "."
        if p.is_dir():
            out[rel] = ("<dir>", p.stat().st_mode)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


class Snapshot:
    """Byte-level snapshot of files and folders; `check()` asserts nothing changed."""

    def __init__(self, *paths: str | os.PathLike):
        self.paths = [Path(p) for p in paths]
        self.before = [_digest(p) for p in self.paths]

    def check(self) -> None:
        for p, before in zip(self.paths, self.before):
            assert _digest(p) == before, f"{p} changed"


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state), "the input model's structure changed"
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, k
        assert torch.equal(now[k], v) or (now[k].isnan() == v.isnan()).all(), f"{k} changed"


def no_stray_temp(folder: str | os.PathLike) -> None:
    """No temporary files (.NAME.tmp-*, .NAME.old-*) left in `folder`."""
    stray = [p for p in os.listdir(folder) if re.match(r"^\..*\.(tmp|old)-", p)]
    assert not stray, stray
