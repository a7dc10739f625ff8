"""Linear attention: phi(q) phi(k)^T as a recurrence over a (Dk, Dv) state, with feature maps, decays
and gates; chunk form for training, recurrent form for decoding.

    op.py            linear_attention: checks, log-gate, state packing, map choice
    feature_maps.py  phi: identity, elu + 1, relu, focused
    decay.py         fixed per-head decays (RetNet, Lightning) and their checks
    chunk.py         the chunk form in vectorised PyTorch: the composite backend (the CPU path)
    library.py       the Triton operators from one argument list, fakes, autograd
    triton.py        Triton chunk forward / backward, recurrent forward
    map.py           block maps (read off the chunk forward, or block sums + band)
    reference.py     the float64 oracle (token by token)
"""

from attnops.core import backends
from attnops.ops.linear import chunk, reference  # noqa: F401  (register with the dispatcher)
from attnops.ops.linear.decay import decay_preset, resolve_decay
from attnops.ops.linear.feature_maps import FEATURE_MAPS, focused_feature_map, resolve_feature_map
from attnops.ops.linear.op import LinearAttentionMapOutput, LinearAttentionOutput, State, linear_attention

if backends.TRITON:
    from attnops.ops.linear import triton  # noqa: F401

__all__ = ["FEATURE_MAPS", "LinearAttentionMapOutput", "LinearAttentionOutput", "State", "decay_preset",
           "focused_feature_map", "linear_attention", "resolve_decay", "resolve_feature_map"]
