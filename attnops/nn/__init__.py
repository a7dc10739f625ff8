"""Drop-in modules built on the attnops ops, attention specs, and swap / unswap."""

from attnops.nn.attention import Attention
from attnops.nn.block_gate import BlockGate
from attnops.nn.linear import LinearAttention
from attnops.nn.mqa import MultiQueryAttention
from attnops.nn.multihead import MultiheadAttention, SwapReport, swap, unswap
from attnops.nn.rotary import Rotary
from attnops.nn.specs import BlockSparse, Dense, Linear, LowRankKey, MoBA

__all__ = ["Attention", "BlockGate", "BlockSparse", "Dense", "Linear", "LinearAttention", "LowRankKey", "MoBA",
           "MultiQueryAttention", "MultiheadAttention", "Rotary", "SwapReport", "swap", "unswap"]
