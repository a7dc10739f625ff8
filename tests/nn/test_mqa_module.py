"""MultiQueryAttention: training through the core, generation through the KV cache."""

import pytest
import torch
from torch import nn

import attnops
from attnops.nn import MultiQueryAttention


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=64, heads=8, kv_heads=1, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(MultiQueryAttention(dim, heads, kv_heads) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, caches=None, lengths=None):
        x = self.embed(tokens)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(x, cache=None if caches is None else caches[i], lengths=lengths)
            x = x + mlp(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("kv_heads, prompt_len, page_size", [(1, 10, None), (2, 10, None), (8, 70, None),
                                                          (2, 10, 4), (8, 70, 16)])
def test_greedy_generation_with_cache_matches_recomputation(kv_heads, prompt_len, page_size):
    torch.manual_seed(0)
    model = TinyLM(kv_heads=kv_heads).eval()
    prompt = torch.randint(0, 50, (2, prompt_len))
    steps = 8
    with torch.no_grad():
        caches = [layer.make_cache(batch=2, max_len=prompt_len + steps, page_size=page_size) for layer in model.attn]
        logits = model(prompt, caches)[:, -1]
        tokens = prompt
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            full = model(torch.cat([tokens, nxt], 1))[:, -1]  # recompute the whole prefix, no cache
            tokens = torch.cat([tokens, nxt], 1)
            logits = model(nxt, caches)[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert tokens.shape == (2, prompt_len + steps)


def generate_alone(model, prompt, steps):
    """Greedy tokens of one request, recomputing its whole prefix each step (no cache)."""
    tokens = prompt[None]
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
def test_continuous_batching_serves_a_queue_like_each_request_alone(page_size):
    """A serving loop: 5 requests (prompts of 1-12 tokens, 2-6 new tokens each) through 2 slots. Each call feeds a
    new prompt to a freed slot and one token to the others (``lengths``, left padding; idle slots 0); a finished
    request releases its slot (and its pages: 2 slots share a pool of 8 four-token pages). Every request's tokens
    equal greedy decoding of that request alone."""
    torch.manual_seed(0)
    model = TinyLM(kv_heads=2).eval()
    requests = [(torch.randint(0, 50, (n,)), steps) for n, steps in [(5, 6), (12, 3), (3, 4), (8, 5), (1, 2)]]
    slots = 2
    with torch.no_grad():
        if page_size is None:
            caches = [layer.make_cache(batch=slots, max_len=16) for layer in model.attn]
        else:
            caches = [attnops.PagedKVCache(slots, 8, page_size, 2, 8) for _ in model.attn]
        queue, active, done = list(enumerate(requests)), [None] * slots, {}
        while queue or any(a is not None for a in active):
            feeds = []
            for s in range(slots):
                if active[s] is None and queue:
                    i, (prompt, steps) = queue.pop(0)
                    active[s] = (i, steps, [])
                    feeds.append(prompt.tolist())
                else:
                    feeds.append([] if active[s] is None else active[s][2][-1:])
            T = max(len(f) for f in feeds)
            x = torch.tensor([[0] * (T - len(f)) + f for f in feeds])
            logits = model(x, caches, lengths=[len(f) for f in feeds])[:, -1]
            for s, slot in enumerate(active):
                if slot is not None:
                    slot[2].append(int(logits[s].argmax()))
                    if len(slot[2]) == slot[1]:
                        done[slot[0]] = slot[2]
                        active[s] = None
                        for cache in caches:
                            cache.release(s)
        for i, (prompt, steps) in enumerate(requests):
            assert done[i] == generate_alone(model, prompt, steps), i
    if page_size is not None:
        assert all(cache.free_pages == 8 for cache in caches)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
def test_parallel_sampling_from_a_forked_prompt(page_size):
    """One prompt prefilled into slot 0, forked into slots 1 and 2 (each layer's cache; paged copies share the
    prompt's full pages, contiguous ones copy it), then each slot continues with its own tokens: every step's logits
    equal recomputing that slot's whole sequence."""
    torch.manual_seed(0)
    model = TinyLM(kv_heads=2).eval()
    prompt = torch.randint(0, 50, (1, 11))
    with torch.no_grad():
        caches = [layer.make_cache(batch=3, max_len=20, page_size=page_size) for layer in model.attn]
        padded = torch.cat((prompt, torch.zeros(2, 11, dtype=torch.long)))
        model(padded, caches, lengths=[11, 0, 0])
        for cache in caches:
            cache.fork(0, [1, 2])
        if page_size is not None:
            assert all(cache.free_pages == cache.num_pages - 3 - 2 for cache in caches)
        seqs = prompt.expand(3, -1)
        for _ in range(5):
            nxt = torch.randint(0, 50, (3, 1))
            seqs = torch.cat((seqs, nxt), 1)
            torch.testing.assert_close(model(nxt, caches)[:, -1], model(seqs)[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
def test_beam_reorder_continues_the_chosen_parents(page_size):
    """Three beams of different prompts; after each step the caches are reordered (each beam continues a parent,
    repeats allowed, as beam search's ``reorder_cache``) and every beam's logits equal recomputing its sequence."""
    torch.manual_seed(0)
    model = TinyLM(kv_heads=2).eval()
    seqs = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        caches = [layer.make_cache(batch=3, max_len=20, page_size=page_size) for layer in model.attn]
        model(seqs, caches)
        for parents in ([2, 0, 0], [1, 1, 2], [0, 2, 1], [0, 0, 0]):
            for cache in caches:
                cache.reorder(parents)
            nxt = torch.randint(0, 50, (3, 1))
            seqs = torch.cat((seqs[parents], nxt), 1)
            torch.testing.assert_close(model(nxt, caches)[:, -1], model(seqs)[:, -1], rtol=1e-4, atol=1e-4)


def test_training_forward_backward_matches_torch_math():
    torch.manual_seed(0)
    layer = MultiQueryAttention(64, 8, num_kv_heads=2).double()
    x = torch.randn(2, 37, 64, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gx = x.grad.clone()
    # the same computation with torch SDPA (causal, GQA by repeat)
    xr = x.detach().clone().requires_grad_(True)
    q = layer.q_proj(xr).view(2, 37, 8, 8).transpose(1, 2)
    k = layer.k_proj(xr).view(2, 37, 2, 8).transpose(1, 2).repeat_interleave(4, 1)
    v = layer.v_proj(xr).view(2, 37, 2, 8).transpose(1, 2).repeat_interleave(4, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 37, 64)
    yr = layer.out_proj(o)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-9, atol=1e-9)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        MultiQueryAttention(60, 8)
    with pytest.raises(ValueError, match="multiple"):
        MultiQueryAttention(64, 8, num_kv_heads=3)
