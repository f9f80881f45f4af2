"""Feature errors of a replaced layer: how far its output moves on calibration samples.

Following Schuurmans, Batselier & Kooij (ICLR 2023, Sec. 3): for each
stored input sample x_i with original output F_i = layer(x_i) and replacement output G_i, the errors
are absolute ||F_i - G_i||_F, relative ||F_i - G_i||_F / ||F_i||_F and scaled ||F_i - G_i||_F / numel(F_i),
each averaged over the samples. Only that one layer is replaced, the rest of the model plays no part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tensorslim.errors import TensorSlimError


def feature_errors(
    replacement: nn.Module,
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
) -> dict[str, float]:
    """Mean absolute, relative and scaled Frobenius errors of `replacement` on the samples.

    inputs / outputs: the original layer's input and output per sample (e.g. LayerStats.inputs and
    .outputs from calibration). Returns {"absolute", "relative", "scaled", "samples"}.
    """
    if len(inputs) != len(outputs) or not inputs:
        raise TensorSlimError(
            "feature_errors needs the same, non-zero number of input and output samples; got "
            f"{len(inputs)} inputs and {len(outputs)} outputs"
        )
    absolute, relative, scaled = [], [], []
    with torch.no_grad():
        for x, f in zip(inputs, outputs):
            g = replacement(x)
            diff = float(torch.linalg.norm((f - g).to(torch.float64)))
            norm = float(torch.linalg.norm(f.to(torch.float64)))
            absolute.append(diff)
            relative.append(diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
            scaled.append(diff / f.numel())
    k = len(absolute)
    return {
        "absolute": math.fsum(absolute) / k,
        "relative": math.fsum(relative) / k,
        "scaled": math.fsum(scaled) / k,
        "samples": k,
    }
