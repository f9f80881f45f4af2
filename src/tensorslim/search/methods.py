"""What `compress(method=...)` means on each layer: a registered compressor (by method name or
kind), or "auto" (the best of several kinds per conv layer, see search.auto)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tensorslim.core.compressor import (
    Compressor,
    compressor_class,
    compressor_kinds,
    get_compressor,
    method_names,
)
from tensorslim.core.handler import Handler
from tensorslim.errors import TensorSlimError, short_repr

AUTO = "auto"


def methods() -> list[str]:
    """Every name compress accepts as `method`: compressor method names and kinds, and "auto"."""
    return sorted({*method_names(), *compressor_kinds(), AUTO})


class AutoChoice(Compressor):
    """Method "auto" on a conv layer: proposals pooled from several kinds (search.auto). Not a
    registered kind: a plan records the kind each layer got."""

    form = "layer"
    kind = AUTO
    method = AUTO

    def supports(self, handler: Handler, module: nn.Module) -> str | None:
        from tensorslim.search.auto import auto_reason

        if handler.kernel(module) is None:
            return f"'auto' chooses among conv decompositions; {type(module).__name__} is not one"
        return auto_reason(module, handler)

    def fallback(self, handler: Handler, module: nn.Module) -> tuple[str, str] | None:
        if handler.kernel(module) is not None:
            return None  # a conv no kind supports (grouped): it stays dense with the reason
        kind = type(module).__name__
        if isinstance(module, nn.Linear):
            why = f"{kind} is a matrix: 'auto' reduces to a matrix factorization"
        else:
            why = f"no 'auto' factorizer for {kind}"
        return "lowrank", f"{why}; falls back to 'svd'"

    def proposals(self, target: Any, objective: str | None = None) -> list:
        from tensorslim.search.auto import auto_proposals

        return auto_proposals(target.module, target.handler, target.site, objective=objective)


def method_compressor(method: str, options: Any = None) -> Compressor:
    """The compressor `method` names, with `options` (a mapping or its Options); TensorSlimError
    listing the methods for an unknown name, and the compressor's options for an unknown one."""
    if method == AUTO:
        if options:
            raise TensorSlimError(
                f"method 'auto' takes no method_options; got {short_repr(options)}"
            )
        return AutoChoice()
    if not isinstance(method, str) or compressor_class(method) is None:
        raise TensorSlimError(
            f"method must be one of {', '.join(map(repr, methods()))}; got {short_repr(method)}"
        )
    return get_compressor(method, options)


def resolver(compressor: Compressor):
    """resolve(handler, module) -> (compressor, note, reason it stays dense) for find_layers: the
    method's compressor, or its fallback (with a note) where the fallback does its work."""

    def resolve(handler: Handler, module: nn.Module):
        why = compressor.supports(handler, module)
        if why is None:
            return compressor, None, None
        fb = compressor.fallback(handler, module)
        if fb is None:
            return None, None, why
        kind, note = fb
        other = get_compressor(kind)
        return other, note, other.supports(handler, module)

    return resolve
