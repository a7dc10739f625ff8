"""The head layout a module is built with, validated once for every module."""

from __future__ import annotations

from typing import Optional, Tuple


def check_heads(dim: int, num_heads: int, num_kv_heads: Optional[int]) -> Tuple[int, int]:
    """``(num_kv_heads, head_dim)`` for a module of width ``dim`` with ``num_heads`` query heads and
    ``num_kv_heads`` key / value heads (None: ``num_heads``); ValueError unless all are ints >= 1, ``dim`` a
    multiple of ``num_heads`` and ``num_heads`` of ``num_kv_heads``."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if dim % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}), and num_heads of "
                         f"num_kv_heads ({num_kv_heads})")
    return num_kv_heads, dim // num_heads
