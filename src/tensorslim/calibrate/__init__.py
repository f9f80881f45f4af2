"""Calibration: hooks over batches of model inputs collecting, per compressible layer, the input
Gram matrix X^T X, the empirical Fisher diagonal of a user loss, and input/output samples for
feature errors. Streams: never holds more than one batch of activations plus bounded samples.
Layers are seen through their handlers (tensorslim.core.handler)."""

from tensorslim.calibrate.collect import LayerStats, calibrate
from tensorslim.calibrate.features import feature_errors

__all__ = ["LayerStats", "calibrate", "feature_errors"]
