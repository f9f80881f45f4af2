"""The built-in compressors, one module (one kind) each: importing this package registers them
(core.compressor.register_compressor).

Low-rank family: lowrank (method "svd"), fwsvd, fvd, whitened. Tensor family: cp, tucker2, tt,
spatial. Codes and pruning: quant (also binary, ternary), sparse. A new compressor module is one
more line in the import list below.
"""

from tensorslim.compressors import (
    cp,
    fvd,
    fwsvd,
    lowrank,
    quant,
    sparse,
    spatial,
    tt,
    tucker2,
    whitened,
)

__all__ = [
    "cp", "fvd", "fwsvd", "lowrank", "quant", "sparse", "spatial", "tt", "tucker2", "whitened"
]
