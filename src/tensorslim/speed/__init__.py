"""Whole-model speed: measure a compressed model against its dense original (`measure`), search
the latency budget for a requested speedup (`target`), and the inference levers that close the
gap between per-layer savings and the whole model's time (BatchNorm folding, memory layout,
merged 1x1 stages; `levers`).

Submodules are imported where they are used (`from tensorslim.speed.measure import ...`), so
importing this package loads nothing heavy.
"""
