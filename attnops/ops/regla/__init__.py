"""ReGLA, refined gated linear attention (Lu et al., NAACL 2025): GLA's per-channel gated recurrence with the
paper's normalised exponential feature map, its variance-reduction scale and its refining gate, on the
linear-attention core.

    op.py         regla_attention, refined_log_gate, ReGLAState, ReGLAOutput, variance_reduction_scale
    reference.py  regla_reference: the paper's equations step by step (float64 oracle)
"""

from attnops.ops.regla.op import (ReGLAOutput, ReGLAState, refined_log_gate, regla_attention,
                                  variance_reduction_scale)

__all__ = ["ReGLAOutput", "ReGLAState", "refined_log_gate", "regla_attention", "variance_reduction_scale"]
