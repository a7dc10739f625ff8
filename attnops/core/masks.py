"""``BlockMask``: the one sparse structure every attnops kernel reads, and its pattern constructors.

A block mask splits the (query, key) plane into ``block_q x block_k`` tiles and lists, for every
``(batch, head, query block)``, the key blocks to compute, in compressed-row form:

- ``kv_num_blocks (B, H, Nq)`` int32: how many key blocks the row keeps;
- ``kv_indices (B, H, Nq, W)`` int32: which, sorted ascending (entries past the count are padding);
- the transpose ``q_num_blocks (B, H, Nk)`` / ``q_indices (B, H, Nk, Wt)`` for the backward pass,
  built on first use.

Token-level precision comes from predicates applied inside the kernels on boundary blocks only:
``causal`` and ``window_size=(left, right)``, both aligned to the bottom-right corner when
``Sq != Sk`` (the flash_attn convention), and the sequence lengths. ``B`` and ``H`` may be 1 and
then broadcast over the batch and heads of q.

Constructors take ``seq_len`` as an int or a ``(Sq, Sk)`` pair and ``block_size`` as an int or a
``(block_q, block_k)`` pair (powers of two, at least 16; default 64). Patterns that speak of "the
diagonal block" of a query block mean the key block holding the last query's aligned position.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

SeqLen = Union[int, Tuple[int, int]]
BlockSize = Union[int, Tuple[int, int]]

DEFAULT_BLOCK_SIZE = 64


def _pair(x, name: str) -> Tuple[int, int]:
    if type(x) is tuple and len(x) == 2 and type(x[0]) is int and type(x[1]) is int:  # the common case, 0.2 us
        return x
    if isinstance(x, int) and not isinstance(x, bool):
        return (x, x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        return (int(x[0]), int(x[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {x!r}")


def check_block_size(block_size: BlockSize) -> Tuple[int, int]:
    bq, bk = _pair(block_size, "block_size")
    for b in (bq, bk):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got block_size={block_size!r}")
    return bq, bk


def _check_seq_len(seq_len: SeqLen) -> Tuple[int, int]:
    sq, sk = _pair(seq_len, "seq_len")
    if sq < 0 or sk < 0:
        raise ValueError(f"sequence lengths must be >= 0, got {seq_len!r}")
    return sq, sk


def check_window_size(window_size) -> Tuple[int, int]:
    """Validates a flash_attn-style ``(left, right)`` window; -1 means unbounded."""
    left, right = _pair(window_size, "window_size")
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


class BlockMask:
    """Compressed-row block mask plus token-level predicates (see the module docstring).

    Args:
        kv_num_blocks: ``(B, H, Nq)`` integer tensor, number of key blocks kept per query block.
        kv_indices: ``(B, H, Nq, W)`` integer tensor, kept key-block indices, ascending.
        seq_len: ``Sq`` or ``(Sq, Sk)``.
        block_size: ``block`` or ``(block_q, block_k)``.
        causal: apply the token-level causal predicate (bottom-right aligned).
        window_size: token-level ``(left, right)`` window predicate.

    The constructor validates the LUT (shapes, ranges, ascending order) and raises ``ValueError``.
    ``validate=False`` defers the value checks (they read the LUT: a device synchronisation on a GPU)
    to the mask's first use by an op, which checks every mask once, whatever ``validate`` said; shapes
    are checked always. Integer LUTs of another dtype are range-checked before the cast to int32.
    """

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        seq_len: SeqLen,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        causal: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
        *,
        validate: bool = True,
        _trusted: bool = False,
    ):
        self.seq_lengths = _check_seq_len(seq_len)
        self.block_size = check_block_size(block_size)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal
        self.window_size = check_window_size(window_size)
        if not isinstance(kv_num_blocks, torch.Tensor) or not isinstance(kv_indices, torch.Tensor):
            raise TypeError("kv_num_blocks and kv_indices must be tensors")
        for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.dtype != torch.int32 and t.numel() and t.device.type != "meta":
                lo, hi = int(t.min()), int(t.max())  # before the cast: 2**32 must not become 0
                if lo < -2 ** 31 or hi >= 2 ** 31:
                    raise ValueError(f"{name} holds values outside int32 ([{lo}, {hi}])")
        self.kv_num_blocks = kv_num_blocks.to(torch.int32).contiguous()
        self.kv_indices = kv_indices.to(torch.int32).contiguous()
        self._transpose: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._check_shapes()
        # attnops' own routers write valid LUTs by construction (tested): no value pass for them
        self._validated = _trusted
        if validate and not _trusted:
            self._validate()

    # ---- shape -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(Nq, Nk)``: query and key block counts."""
        (sq, sk), (bq, bk) = self.seq_lengths, self.block_size
        return (math.ceil(sq / bq), math.ceil(sk / bk))

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H, Sq, Sk)`` with ``B``/``H`` possibly 1 (broadcast)."""
        return (self.kv_num_blocks.shape[0], self.kv_num_blocks.shape[1], *self.seq_lengths)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def _check_shapes(self) -> None:
        """The LUT's metadata fits the mask: free (reads no values), run on every use by an op."""
        nq, _ = self.num_blocks
        n, idx = self.kv_num_blocks, self.kv_indices
        if not isinstance(n, torch.Tensor) or not isinstance(idx, torch.Tensor) or n.dtype != torch.int32 \
                or idx.dtype != torch.int32:
            raise TypeError("kv_num_blocks and kv_indices must be int32 tensors")
        if n.dim() != 3 or idx.dim() != 4 or n.shape != idx.shape[:3] or n.shape[2] != nq:
            raise ValueError(
                f"block LUT shapes do not fit: kv_num_blocks {tuple(n.shape)} and kv_indices {tuple(idx.shape)} "
                f"must be (B, H, {nq}) and (B, H, {nq}, W) for seq_len={self.seq_lengths}, block_size={self.block_size}"
            )
        if n.device != idx.device:
            raise ValueError("kv_num_blocks and kv_indices are on different devices")
        if not (n.is_contiguous() and idx.is_contiguous()):
            raise ValueError("kv_num_blocks and kv_indices must be contiguous")

    def _validate(self) -> None:
        """Shapes, then the values: counts in [0, min(Nk, W)], indices ascending in [0, Nk). One pass
        over the LUT; the result is kept (a mask is checked once)."""
        self._check_shapes()
        _, nk = self.num_blocks
        n, idx = self.kv_num_blocks, self.kv_indices
        if n.numel() == 0 or n.device.type == "meta":  # meta tensors have no values to read
            self._validated = True
            return
        if bool((n < 0).any()) or bool((n > min(nk, idx.shape[3])).any()):
            raise ValueError(f"kv_num_blocks must lie in [0, min(Nk={nk}, W={idx.shape[3]})]")
        valid = torch.arange(idx.shape[3], device=idx.device) < n.unsqueeze(-1)
        if bool(((idx < 0) | (idx >= nk))[valid].any()):
            raise ValueError(f"kv_indices out of range [0, {nk})")
        if idx.shape[3] > 1:
            both = valid[..., 1:]
            if bool((idx[..., 1:] <= idx[..., :-1])[both].any()):
                raise ValueError("kv_indices must be strictly ascending within each row")
        self._validated = True

    def check(self) -> "BlockMask":
        """Checks the mask before an op uses it: its shapes always, its values once (whatever
        ``validate`` said at construction; skipped while torch.compile traces, where the values are
        not known). Raises ``ValueError``/``TypeError``; returns the mask."""
        self._check_shapes()
        if not getattr(self, "_validated", False) and not torch.compiler.is_compiling():
            self._validate()
        return self

    # ---- conversions ---------------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """``(B, H, Nq, Nk)`` bool: which blocks are computed."""
        nq, nk = self.num_blocks
        B, H = self.shape[:2]
        valid = torch.arange(self.kv_indices.shape[3], device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        dense = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=self.device)
        # Padding entries scatter into the spare column nk, dropped below.
        dense.scatter_(-1, torch.where(valid, self.kv_indices.long(), nk), True)
        return dense[..., :nk]

    @classmethod
    def from_dense(
        cls,
        blocks: torch.Tensor,
        seq_len: SeqLen,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        causal: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
    ) -> "BlockMask":
        """From a bool ``(Nq, Nk)``, ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)`` block tensor."""
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
            raise TypeError("blocks must be a bool tensor")
        if blocks.dim() not in (2, 3, 4):
            raise ValueError(f"blocks must be (Nq, Nk), (H, Nq, Nk) or (B, H, Nq, Nk), got {tuple(blocks.shape)}")
        (sq, sk), (bq, bk) = _check_seq_len(seq_len), check_block_size(block_size)
        nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
        if tuple(blocks.shape[-2:]) != (nq, nk):
            raise ValueError(f"blocks must end in (Nq, Nk) = ({nq}, {nk}) for seq_len={seq_len!r}, "
                             f"block_size={block_size!r}, got {tuple(blocks.shape)}")
        while blocks.dim() < 4:
            blocks = blocks.unsqueeze(0)
        counts, indices = compress(blocks)
        # _compress writes a valid LUT (counts <= width <= Nk, ascending indices): no value pass
        return cls(counts, indices, seq_len, block_size, causal=causal, window_size=window_size, _trusted=True)

    def to(self, device) -> "BlockMask":
        out = BlockMask.__new__(BlockMask)
        out.__dict__.update(self.__dict__)
        out.kv_num_blocks = self.kv_num_blocks.to(device)
        out.kv_indices = self.kv_indices.to(device)
        out._transpose = None if self._transpose is None else tuple(t.to(device) for t in self._transpose)
        return out

    # ---- transpose (for dk/dv) -------------------------------------------------------------------

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """``(B, H, Nk)`` int32: how many query blocks see each key block."""
        return self._transposed()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """``(B, H, Nk, Wt)`` int32: those query blocks, ascending."""
        return self._transposed()[1]

    def _transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._transpose is None:
            if torch.compiler.is_compiling() or self.device.type == "meta":
                # traced (a routed mask built inside the graph): shapes that do not depend on the data
                return _transpose_lut_static(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])
            self._transpose = _transpose_lut(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])
        return self._transpose

    # ---- summaries -------------------------------------------------------------------------------

    @property
    def density(self) -> float:
        """Fraction of the ``B x H x Nq x Nk`` blocks that are computed."""
        total = self.kv_num_blocks.numel() * self.num_blocks[1]
        if self.device.type == "meta":
            return float("nan")  # no values to count
        return float(self.kv_num_blocks.sum()) / total if total else 0.0

    def __repr__(self) -> str:
        B, H, sq, sk = self.shape
        nq, nk = self.num_blocks
        lines = [
            f"BlockMask(shape=(B={B}, H={H}, Sq={sq}, Sk={sk}), block_size={self.block_size}, "
            f"num_blocks=({nq}, {nk}), causal={self.causal}, window_size={self.window_size}, "
            f"density={self.density:.3f}"
        ]
        if nq and nk and self.device.type != "meta":
            dense = self.to_dense()[0, 0].cpu()
            shown_q, shown_k = min(nq, 32), min(nk, 64)
            lines.append(f"  (b=0, h=0){'' if (shown_q, shown_k) == (nq, nk) else f', first {shown_q}x{shown_k} blocks'}:")
            for r in range(shown_q):
                lines.append("    " + "".join("█" if x else "·" for x in dense[r, :shown_k].tolist()))
        return "\n".join(lines) + ")"

    # ---- pattern constructors ---------------------------------------------------------------------

    @classmethod
    def full(cls, seq_len: SeqLen, block_size: BlockSize = DEFAULT_BLOCK_SIZE, device=None) -> "BlockMask":
        """Every block: dense attention."""
        g = Grid(seq_len, block_size, device)
        return g.mask(torch.ones(g.nq, g.nk, dtype=torch.bool, device=g.device))

    @classmethod
    def causal(cls, seq_len: SeqLen, block_size: BlockSize = DEFAULT_BLOCK_SIZE, device=None) -> "BlockMask":
        """Causal attention (bottom-right aligned), exact at token level."""
        g = Grid(seq_len, block_size, device)
        return g.mask(g.visible(causal=True), causal=True)

    @classmethod
    def sliding_window(
        cls, seq_len: SeqLen, window: int, causal: bool = True, block_size: BlockSize = DEFAULT_BLOCK_SIZE, device=None
    ) -> "BlockMask":
        """Each query sees the ``window`` keys ending at its own position (causal), or the keys
        within ``window - 1`` positions on either side (non-causal). Exact at token level."""
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        g = Grid(seq_len, block_size, device)
        left, right = window - 1, (0 if causal else window - 1)
        # A key block is needed when it meets [first position - left, last position + right].
        keep = (g.kb * g.bk <= g.last_pos + right) & ((g.kb + 1) * g.bk - 1 >= g.first_pos - left)
        return g.mask(keep, causal=causal, window_size=(left, right))

    @classmethod
    def dilated(
        cls,
        seq_len: SeqLen,
        num_blocks: int,
        dilation: int,
        causal: bool = True,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        device=None,
    ) -> "BlockMask":
        """Dilated sliding window at block level (LongNet-style): ``num_blocks`` key blocks spaced
        ``dilation`` apart, counted back from the diagonal block (and forward when non-causal)."""
        _check_positive(num_blocks=num_blocks, dilation=dilation)
        g = Grid(seq_len, block_size, device)
        dist = g.diag - g.kb
        if not causal:
            dist = dist.abs()
        keep = (dist >= 0) & (dist % dilation == 0) & (dist < num_blocks * dilation)
        return g.mask(keep, causal=causal)

    @classmethod
    def strided(
        cls, seq_len: SeqLen, stride: int, causal: bool = True, block_size: BlockSize = DEFAULT_BLOCK_SIZE, device=None
    ) -> "BlockMask":
        """Sparse Transformer "strided" pattern (Child et al. 2019) at block level, with stride
        ``l = stride`` blocks: the union of the local head (the ``l`` most recent blocks) and the
        strided head (blocks whose distance to the diagonal is a multiple of ``l``)."""
        _check_positive(stride=stride)
        g = Grid(seq_len, block_size, device)
        dist = g.diag - g.kb
        if not causal:
            dist = dist.abs()
        keep = (dist >= 0) & ((dist < stride) | (dist % stride == 0))
        return g.mask(keep, causal=causal)

    @classmethod
    def fixed(
        cls,
        seq_len: SeqLen,
        stride: int,
        num_summary: int = 1,
        causal: bool = True,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        device=None,
    ) -> "BlockMask":
        """Sparse Transformer "fixed" pattern (Child et al. 2019) at block level: the blocks of the
        query's own stride-``l`` group, plus the last ``num_summary`` blocks of every group (the
        summary blocks that carry information between groups)."""
        _check_positive(stride=stride, num_summary=num_summary)
        if num_summary > stride:
            raise ValueError(f"num_summary ({num_summary}) must be <= stride ({stride})")
        g = Grid(seq_len, block_size, device)
        keep = (g.kb // stride == g.diag // stride) | (g.kb % stride >= stride - num_summary)
        if causal:
            keep &= g.kb <= g.diag
        return g.mask(keep, causal=causal)

    @classmethod
    def sink_local(
        cls,
        seq_len: SeqLen,
        num_sink_blocks: int,
        num_local_blocks: int,
        causal: bool = True,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        device=None,
    ) -> "BlockMask":
        """Attention sinks + local window ("A-shape", StreamingLLM): the first ``num_sink_blocks``
        key blocks and the ``num_local_blocks`` blocks ending at the diagonal."""
        _check_positive(num_local_blocks=num_local_blocks)
        _check_nonnegative(num_sink_blocks=num_sink_blocks)
        g = Grid(seq_len, block_size, device)
        dist = g.diag - g.kb
        local = ((dist >= 0) if causal else (dist > -num_local_blocks)) & (dist < num_local_blocks)
        keep = local | (g.kb < num_sink_blocks)
        if causal:
            keep &= g.kb <= g.diag
        return g.mask(keep, causal=causal)

    @classmethod
    def global_tokens(
        cls,
        seq_len: SeqLen,
        global_blocks: Union[int, Sequence[int]] = 1,
        num_local_blocks: int = 1,
        causal: bool = False,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        device=None,
    ) -> "BlockMask":
        """Global tokens + local band (Longformer / BigBird without random blocks): global blocks
        attend to everything and are attended to by everything; every other query block sees the
        ``num_local_blocks`` blocks on each side of its diagonal. ``global_blocks`` is a count (the
        first n blocks) or a list of block indices."""
        _check_nonnegative(num_local_blocks=num_local_blocks)
        g = Grid(seq_len, block_size, device)
        if isinstance(global_blocks, int):
            _check_nonnegative(global_blocks=global_blocks)
            is_global_k = g.kb < global_blocks
            is_global_q = g.qb < global_blocks
        else:
            ids = torch.tensor(list(global_blocks), dtype=torch.long, device=g.device)
            if ids.numel() and (bool((ids < 0).any()) or bool((ids >= max(g.nq, g.nk)).any())):
                raise ValueError(f"global_blocks out of range: {list(global_blocks)}")
            is_global_k = torch.isin(g.kb, ids)
            is_global_q = torch.isin(g.qb, ids)
        keep = is_global_k | is_global_q | ((g.diag - g.kb).abs() < num_local_blocks)
        if causal:
            keep &= g.kb <= g.diag
        return g.mask(keep, causal=causal)

    @classmethod
    def random(
        cls,
        seq_len: SeqLen,
        density: float,
        seed: int = 0,
        batch: int = 1,
        num_heads: int = 1,
        causal: bool = False,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        device=None,
    ) -> "BlockMask":
        """Each block kept independently with probability ``density`` (rows may end up empty: a
        useful test of the zero-output rule). Per-(batch, head) masks."""
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        _check_positive(batch=batch, num_heads=num_heads)
        g = Grid(seq_len, block_size, device)
        gen = torch.Generator().manual_seed(seed)
        keep = (torch.rand(batch, num_heads, g.nq, g.nk, generator=gen) < density).to(g.device)
        if causal:
            keep &= g.kb <= g.diag
        return g.mask(keep, causal=causal)


class Grid:
    """Block coordinates of a (seq_len, block_size) plane: query/key block indices and, per query
    block, the aligned positions of its first and last query and the diagonal key block."""

    def __init__(self, seq_len: SeqLen, block_size: BlockSize, device):
        self.seq_len = _check_seq_len(seq_len)
        self.block_size = check_block_size(block_size)
        (sq, sk), (bq, bk) = self.seq_len, self.block_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bq, self.bk = bq, bk
        self.nq, self.nk = math.ceil(sq / bq), math.ceil(sk / bk)
        self.qb = torch.arange(self.nq, device=self.device).unsqueeze(1)  # (Nq, 1)
        self.kb = torch.arange(self.nk, device=self.device).unsqueeze(0)  # (1, Nk)
        offset = sk - sq
        self.first_pos = self.qb * bq + offset
        self.last_pos = torch.clamp((self.qb + 1) * bq, max=sq) - 1 + offset
        self.diag = torch.div(self.last_pos, bk, rounding_mode="floor")

    def visible(self, causal: bool) -> torch.Tensor:
        """``(Nq, Nk)`` bool: the key blocks a query block may see at all (causal: up to its diagonal)."""
        return self.kb <= self.diag if causal else torch.ones(self.nq, self.nk, dtype=torch.bool, device=self.device)

    def mask(self, keep: torch.Tensor, causal: bool = False, window_size=(-1, -1)) -> BlockMask:
        keep = keep.expand(*keep.shape[:-2], self.nq, self.nk)
        return BlockMask.from_dense(keep, self.seq_len, self.block_size, causal=causal, window_size=window_size)


def _check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_nonnegative(**kwargs) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def compress(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., N, M)`` -> counts ``(..., N)`` and ascending indices ``(..., N, W)`` int32."""
    counts = blocks.sum(-1, dtype=torch.int32)
    if blocks.device.type == "meta":  # no values: the widest row possible
        width = max(blocks.shape[-1], 1)
    else:
        width = max(int(counts.max()), 1) if counts.numel() else 1
    # A stable sort of "not kept" puts the kept columns first, in ascending order.
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=blocks.device) < counts.unsqueeze(-1)
    return counts, torch.where(valid, order, 0).to(torch.int32).contiguous()


def _transpose_lut_static(counts: torch.Tensor, indices: torch.Tensor, nk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_transpose_lut` with data-independent shapes, for torch.compile: through the dense
    ``(B, H, Nq, Nk)`` block bitmap (block granularity, the size of ``to_dense()``), and the full
    width ``Nq`` (the kernels read only the first ``q_num_blocks`` entries of a row)."""
    B, H, nq, W = indices.shape
    valid = torch.arange(W, device=indices.device) < counts.unsqueeze(-1)
    column = torch.where(valid, indices.long(), nk)  # invalid entries land in a spare column
    blocks = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=indices.device)
    blocks.scatter_(-1, column, True)
    t_blocks = blocks[..., :nk].transpose(-1, -2)  # (B, H, Nk, Nq)
    t_counts = t_blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~t_blocks).to(torch.int8), dim=-1, stable=True)
    keep = torch.arange(nq, device=indices.device) < t_counts.unsqueeze(-1)
    return t_counts, torch.where(keep, order, 0).to(torch.int32).contiguous()


