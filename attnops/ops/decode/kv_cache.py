"""``KVCache``: preallocated key/value buffers for incremental decoding, one length per sequence."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch

from attnops.core.checks import MAX_HEAD_DIM


class KVCache:
    """Keys and values of ``batch`` sequences, up to ``max_len`` tokens each.

    ``k``, ``v``: ``(batch, max_len, num_kv_heads, head_dim)``; ``seqlens``: ``(batch,)`` int32 on the
    cache's device (a CPU copy is kept so that appends never synchronise a GPU).

    Example::

        >>> cache = KVCache(batch=2, max_len=1024, num_kv_heads=1, head_dim=64)
        >>> k, v, lens = cache.append(k_new, v_new)   # k_new, v_new: (2, T, 1, 64)
        >>> out = attnops.decode_attention(q_new, k, v, lens)
    """

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, score_dim: int = 0,
                 score_dtype: Optional[torch.dtype] = None):
        check_cache_args(dtype, batch=batch, max_len=max_len, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.batch, self.max_len, self.num_kv_heads, self.head_dim = batch, max_len, num_kv_heads, head_dim
        if not isinstance(score_dim, int) or isinstance(score_dim, bool) or not 0 <= score_dim <= head_dim:
            raise ValueError(f"score_dim must be an int in [0, head_dim={head_dim}], got {score_dim!r}")
        self.k = torch.zeros(batch, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        # low-rank-key decoding: a contiguous copy of the keys' first score_dim components (the
        # kernels' scoring pass reads it; the same components read out of k are rows head_dim apart),
        # optionally half-width (half the scoring pass's bytes; the scores only rank keys)
        score_dtype = dtype if score_dtype is None else score_dtype
        if score_dtype not in (dtype, torch.bfloat16, torch.float16):
            raise TypeError(f"score_dtype must be the cache's dtype, bfloat16 or float16, got {score_dtype!r}")
        self.score_dim = score_dim
        self.k_score = torch.zeros(batch, max_len, num_kv_heads, score_dim, dtype=score_dtype, device=device) \
            if score_dim else None
        self.v = torch.zeros_like(self.k)
        self._lens = [0] * batch  # host lengths: the Python math of an append never reads the device
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def host_seqlens(self) -> torch.Tensor:
        """``(batch,)`` int32 lengths on the CPU (reading them never synchronises a GPU)."""
        return torch.tensor(self._lens, dtype=torch.int32)

    def score_view(self) -> Optional[torch.Tensor]:
        """The score plane up to the longest sequence (``decode_attention``'s ``k_score``), or None."""
        if self.k_score is None:
            return None
        return self.k_score[:, :max(self._lens)]

    def release(self, sequences: Union[int, Iterable[int], None] = None) -> None:
        """Empties the given sequences (an index or indices; None: all; the buffers are kept): their slots take new
        sequences (continuous batching: ``append(..., lengths=)``) while the others keep theirs."""
        for b in sequence_indices(sequences, self.batch):
            self._lens[b] = 0
        self._publish()

    def reset(self) -> None:
        """Empties every sequence (the buffers are kept)."""
        self.release()

    def fork(self, src: int, dst: Union[int, Iterable[int]]) -> None:
        """Empty sequences ``dst`` (an index or indices) become copies of sequence ``src`` (parallel sampling, beam
        search): its rows are copied, as a contiguous cache cannot share them (:meth:`attnops.PagedKVCache.fork`
        shares pages). Refused, changing nothing, when a ``dst`` holds tokens (release it first) or is ``src``."""
        targets, n = fork_targets(src, dst, self._lens), self._lens[src]
        for b in targets:
            for buffer in (self.k, self.v, self.k_score):
                if buffer is not None:
                    buffer[b, :n] = buffer[src, :n]
            self._lens[b] = n
        self._publish()

    def reorder(self, parents) -> None:
        """Sequence ``b`` becomes what sequence ``parents[b]`` was (beam search: each beam continues a parent;
        ``parents``: ``batch`` indices, repeats allowed, a list or an integer tensor), as transformers'
        ``reorder_cache(beam_idx)``. The rows are gathered (one copy of the cache up to the longest parent)."""
        parents = reorder_parents(parents, self.batch)
        n = max(self._lens[p] for p in parents)
        index = torch.tensor(parents, device=self.device)
        for buffer in (self.k, self.v, self.k_score):
            if buffer is not None and n:
                buffer[:, :n] = buffer[:, :n].index_select(0, index)
        self._lens = [self._lens[p] for p in parents]
        self._publish()

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Appends ``T`` new tokens to every sequence, each at its own length (or, with ``lengths``, its own
        number of new tokens: a ragged prefill).

        Args:
            k, v: ``(batch, T, num_kv_heads, head_dim)`` in the cache's dtype and on its device.
            lengths: ``(batch,)`` ints in ``[0, T]`` (a list or an integer tensor), sequence ``b``'s number of
                new tokens: the **last** ``lengths[b]`` rows of ``k[b]``, ``v[b]`` (left padding, the rows before
                are ignored). Left padding is what :func:`attnops.decode_attention` aligns: it places query row
                ``t`` of ``T`` at the sequence's position ``seqlen - T + t``, so with the queries left-padded the
                same way, each real query sits at its own token's position and attends causally to its own
                sequence. The outputs of the padding query rows are not meaningful (finite; zeros where they
                see no key). None: every sequence appends ``T``.

        Returns:
            ``(k_cache, v_cache, seqlens)``: views of the buffers up to the longest sequence and the
            new lengths, the arguments of :func:`attnops.decode_attention`.

        A bad append (wrong shape, dtype or device, past ``max_len``, or k/v that require grad while
        grad mode is on) raises and leaves the cache unchanged.
        """
        check_new_tokens(k, v, self.batch, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        T = k.shape[1]
        counts = new_token_counts(lengths, T, self.batch)
        new_lens = [n + c for n, c in zip(self._lens, counts)]
        if max(new_lens) > self.max_len:
            raise ValueError(f"KVCache overflow: appending {counts} tokens to lengths {self._lens} exceeds "
                             f"max_len={self.max_len}")
        if sum(counts):
            L = self.max_len
            dst, src = new_token_rows(self._lens, counts, T,
                                      lambda b, start, stop: [range(b * L + start, b * L + stop)], self.device)
            write_rows(self.k, dst, k, src)
            write_rows(self.v, dst, v, src)
            if self.k_score is not None:
                write_rows(self.k_score, dst, k[..., :self.score_dim].to(self.k_score.dtype), src)
        self._lens = new_lens
        self._publish()
        longest = max(new_lens)
        return self.k[:, :longest], self.v[:, :longest], self.seqlens

    def _publish(self) -> None:
        """The device copy of the lengths, which the kernels read: a fresh tensor, so that what an earlier append
        returned stays as it was."""
        self.seqlens = torch.tensor(self._lens, dtype=torch.int32).to(self.device)

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, max_len={self.max_len}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"seqlens={self._lens})")


def check_cache_args(dtype: torch.dtype, **sizes: int) -> None:
    """A cache's sizes (ints >= 1, ``head_dim`` within the kernels') and its floating dtype."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if sizes["head_dim"] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {sizes['head_dim']} is above what the kernels take ({MAX_HEAD_DIM})")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

