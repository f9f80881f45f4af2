"""Calibration: hooks over batches of model inputs collecting, per compressible layer, the input
Gram matrix X^T X, the empirical Fisher diagonal of a user loss, and input/output samples for
feature errors. Streams: never holds more than one batch of activations plus bounded samples."""

from tensorslim.calibrate.adapters import (
    Adapter,
    ConvAdapter,
    LinearAdapter,
    adapter_for,
    register_adapter,
)
from tensorslim.calibrate.collect import LayerStats, calibrate
from tensorslim.calibrate.features import feature_errors

__all__ = [
    "Adapter",
    "ConvAdapter",
    "LayerStats",
    "LinearAdapter",
    "adapter_for",
    "calibrate",
    "feature_errors",
    "register_adapter",
]
