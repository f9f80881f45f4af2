"""Turn a model spec from the command line into an nn.Module: a zoo name, `package.module:factory`,
or `path/to/file.py:factory`.

Importing a module or a .py file runs its code, so specs come only from the user's own command line
or API call: a spec read from a saved folder is never resolved (see `zoo_name_from_plan`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

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


def zoo_name_from_plan(meta: Any, plan_path: str | Path) -> str:
    """The zoo name a saved plan records as its model, for rebuilding the architecture.

    A saved folder may only name a built-in zoo model: anything else (a `module:factory` or a
    `.py` file, maybe shipped inside the folder) would run code chosen by whoever wrote the folder,
    so it is refused and the user must name the model on their own command line."""
    from tensorslim import zoo

    spec = meta.get("model_spec") if isinstance(meta, dict) else None
    if isinstance(spec, str) and spec in zoo.ZOO:
        return spec
    recorded = "does not record a model" if spec is None else f"names the model {spec!r}"
    raise ModelSpecError(
        f"{str(plan_path)!r} {recorded}, which is not a zoo model ({', '.join(sorted(zoo.ZOO))}); "
        "tensorslim never imports code named by a saved folder: pass --model "
        "package.module:factory (the original architecture)"
    )
