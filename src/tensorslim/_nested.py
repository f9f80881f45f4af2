"""The tensors inside a model input or output: a tensor, or tuples, lists and mappings of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Deeper nesting than this is not a model input; stop instead of recursing without end.
MAX_DEPTH = 16


def tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in `obj`, depth first, in the order the ONNX exporter flattens outputs
    (mapping values in insertion order; a Hugging Face BatchEncoding counts as a mapping)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth >= MAX_DEPTH:
        return []
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if not isinstance(obj, (tuple, list)):
        return []
    return [t for item in obj for t in tensors_in(item, depth + 1)]
