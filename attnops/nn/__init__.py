"""Drop-in modules built on the attnops ops."""

from attnops.nn.mqa import MultiQueryAttention

__all__ = ["MultiQueryAttention"]
