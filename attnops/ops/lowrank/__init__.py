"""Low-rank-key attention (Loki): approximate scores in a calibrated PCA basis pick the top-k keys per
query; exact attention over them.

    op.py          lowrank_key_attention, and the low-rank branch of decode_attention
    projection.py  KeyProjection (the basis), KeyStatistics, recall, save / load
    library.py     the operator from one argument list, fake, the dispatcher's entry
    reference.py   the float64 oracle (the selection rule)
    map.py         block maps from the chosen keys
    cpu.py / triton.py   the backends
(Model-level calibration, ``attnops.lowrank.calibrate(model)`` / ``apply``, sits above ``attnops.nn``.)
"""

from attnops.core import backends
from attnops.ops.lowrank import cpu, reference  # noqa: F401  (register with the dispatcher)
from attnops.ops.lowrank.op import check_lowrank_args, lowrank_decode, lowrank_key_attention
from attnops.ops.lowrank.projection import KeyProjection

if backends.TRITON:
    from attnops.ops.lowrank import triton  # noqa: F401

__all__ = ["KeyProjection", "check_lowrank_args", "lowrank_decode", "lowrank_key_attention"]
