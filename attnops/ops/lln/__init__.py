"""Linear Log-Normal attention (Nahshan et al. 2023): exponential feature maps whose scales are moment-matched
to softmax attention, on the linear-attention core; optionally averaged with block-diagonal softmax attention
(LLN+Diag).

    op.py  lln_attention, lln_scales
"""

from attnops.ops.lln.op import lln_attention, lln_scales

__all__ = ["lln_attention", "lln_scales"]