def check_new_tokens(k, v, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """The checks of a cache's ``append(k, v)``: ``(batch, T, num_kv_heads, head_dim)`` tensors of the cache's dtype
    and device, forward-only."""
    expected = (batch, None, num_kv_heads, head_dim)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4 or any(e is not None and s != e for s, e in zip(t.shape, expected)):
            raise ValueError(f"{name} must be (batch={batch}, T, num_kv_heads={num_kv_heads}, "
                             f"head_dim={head_dim}), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the cache holds {dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the cache is on {device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # Writing them into the buffers would chain every step's autograd graph onto the cache
        # (reset() keeps the buffers, so the chain would outlive it); decoding is forward-only.
        raise RuntimeError("the KV cache's append got k/v that require grad: the cache is decoding state and is "
                           "forward-only. Decode under torch.no_grad() or torch.inference_mode() (or append "
                           "k.detach(), v.detach()); train with attention over the whole sequence")


def int_list(values) -> Optional[List[int]]:
    """``values`` as a list of Python ints when it is a 1-d integer tensor or a list, tuple or range of ints (or of
    0-d integer tensors, as iterating a tensor gives); None otherwise. Bools are not ints here: a mask is not
    indices or counts. Callers raise their own error on None."""
    def integer(t: torch.Tensor) -> bool:
        return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)

    if isinstance(values, torch.Tensor):
        return values.tolist() if values.dim() == 1 and integer(values) else None
    if not isinstance(values, (list, tuple, range)):
        return None
    out = []
    for x in values:
        if isinstance(x, torch.Tensor) and x.dim() == 0 and integer(x):
            x = int(x)
        if not isinstance(x, int) or isinstance(x, bool):
            return None
        out.append(x)
    return out


def sequence_indices(sequences: Union[int, Iterable[int], None], batch: int, what: str = "release") -> List[int]:
    """The distinct sequence indices a cache's ``release`` (or ``fork``) takes: one index, several, or None (all)."""
    if sequences is None:
        return list(range(batch))
    one = isinstance(sequences, int) or (isinstance(sequences, torch.Tensor) and sequences.dim() == 0)
    chosen = int_list([sequences] if one else sequences)
    if chosen is None or any(not 0 <= b < batch for b in chosen):
        raise ValueError(f"{what} takes sequence indices in [0, {batch}), got {sequences!r}")
    return sorted(set(chosen))


def fork_targets(src: int, dst: Union[int, Iterable[int]], lens: List[int]) -> List[int]:
    """The sequences a cache's ``fork(src, dst)`` fills: empty ones, other than ``src``."""
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < len(lens):
        raise ValueError(f"fork: src must be a sequence index in [0, {len(lens)}), got {src!r}")
    targets = sequence_indices(dst, len(lens), "fork")
    if src in targets or any(lens[b] for b in targets):
        raise ValueError(f"fork copies sequence {src} into empty sequences other than itself: {targets} hold "
                         f"{[lens[b] for b in targets]} tokens (release them first)")
    return targets


def reorder_parents(parents, batch: int) -> List[int]:
    """A cache's ``reorder(parents)``: ``batch`` sequence indices, each in ``[0, batch)`` (repeats allowed)."""
    values = int_list(parents)
    if values is None:
        raise TypeError(f"parents must be a 1-d integer tensor or a list of ints, got {parents!r}")
    if len(values) != batch or any(not 0 <= p < batch for p in values):
        raise ValueError(f"parents must be {batch} sequence indices in [0, {batch}), got {values}")
    return values


def new_token_counts(lengths, T: int, batch: int) -> List[int]:
    """``batch`` counts of new tokens, from an append's ``lengths`` (None: ``T`` each)."""
    if lengths is None:
        return [T] * batch
    values = int_list(lengths)
    if values is None:
        raise TypeError(f"lengths must be a 1-d integer tensor or a list of ints, got {lengths!r}")
    if len(values) != batch or any(not 0 <= x <= T for x in values):
        raise ValueError(f"lengths must be {batch} ints in [0, T={T}], got {values}")
    return values


def new_token_rows(lens: List[int], counts: List[int], T: int, runs: Callable[[int, int, int], Iterable[range]],
                   device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Where an append writes, as flat row indices (int64 tensors on ``device``): ``dst`` into the buffer viewed as
    ``(-1, Hkv, D)``, ``src`` into the new tokens viewed as ``(B * T, Hkv, D)`` (None: every row, in order).
    Sequence b's new tokens are the last ``counts[b]`` of its ``T`` (left padding) and go to its positions
    ``lens[b]`` on; ``runs(b, start, stop)`` gives the buffer rows of positions ``[start, stop)`` as ranges.
    Host lists, not tensor ops: a decoding step writes a few rows, and a dozen small tensor ops cost more
    than its attention."""
    dst: List[int] = []
    src: List[int] = []
    for b, (n, c) in enumerate(zip(lens, counts)):
        if c:
            for rows in runs(b, n, n + c):
                dst.extend(rows)
            src.extend(range(b * T + T - c, b * T + T))
    every = all(c == T for c in counts)
    dst_rows = torch.tensor(dst, dtype=torch.long).to(device)
    return dst_rows, None if every else torch.tensor(src, dtype=torch.long).to(device)


def write_rows(buffer: torch.Tensor, dst: torch.Tensor, new: torch.Tensor, src: Optional[torch.Tensor]) -> None:
    """``buffer``'s rows ``dst`` (flat over its leading dims) = ``new``'s rows ``src`` (flat over ``(B, T)``;
    None: all, in order): one copy kernel per buffer. ``dst`` and ``src`` are on the buffer's device."""
    rows = new.reshape(-1, *new.shape[2:])
    if src is not None:
        rows = rows.index_select(0, src)
    buffer.view(-1, *buffer.shape[-2:]).index_copy_(0, dst, rows)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """A paged cache ``(num_pages, page, Hkv, D)`` read through ``block_table (B, max_pages)`` as the contiguous
    ``(B, max_pages * page, Hkv, D)`` it stands for (a copy: the PyTorch fallback's and the reference's reading of
    pages; the C++ kernel reads them in place). Entries past a sequence's length may hold anything (they are
    clamped to a page here and never attended)."""
    index = block_table.to(torch.long).clamp(0, cache.shape[0] - 1)
    B, P = index.shape
    return cache[index.flatten()].view(B, P * cache.shape[1], *cache.shape[2:])


def pack_sequences(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                   block_table: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values, cache positions ``[starts[b], starts[b] + counts[b])`` (``(B,)`` long),
    one sequence after another: ``(sum(counts), Hkv, D)`` each, varlen's packed layout. From a contiguous cache
    ``(B, S_max, Hkv, D)``, or from pages ``(num_pages, page, Hkv, D)`` read through ``block_table (B, max_pages)``
    (the entries the positions reach must be pages of the cache: callers check). A copy of the keys in use."""
    device = k.device
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    first = counts.cumsum(0) - counts  # each sequence's first packed row
    j = starts[seq] + torch.arange(seq.numel(), device=device) - first[seq]  # cache positions
    if block_table is None:
        return k[seq, j], v[seq, j]
    page = k.shape[1]
    pages = block_table.to(device=device, dtype=torch.long)[seq, j // page]
    return k[pages, j % page], v[pages, j % page]
