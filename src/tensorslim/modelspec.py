"""Turn a model spec from the command line into an nn.Module: a zoo name, `package.module:factory`,
or `path/to/file.py:factory`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from tensorslim.errors import ModelSpecError


def model_from_factory(spec: str) -> nn.Module:
    """Call the zero-argument factory named by `module:attr` (module may be a .py path)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelSpecError(
            f"model spec {spec!r} is not 'package.module:factory' or 'file.py:factory'"
        )
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ModelSpecError(f"model file {mod_name!r} does not exist")
            name = f"_tensorslim_user_{path.stem}"
            s = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[name] = module
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{mod_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:
        raise ModelSpecError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model
