"""Flow attention (Flowformer, Wu et al. 2022): linear attention with flow conservation, competition among
sources and allocation to sinks, on the linear-attention core.

    op.py  flow_attention (non-causal and causal)
"""

from attnops.ops.flow.op import flow_attention

__all__ = ["flow_attention"]
