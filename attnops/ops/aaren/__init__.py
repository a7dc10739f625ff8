"""Aaren (Feng et al. 2024, "Attention as an RNN"): a learned query per head attends every prefix of the
sequence; the outputs of all prefixes come from a prefix scan of (max, numerator, denominator), and a new
token updates that state in O(1).

    op.py         aaren (chunked parallel scan, with initial / final state), AarenState
    reference.py  the float64 oracle: causal softmax attention of the repeated query
"""

from attnops.ops.aaren.op import AarenState, aaren

__all__ = ["AarenState", "aaren"]
