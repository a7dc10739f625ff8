"""Drop-in modules built on the attnops ops, attention specs, and swap / unswap."""

from attnops.nn.mqa import MultiQueryAttention
from attnops.nn.multihead import MultiheadAttention, SwapReport, swap, unswap
from attnops.nn.specs import BlockSparse, Dense

__all__ = ["BlockSparse", "Dense", "MultiQueryAttention", "MultiheadAttention", "SwapReport", "swap", "unswap"]
