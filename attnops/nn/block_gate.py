"""``BlockGate``: a learned block-sparsity gate (after SeerAttention, Gao et al. 2024).

The gate pools the queries and keys of each block (average, max and/or min over the block's tokens,
concatenated), projects them per head to a small hidden size and scores every (query block, key
block) pair. A softmax over key blocks estimates where the block's attention mass goes; top-k or a
threshold turns it into a ``BlockMask`` for :func:`attnops.block_sparse_attention`.

Training (SeerAttention's self-distillation): the target is the max-pooled block attention map of
the dense attention, ``attnops.attention(..., return_block_map=True, reduce="max")`` (exact, from the
kernels, no N x N), normalised per row; the loss is KL(target || gate). The attention layer stays
frozen: :meth:`BlockGate.loss` detaches q and k, so only the gate learns.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from attnops.core.masks import BlockMask, Grid, check_block_size
from attnops.ops.routed import block_means, select_blocks
from attnops.ops.softmax import attention

POOLINGS = ("avg", "max", "min")


def _pool(x: torch.Tensor, block: int, poolings: Sequence[str]) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, ceil(S / block), len(poolings) * D)`` float32: each pooling of
    each block's rows (a partial last block pools the rows it has)."""
    B, S, Hx, D = x.shape
    n = -(-S // block)
    valid = (torch.arange(n * block, device=x.device) < S).view(1, 1, n, block, 1)
    tiles = torch.nn.functional.pad(x.float().transpose(1, 2), (0, 0, 0, n * block - S)).view(B, Hx, n, block, D)
    parts = []
    for p in poolings:
        if p == "avg":
            parts.append(block_means(x, block))
        elif p == "max":
            parts.append(tiles.masked_fill(~valid, float("-inf")).amax(3))
        else:
            parts.append(tiles.masked_fill(~valid, float("inf")).amin(3))
    return torch.cat(parts, dim=-1)


class BlockGate(nn.Module):
    """A learned gate that predicts block attention maps and block masks.

    Args:
        head_dim: ``D`` of the attention's queries and keys.
        num_heads: query heads ``H``.
        block_size: an int or ``(block_q, block_k)``, powers of two >= 16.
        pooling: any of ``"avg"``, ``"max"``, ``"min"``, concatenated (SeerAttention pools queries
            and keys with all three; the default keeps two).
        hidden: the per-head projection size (default ``head_dim``).
        num_kv_heads: kv heads ``Hkv`` (default ``num_heads``); query head ``h`` scores the pooled
            keys of kv head ``h // (H / Hkv)``.

    ``forward(q, k, causal)`` takes ``q (B, Sq, H, D)``, ``k (B, Sk, Hkv, D)`` and returns the gate
    logits ``(B, H, Nq, Nk)`` (float32, ``-inf`` where causality forbids a block).
    """

    def __init__(self, head_dim: int, num_heads: int, block_size=64, pooling: Sequence[str] = ("avg", "max"),
                 hidden: Optional[int] = None, num_kv_heads: Optional[int] = None):
        super().__init__()
        pooling = tuple(pooling)
        if not pooling or any(p not in POOLINGS for p in pooling) or len(set(pooling)) != len(pooling):
            raise ValueError(f"pooling must be distinct entries of {POOLINGS}, got {pooling!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        hidden = head_dim if hidden is None else hidden
        for name, value in (("head_dim", head_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.block_size = check_block_size(block_size)
        self.pooling, self.head_dim, self.num_heads, self.num_kv_heads, self.hidden = (
            pooling, head_dim, num_heads, num_kv_heads, hidden)
        fan_in = len(pooling) * head_dim
        self.q_proj = nn.Parameter(torch.randn(num_heads, fan_in, hidden) * fan_in ** -0.5)
        self.k_proj = nn.Parameter(torch.randn(num_kv_heads, fan_in, hidden) * fan_in ** -0.5)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, pooling={self.pooling}, hidden={self.hidden}")

    def _check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
            raise ValueError(f"q (B, Sq, H, D) and k (B, Sk, Hkv, D) expected, got {tuple(q.shape)}, {tuple(k.shape)}")
        if (q.shape[2], k.shape[2], q.shape[3], k.shape[3]) != (self.num_heads, self.num_kv_heads, self.head_dim,
                                                                 self.head_dim):
            raise ValueError(f"BlockGate expects H={self.num_heads}, Hkv={self.num_kv_heads}, D={self.head_dim}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")

    def _allowed(self, seq_q: int, seq_k: int, causal: bool, device) -> Tuple[Grid, torch.Tensor]:
        grid = Grid((seq_q, seq_k), self.block_size, device)
        return grid, grid.visible(causal)

    def forward(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        self._check(q, k)
        bq, bk = self.block_size
        qg = torch.einsum("bhnf,hfe->bhne", _pool(q, bq, self.pooling), self.q_proj)
        kg = torch.einsum("bhnf,hfe->bhne", _pool(k, bk, self.pooling), self.k_proj)
        kg = kg.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        logits = qg @ kg.transpose(-1, -2) * self.hidden ** -0.5
        _, allowed = self._allowed(q.shape[1], k.shape[1], causal, q.device)
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def block_mask(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True, *, topk: Optional[int] = None,
                   threshold: Optional[float] = None, cdf_threshold: Optional[float] = None) -> BlockMask:
        """The ``(B, H)`` ``BlockMask`` the gate predicts: per query block, exactly one rule of
        :func:`attnops.ops.routed.select_blocks` on the gate's softmax, plus the diagonal block."""
        grid, allowed = self._allowed(q.shape[1], k.shape[1], causal, q.device)
        probs = torch.softmax(self(q, k, causal), dim=-1)
        keep = select_blocks(probs, allowed, topk=topk, threshold=threshold, cdf_threshold=cdf_threshold)
        keep = (keep | (grid.kb == grid.diag)) & allowed
        return BlockMask.from_dense(keep, (q.shape[1], k.shape[1]), self.block_size, causal=causal)

    @torch.no_grad()
    def target(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True,
               softmax_scale: Optional[float] = None) -> torch.Tensor:
        """``(B, H, Nq, Nk)``: the dense attention's max-pooled block map, each row normalised to sum
        to 1 (rows with no key stay 0). Computed by the attention kernels, never as N x N."""
        _, block_map = attention(q, k, k, causal=causal, softmax_scale=softmax_scale, return_block_map=True,
                                 map_block_size=self.block_size, reduce="max")
        total = block_map.sum(-1, keepdim=True)
        return (block_map / total.clamp(min=torch.finfo(block_map.dtype).tiny)).float()

    def loss(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True, target: Optional[torch.Tensor] = None,
             softmax_scale: Optional[float] = None) -> torch.Tensor:
        """KL(target || softmax(gate logits)), averaged over the query blocks that have a target;
        ``target`` defaults to :meth:`target`. q and k are detached: the gate learns, the attention
        does not."""
        q, k = q.detach(), k.detach()
        if target is None:
            target = self.target(q, k, causal, softmax_scale)
        logits = self(q, k, causal)
        # a query block with no key at all (causal, Sq > Sk) has no target; keep its softmax finite
        logits = torch.where(torch.isneginf(logits).all(-1, keepdim=True), torch.zeros_like(logits), logits)
        log_p = torch.log_softmax(logits, dim=-1)
        terms = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - log_p),
                            torch.zeros_like(log_p))
        rows = (target.sum(-1) > 0).sum().clamp(min=1)
        return terms.sum() / rows