def _transpose_lut(counts: torch.Tensor, indices: torch.Tensor, nk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Transposes a compressed-row LUT without building the dense block matrix:
    O(nnz log nnz) with a stable sort on (row of the transpose)."""
    B, H, nq, W = indices.shape
    device = indices.device
    valid = torch.arange(W, device=device) < counts.unsqueeze(-1)  # (B, H, Nq, W)
    bh = torch.arange(B * H, device=device).view(B, H, 1, 1).expand(B, H, nq, W)
    qb = torch.arange(nq, device=device).view(1, 1, nq, 1).expand(B, H, nq, W)
    bh, qb, kb = bh[valid], qb[valid], indices[valid].long()
    key = bh * nk + kb  # entries arrive with qb ascending inside each key: a stable sort keeps it
    key, perm = torch.sort(key, stable=True)
    qb = qb[perm]
    t_counts = torch.bincount(key, minlength=B * H * nk)
    width = max(int(t_counts.max()), 1) if t_counts.numel() else 1
    starts = torch.cumsum(t_counts, 0) - t_counts
    slot = torch.arange(key.numel(), device=device) - starts[key]
    t_idx = torch.zeros(B * H * nk, width, dtype=torch.int32, device=device)
    t_idx[key, slot] = qb.to(torch.int32)
    return t_counts.view(B, H, nk).to(torch.int32), t_idx.view(B, H, nk, width)
