"""The learning-compression (LC) algorithm (Carreira-Perpinan 2017; Idelbayev & Carreira-Perpinan
2020, 2021): train a network under the constraint that its weights are compressed (low rank,
quantized, pruned, or a sum of these) by alternating L steps (SGD on the loss plus a quadratic
penalty) and C steps (each matrix's exact projection), with mu driven upwards.

    small, result = tensorslim.lc.compress(model, [{"kind": "lowrank", "rank": 8}], (x, y),
                                           schedule=tensorslim.lc.Schedule(steps=20))
"""

from tensorslim.lc.algorithm import MODES, LCResult, compress, direct, finetune
from tensorslim.lc.cstep import Part, Projection, c_step, select_rank
from tensorslim.lc.schedule import Schedule

__all__ = [
    "MODES",
    "LCResult",
    "Part",
    "Projection",
    "Schedule",
    "c_step",
    "compress",
    "direct",
    "finetune",
    "select_rank",
]
