"""The MoBA router operator: one argument list for the C++ operator (``moba_route``) and its Triton
twin, the fake, and the function the dispatcher calls.

    route(q, k, block_size, topk, causal, route_block) -> (kv_num_blocks, kv_indices)

q ``(B, S, H, D)``, k ``(B, S, Hkv, D)``; per query tile of ``route_block`` rows, the MoBA blocks
(``block_size`` keys, a multiple of ``route_block``) whose mean key scores highest against the tile's
mean query: its own block plus the top ``topk - 1`` others (causal: earlier ones only). Returns the
block LUT at ``(route_block, route_block)`` granularity: ``kv_num_blocks (B, H, Nt)`` and
``kv_indices (B, H, Nt, W)`` int32, ascending, ``Nt = ceil(S / route_block)``. Forward only: routing
is a hard choice, no gradient flows through it.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from attnops.core.library import Arg, OpDef

FWD = OpDef("moba_route", [Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("block_size", "int"), Arg("topk", "int"),
                           Arg("causal", "bool"), Arg("route_block", "int")], "(Tensor, Tensor)")
FWD_TRITON = FWD.variant("moba_route_triton")
# Token routing's selection (ops/routed/token.py): gate (H, L, n) float32 -> the chosen blocks besides the own
# one, (H, L, width) int32 (-1 after them), and (H, L) bool rows left to torch.topk (ties, non-finite gates).
TOKEN_SELECT = OpDef("moba_token_select", [Arg("gate", "Tensor"), Arg("block_size", "int"), Arg("topk", "int"),
                                           Arg("causal", "bool"), Arg("width", "int")], "(Tensor, Tensor)")
# Token routing's pair order (ops/routed/token.py): chosen (H, T, W) int32 blocks -> the pair pass's rows per kv head,
# ordered by block: row (Hkv, width) int64 (t * H + h) and bounds (Hkv, width, 2) int32; width is data-dependent.
TOKEN_PAIRS = OpDef("moba_token_pairs", [Arg("chosen", "Tensor"), Arg("block_start", "Tensor"),
                                         Arg("block_end", "Tensor"), Arg("group", "int")], "(Tensor, Tensor)")
# Token routing's merge without autograd (ops/routed/token.py): out (T, H, Dv) in place, rows of heads [head_start,
# head_start + heads) scaled by own (T * heads,), then out_pair (P, Dv) * scale (P,) added to rows row (P,); a bf16 /
# fp16 out merges in float32 (own and scale float32) and is rounded once.
TOKEN_MERGE = OpDef("moba_token_merge", [Arg("out", "Tensor(a!)"), Arg("own", "Tensor"), Arg("out_pair", "Tensor"),
                                         Arg("scale", "Tensor"), Arg("row", "Tensor"), Arg("head_start", "int"),
                                         Arg("heads", "int")], "()")


def moba_lut_width(seq_len: int, block_size: int, topk: int, route_block: int) -> int:
    """Entries per LUT row the router writes: ``topk`` MoBA blocks of ``block_size / route_block``
    sub-blocks each, at most every sub-block, at least 1."""
    tiles, blocks = -(-seq_len // route_block), -(-seq_len // block_size)
    return max(1, min(min(topk, blocks) * (block_size // route_block), tiles))


def route_fake(q, block_size, topk, route_block, **_):
    B, S, H, _ = q.shape
    tiles = -(-S // route_block)
    width = moba_lut_width(S, block_size, topk, route_block)
    return q.new_empty((B, H, tiles), dtype=torch.int32), q.new_empty((B, H, tiles, width), dtype=torch.int32)


def backend(fwd: OpDef, fwd_op: Optional[Callable] = None) -> Callable:
    """The dispatcher-facing router of a backend whose operator is ``fwd``."""

    def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   route_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return fwd.call(fwd_op, q=q, k=k, block_size=int(block_size), topk=int(topk), causal=bool(causal),
                        route_block=int(route_block))

    return moba_route


def token_select_fake(gate, width, **_):
    H, L, _ = gate.shape
    return gate.new_empty((H, L, width), dtype=torch.int32), gate.new_empty((H, L), dtype=torch.bool)


def token_pairs_fake(chosen, group, **_):
    width = torch.library.get_ctx().new_dynamic_size()  # the largest kv head's pair count
    kv_heads = chosen.shape[0] // group
    return chosen.new_empty((kv_heads, width), dtype=torch.int64), chosen.new_empty((kv_heads, width, 2))


FWD.define()
FWD.register_fake(route_fake)
TOKEN_SELECT.define()
TOKEN_SELECT.register_fake(token_select_fake)
TOKEN_PAIRS.define()
TOKEN_PAIRS.register_fake(token_pairs_fake)
TOKEN_MERGE.define()
TOKEN_MERGE.register_fake(lambda **_: None)
