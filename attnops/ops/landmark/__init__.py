"""Landmark attention (Mohtashami and Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers"): the last token of every block of keys is its landmark; a query's grouped softmax runs over its own
block and the earlier landmarks, and each landmark's probability weighs the softmax over its block's tokens. With
``topk``, a query keeps only the blocks whose landmarks score highest (the authors' retrieval for long contexts).

    op.py         landmark_attention
    reference.py  the float64 oracle (the dense per-key weights of the grouped softmax)
"""

from attnops.ops.landmark.op import landmark_attention

__all__ = ["landmark_attention"]
