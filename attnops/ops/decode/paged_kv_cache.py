"""``PagedKVCache``: a pool of fixed-size pages shared by the sequences of a batch through a block table (vLLM's
paged attention, flash_attn's ``block_table``): a sequence holds only the pages its length needs, and a finished
sequence's pages go back to the pool for the next one."""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple, Union

import torch

from attnops.ops.decode.kv_cache import (check_cache_args, check_new_tokens, fork_targets, new_token_counts,
                                         new_token_rows, reorder_parents, sequence_indices, write_rows)


class PagedKVCache:
    """Keys and values of ``batch`` sequences in ``num_pages`` pages of ``page_size`` tokens.

    ``k_pages``, ``v_pages``: ``(num_pages, page_size, num_kv_heads, head_dim)``; ``block_table``: ``(batch,
    pages)`` int32 on the cache's device, ``pages`` the most that a sequence holds (at least 1), sequence ``b``'s
    pages in order (key ``j`` is row ``j % page_size`` of page ``block_table[b, j // page_size]``; entries past its
    own pages are 0 and never read);
    ``seqlens``: ``(batch,)`` int32 on the cache's device. The allocator, each sequence's pages and the lengths
    stay on the host (Python lists), so that appends never read the GPU back; the device table is rebuilt (a fresh
    tensor) only when pages are taken or returned.

    Pages are taken from the pool as a sequence grows (lowest free index first) and returned by :meth:`release`;
    :meth:`fork` lets empty sequences continue another one, sharing its full pages (parallel sampling), and
    :meth:`reorder` makes each sequence continue a parent (beam search).
    ``max_pages_per_seq`` (default: every page) bounds one sequence: ``max_len = max_pages_per_seq * page_size``.

    Example::

        >>> cache = PagedKVCache(batch=4, num_pages=256, page_size=16, num_kv_heads=1, head_dim=64)
        >>> k, v, lens, table = cache.append(k_new, v_new)   # k_new, v_new: (4, T, 1, 64)
        >>> out = attnops.decode_attention(q_new, k, v, lens, block_table=table)
        >>> cache.release(2)                                  # sequence 2 is done: its pages are free
    """

    def __init__(self, batch: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 max_pages_per_seq: Optional[int] = None):
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        check_cache_args(dtype, batch=batch, num_pages=num_pages, page_size=page_size, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, max_pages_per_seq=max_pages_per_seq)
        if max_pages_per_seq > num_pages:
            raise ValueError(f"max_pages_per_seq ({max_pages_per_seq}) is more than the pool's {num_pages} pages")
        self.batch, self.num_pages, self.page_size = batch, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.max_pages_per_seq = num_kv_heads, head_dim, max_pages_per_seq
        self.k_pages = torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros_like(self.k_pages)
        # host state (an append never reads the device): each sequence's pages in order (its row of the table;
        # it holds ceil(length / page_size) of them), its length, the free pages
        self._pages: List[List[int]] = [[] for _ in range(batch)]
        self._lens: List[int] = [0] * batch
        self._free: List[int] = list(range(num_pages))  # kept sorted: the lowest free page is taken first
        self._refs: List[int] = [0] * num_pages  # sequences holding each page (more than 1 after fork)
        self._publish(pages_changed=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pages.dtype

    @property
    def device(self) -> torch.device:
        return self.k_pages.device

    @property
    def max_len(self) -> int:
        """The most tokens one sequence can hold."""
        return self.max_pages_per_seq * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages in the pool that no sequence holds."""
        return len(self._free)

    @property
    def host_seqlens(self) -> torch.Tensor:
        """``(batch,)`` int32 lengths on the CPU (reading them never synchronises a GPU)."""
        return torch.tensor(self._lens, dtype=torch.int32)

    def append(self, k: torch.Tensor, v: torch.Tensor,
               lengths=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Appends ``T`` new tokens to every sequence (or, with ``lengths``, sequence ``b``'s last ``lengths[b]``
        of them: a ragged, left-padded prefill), taking pages from the pool as the sequences cross page
        boundaries. ``k``, ``v``, ``lengths``: as :meth:`attnops.KVCache.append`.

        Returns:
            ``(k_pages, v_pages, seqlens, block_table)``: the arguments of :func:`attnops.decode_attention` (``q,
            k_pages, v_pages, seqlens, block_table=block_table``).

        A bad append (wrong shape, dtype or device, past ``max_len``, more pages than the pool has free, or k/v
        that require grad while grad mode is on) raises and leaves the cache unchanged.
        """
        check_new_tokens(k, v, self.batch, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        T, ps = k.shape[1], self.page_size
        counts = new_token_counts(lengths, T, self.batch)
        new_lens = [n + c for n, c in zip(self._lens, counts)]
        if max(new_lens) > self.max_len:
            raise ValueError(f"PagedKVCache overflow: appending {counts} tokens to lengths {self._lens} exceeds "
                             f"max_len={self.max_len} ({self.max_pages_per_seq} pages of {ps})")
        wanted = [-(-n // ps) - len(pages) for n, pages in zip(new_lens, self._pages)]
        if sum(wanted) > len(self._free):
            raise ValueError(f"PagedKVCache is out of pages: appending {counts} tokens to lengths {self._lens} "
                             f"needs {sum(wanted)} new pages, {len(self._free)} are free (release finished "
                             "sequences, or build the cache with more pages)")
        if sum(wanted):
            taken = self._free[:sum(wanted)]
            del self._free[:sum(wanted)]
            for p in taken:
                self._refs[p] = 1
            for pages, n in zip(self._pages, wanted):
                pages.extend(taken[:n])
                del taken[:n]
        if sum(counts):
            dst, src = new_token_rows(self._lens, counts, T, self._page_runs, self.device)
            write_rows(self.k_pages, dst, k, src)
            write_rows(self.v_pages, dst, v, src)
        self._lens = new_lens
        self._publish(pages_changed=sum(wanted) > 0)
        return self.k_pages, self.v_pages, self.seqlens, self.block_table

    def release(self, sequences: Union[int, Iterable[int], None] = None) -> None:
        """Empties the given sequences (an index or indices; None: all) and returns their pages to the pool: the
        slots take new sequences (continuous batching) while the others keep theirs."""
        for b in sequence_indices(sequences, self.batch):
            for p in self._pages[b]:
                self._refs[p] -= 1
                if not self._refs[p]:  # a page forked sequences share stays until the last one lets it go
                    self._free.append(p)
            self._pages[b] = []
            self._lens[b] = 0
        self._free.sort()
        self._publish(pages_changed=True)

    def fork(self, src: int, dst: Union[int, Iterable[int]]) -> None:
        """Empty sequences ``dst`` (an index or indices) become copies of sequence ``src`` (parallel sampling, beam
        search: several continuations of one prompt) that share its full pages: no copy of them, one pool page for
        all. A partly filled last page is copied, one new page per copy, since each copy appends into it; full pages
        are never written again (appends go past the length), so sharing them needs no copy-on-write. A page
        returns to the pool when the last sequence holding it is released. Refused, changing nothing, when a
        ``dst`` holds tokens (release it first) or is ``src``, or when the pool lacks the pages for the copies."""
        targets = fork_targets(src, dst, self._lens)
        full, partial = divmod(self._lens[src], self.page_size)
        if partial and len(targets) > len(self._free):
            raise ValueError(f"PagedKVCache is out of pages: forking sequence {src} into {len(targets)} needs "
                             f"{len(targets)} new pages (its partly filled last page), {len(self._free)} are free")
        shared = self._pages[src][:full]
        for b in targets:
            self._pages[b] = list(shared)
            if partial:
                page = self._free.pop(0)
                self._refs[page] = 1
                self.k_pages[page] = self.k_pages[self._pages[src][full]]
                self.v_pages[page] = self.v_pages[self._pages[src][full]]
                self._pages[b].append(page)
            self._lens[b] = self._lens[src]
        for p in shared:
            self._refs[p] += len(targets)
        self._publish(pages_changed=True)

    def reset(self) -> None:
        """Empties every sequence (the pages are kept, all free)."""
        self.release()

    def reorder(self, parents) -> None:
        """Sequence ``b`` becomes what sequence ``parents[b]`` was (beam search: each beam continues a parent;
        ``parents``: ``batch`` indices, repeats allowed, a list or an integer tensor), as transformers'
        ``reorder_cache(beam_idx)``. Full pages are shared, as :meth:`fork` shares them; a parent's partly filled
        last page goes to its first child and is copied for the others; pages no child holds return to the pool.
        Refused, changing nothing, when the pool lacks the pages for those copies."""
        parents = reorder_parents(parents, self.batch)
        ps = self.page_size
        pages, copies, kept = [], [], set()  # copies: (child, the parent's last page to copy)
        for b, p in enumerate(parents):
            full, partial = divmod(self._lens[p], ps)
            pages.append(self._pages[p][:full])
            if partial and p in kept:
                copies.append((b, self._pages[p][full]))
            elif partial:
                kept.add(p)
                pages[b].append(self._pages[p][full])
        held = {page for row in pages for page in row}
        freed = [page for row in self._pages for page in row if page not in held]
        if len(copies) > len(self._free) + len(set(freed)):
            raise ValueError(f"PagedKVCache is out of pages: reordering by {parents} copies {len(copies)} partly "
                             f"filled pages, {len(self._free) + len(set(freed))} would be free")
        self._free = sorted(self._free + list(set(freed)))
        for b, source in copies:  # a source is a kept page, never one just freed
            page = self._free.pop(0)
            self.k_pages[page] = self.k_pages[source]
            self.v_pages[page] = self.v_pages[source]
            pages[b].append(page)
        self._refs = [0] * self.num_pages
        for row in pages:
            for page in row:
                self._refs[page] += 1
        self._pages, self._lens = pages, [self._lens[p] for p in parents]
        self._publish(pages_changed=True)

    def _page_runs(self, b: int, start: int, stop: int) -> Iterator[range]:
        """The pool rows (flat over pages and slots) of sequence b's positions ``[start, stop)``: a range per page."""
        ps, pages = self.page_size, self._pages[b]
        for p in range(start // ps, (stop - 1) // ps + 1):
            base = pages[p] * ps - p * ps
            yield range(base + max(start, p * ps), base + min(stop, (p + 1) * ps))

    def _publish(self, pages_changed: bool) -> None:
        """The device copies of the lengths and (when pages were taken or returned) of the table, with the columns
        up to the most pages a sequence holds (entries past a sequence's pages are 0), which the kernels read:
        fresh tensors, so that what an earlier append returned stays as it was."""
        if pages_changed:
            width = max(1, max(len(pages) for pages in self._pages))
            rows = [pages + [0] * (width - len(pages)) for pages in self._pages]
            self.block_table = torch.tensor(rows, dtype=torch.int32).to(self.device)
        self.seqlens = torch.tensor(self._lens, dtype=torch.int32).to(self.device)

    def __repr__(self) -> str:
        return (f"PagedKVCache(batch={self.batch}, num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, seqlens={self._lens}, free_pages={self.free_pages})")
