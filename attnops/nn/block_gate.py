"""``BlockGate``: a learned block-sparsity gate (after SeerAttention, Gao et al. 2024).

The gate pools the queries and keys of each block (average, max and/or min over the block's tokens,
concatenated), projects them per head to a small hidden size and scores every (query block, key
block) pair. A softmax over key blocks estimates where the block's attention mass goes; top-k or a
threshold turns it into a ``BlockMask`` for :func:`attnops.block_sparse_attention`.

Training (SeerAttention's self-distillation): the target is the max-pooled block attention map of
the dense attention, ``attnops.attention(..., return_block_map=True, reduce="max")`` (exact, from the
kernels, no N x N), normalised per row; the loss is KL(target || gate). The attention layer stays
frozen: :meth:`BlockGate.loss` detaches q and k, so only the gate learns.

On a RoPE model (``rotary=`` the model's :class:`attnops.nn.Rotary`) the gate is SeerAttention's
``AttnGate`` (microsoft/SeerAttention, seer_attn/attn_gate.py and the training loss in
seer_attn/llama/modeling_llama_seerattn.py): it reads q and k *before* the rotary embedding, rotates
the projected block features at each block's first position (RoPE of the gate's hidden size, the
model's base), and trains with ``KLDivLoss(reduction="mean")`` over the query blocks from ``Nq // 4``
on. Without ``rotary`` the gate scores the q and k it is given and averages the KL per query block.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from attnops.core.masks import BlockMask, Grid, check_block_size
from attnops.nn.rotary import Rotary
from attnops.ops.routed import block_means, select_blocks
from attnops.ops.softmax import attention

POOLINGS = ("avg", "max", "min")
OBJECTIVES = ("seer", "query_block_mean")


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


def _check_pooling(name: str, pooling: Sequence[str]) -> Tuple[str, ...]:
    pooling = tuple(pooling)
    if not pooling or any(p not in POOLINGS for p in pooling) or len(set(pooling)) != len(pooling):
        raise ValueError(f"{name} must be distinct entries of {POOLINGS}, got {pooling!r}")
    return pooling


class BlockGate(nn.Module):
    """A learned gate that predicts block attention maps and block masks.

    Args:
        head_dim: ``D`` of the attention's queries and keys.
        num_heads: query heads ``H``.
        block_size: an int or ``(block_q, block_k)``, powers of two >= 16.
        pooling: any of ``"avg"``, ``"max"``, ``"min"``, concatenated in the given order (SeerAttention's
            gate types name them, e.g. ``Qavg_Kmaxminavg``: ``pooling=("avg",), k_pooling=("max", "min",
            "avg")``). The default keeps two.
        k_pooling: the keys' pooling when it differs from the queries' (default ``pooling``).
        hidden: the per-head projection size (default ``head_dim``).
        num_kv_heads: kv heads ``Hkv`` (default ``num_heads``); query head ``h`` scores the pooled
            keys of kv head ``h // (H / Hkv)``.
        rotary: the model's rotary embedding (an :class:`attnops.nn.Rotary` of ``head_dim``) for
            SeerAttention's formulation: q and k are then given *before* the rotary embedding; the gate
            rotates its projected block features (RoPE of size ``hidden``, the model's base) at each
            block's first position, and :meth:`target` rotates q and k with ``rotary`` for the true map.
        objective: the training loss, ``"seer"`` (SeerAttention's: ``KLDivLoss(reduction="mean")`` over
            every (query block, key block) entry of the query blocks from ``Nq // 4`` on) or
            ``"query_block_mean"`` (the KL of each query block with a target, averaged over them).
            Default: ``"seer"`` with ``rotary``, else ``"query_block_mean"``.

    ``forward(q, k, causal)`` takes ``q (B, Sq, H, D)``, ``k (B, Sk, Hkv, D)`` and returns the gate
    logits ``(B, H, Nq, Nk)`` (float32, ``-inf`` where causality forbids a block).
    """

    def __init__(self, head_dim: int, num_heads: int, block_size=64, pooling: Sequence[str] = ("avg", "max"),
                 hidden: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 k_pooling: Optional[Sequence[str]] = None, rotary: Optional[Rotary] = None,
                 objective: Optional[str] = None):
        super().__init__()
        pooling = _check_pooling("pooling", pooling)
        k_pooling = pooling if k_pooling is None else _check_pooling("k_pooling", k_pooling)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        hidden = head_dim if hidden is None else hidden
        for name, value in (("head_dim", head_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if rotary is not None:
            if not isinstance(rotary, Rotary):
                raise TypeError(f"rotary must be the model's attnops.nn.Rotary, got {type(rotary).__name__}")
            if rotary.head_dim != head_dim:
                raise ValueError(f"rotary is for head_dim {rotary.head_dim}, the gate for {head_dim}")
            if hidden % 2:
                raise ValueError(f"a rotary gate needs an even hidden size, got {hidden}")
        objective = ("seer" if rotary is not None else "query_block_mean") if objective is None else objective
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.block_size = check_block_size(block_size)
        self.pooling, self.k_pooling, self.head_dim, self.num_heads, self.num_kv_heads, self.hidden = (
            pooling, k_pooling, head_dim, num_heads, num_kv_heads, hidden)
        self.rotary, self.objective = rotary, objective
        self.block_rotary = Rotary(hidden, rotary.theta) if rotary is not None else None
        q_in, k_in = len(pooling) * head_dim, len(k_pooling) * head_dim
        self.q_proj = nn.Parameter(torch.randn(num_heads, q_in, hidden) * q_in ** -0.5)
        self.k_proj = nn.Parameter(torch.randn(num_kv_heads, k_in, hidden) * k_in ** -0.5)

    def extra_repr(self) -> str:
        k_pool = f", k_pooling={self.k_pooling}" if self.k_pooling != self.pooling else ""
        rope = f", rotary_theta={self.rotary.theta}" if self.rotary is not None else ""
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, pooling={self.pooling}{k_pool}, hidden={self.hidden}{rope}, "
                f"objective={self.objective!r}")

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

    def _rotate_blocks(self, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """``x (B, Hx, N, hidden)`` rotated at positions ``first (N,)`` (each block's first token)."""
        return self.block_rotary(x.transpose(1, 2), first).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        self._check(q, k)
        bq, bk = self.block_size
        qg = torch.einsum("bhnf,hfe->bhne", _pool(q, bq, self.pooling), self.q_proj)
        kg = torch.einsum("bhnf,hfe->bhne", _pool(k, bk, self.k_pooling), self.k_proj)
        grid, allowed = self._allowed(q.shape[1], k.shape[1], causal, q.device)
        if self.block_rotary is not None:
            qg = self._rotate_blocks(qg, grid.first_pos.view(-1))
            kg = self._rotate_blocks(kg, grid.kb.view(-1) * bk)
        kg = kg.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        logits = qg @ kg.transpose(-1, -2) * self.hidden ** -0.5
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
        to 1 (rows with no key stay 0; SeerAttention's ground truth). Computed by the attention kernels,
        never as N x N. With ``rotary``, q and k are rotated first (positions ``Sk - Sq + i`` and ``j``)."""
        if self.rotary is not None:
            sq, sk = q.shape[1], k.shape[1]
            q = self.rotary(q, torch.arange(sk - sq, sk, device=q.device))
            k = self.rotary(k, torch.arange(sk, device=k.device))
        _, block_map = attention(q, k, k, causal=causal, softmax_scale=softmax_scale, return_block_map=True,
                                 map_block_size=self.block_size, reduce="max")
        total = block_map.sum(-1, keepdim=True)
        return (block_map / total.clamp(min=torch.finfo(block_map.dtype).tiny)).float()

    def loss(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True, target: Optional[torch.Tensor] = None,
             softmax_scale: Optional[float] = None) -> torch.Tensor:
        """KL(target || softmax(gate logits)) by :attr:`objective`: ``"seer"``, the mean over every entry
        of the query blocks from ``Nq // 4`` on (SeerAttention's ``KLDivLoss()`` and block range);
        ``"query_block_mean"``, averaged over the query blocks that have a target. ``target`` defaults
        to :meth:`target`. q and k are detached: the gate learns, the attention does not."""
        q, k = q.detach(), k.detach()
        if target is None:
            target = self.target(q, k, causal, softmax_scale)
        logits = self(q, k, causal)
        # a query block with no key at all (causal, Sq > Sk) has no target; keep its softmax finite
        logits = torch.where(torch.isneginf(logits).all(-1, keepdim=True), torch.zeros_like(logits), logits)
        log_p = torch.log_softmax(logits, dim=-1)
        terms = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - log_p),
                            torch.zeros_like(log_p))
        if self.objective == "seer":  # Seer drops the first quarter of the query blocks for stability
            kept = terms[:, :, terms.shape[2] // 4:]
            return kept.sum() / max(kept.numel(), 1)
        rows = (target.sum(-1) > 0).sum().clamp(min=1)
        return terms.sum() / rows
