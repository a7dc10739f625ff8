"""attnops.compat.flash_attn: flash_attn's signatures and conventions, ported from flash_attn's own
argument usage (positional dropout_p, causal, window_size; return_attn_probs; varlen offsets; kvcache
appends), against the float64 reference."""

import pytest
import torch

import attnops
from attnops.compat.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                       flash_attn_varlen_func, flash_attn_with_kvcache)
from attnops.ops.softmax import reference
from authors_ref import attention_ref
from decode.test_paged import paged_copy


def ref(q, k, v, causal=False, window=(-1, -1), scale=None, **mods):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return reference.block_sparse_attention(q.double(), k.double(), v.double(), None, causal=causal,
                                            window_size=window, softmax_scale=scale, **mods)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (16, 8)), (True, (20, 0))])
def test_flash_attn_func_positional_order(causal, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 70, 4, 32), torch.randn(2, 90, 2, 32), torch.randn(2, 90, 2, 32)
    out = flash_attn_func(q, k, v, 0.0, None, causal, window)  # flash_attn's positional order
    want, lse64 = ref(q, k, v, causal, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    out2, lse, probs = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 70)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)


def test_packed_variants():
    torch.manual_seed(1)
    qkv = torch.randn(1, 50, 3, 4, 16)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True),
                               flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True))
    kv = qkv[:, :, 1:]
    torch.testing.assert_close(flash_attn_kvpacked_func(qkv[:, :, 0], kv, causal=True),
                               flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_and_alibi_positional(causal):
    """flash_attn's positional order through softcap (8th) and alibi_slopes (9th), with gradients."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, s, h, 32, requires_grad=True) for s, h in ((60, 4), (75, 2), (75, 2)))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = flash_attn_func(q, k, v, 0.0, None, causal, (-1, -1), 1.5, slopes)
    want, _ = ref(q, k, v, causal, softcap=1.5, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g64 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g, g64):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_varlen_per_sequence_alibi():
    torch.manual_seed(5)
    cu = torch.tensor([0, 7, 30], dtype=torch.int32)
    q, k, v = torch.randn(30, 2, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    slopes = torch.tensor([[0.5, 0.1], [0.05, 1.0]])
    out = flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, softcap=3.0, alibi_slopes=slopes)
    for i in range(2):
        a, b = cu[i], cu[i + 1]
        want, _ = ref(q[None, a:b], k[None, a:b], v[None, a:b], True, softcap=3.0, alibi_slopes=slopes[i])
        torch.testing.assert_close(out[a:b].double(), want[0], rtol=1e-4, atol=1e-5)


def test_varlen_equal_per_sequence_slopes_run_one_call(monkeypatch):
    """(num_seqs, H) slopes whose rows are equal (a model's (H,) slopes expanded per sequence, the usual form) run as
    one packed call, equal to the (H,) call; rows that differ anywhere still run per sequence (test above)."""
    import attnops.compat.flash_attn as compat
    torch.manual_seed(7)
    cu = torch.tensor([0, 7, 30, 31], dtype=torch.int32)
    q, k, v = torch.randn(31, 2, 16), torch.randn(31, 2, 16), torch.randn(31, 2, 16)
    slopes = torch.tensor([0.5, 0.1])
    want = flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, alibi_slopes=slopes)
    monkeypatch.setattr(compat, "attention", lambda *a, **kw: pytest.fail("ran one call per sequence"))
    got = flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, alibi_slopes=slopes.expand(3, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(pytest.fail.Exception, match="one call per sequence"):
        flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True,
                               alibi_slopes=torch.tensor([[0.5, 0.1], [0.5, 0.1], [0.5, 0.2]]))
    with pytest.raises(ValueError, match="num sequences = 3"):  # equal rows, but not one per sequence: refused
        flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, alibi_slopes=slopes.expand(4, 2))


def test_kvcache_prompt_with_equal_per_sequence_slopes_runs_packed(monkeypatch):
    """A prompt of more than 64 queries through a ragged cache with ``(B, H)`` slopes whose rows are equal: one varlen
    call, as with ``(H,)`` (not chunks of decode calls), the same output."""
    import attnops.ops.decode.chunked as chunked
    torch.manual_seed(8)
    B, S, H, Hkv, D, Sq = 3, 300, 4, 2, 32, 90
    q = torch.randn(B, Sq, H, D)
    k_cache, v_cache = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lens = torch.tensor([120, 260, 95], dtype=torch.int32)
    slopes = torch.rand(H) * 0.3
    want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True, alibi_slopes=slopes)
    monkeypatch.setattr(chunked, "decode_attention", lambda *a, **kw: pytest.fail("ran chunks of decode calls"))
    got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True,
                                  alibi_slopes=slopes.expand(B, H).contiguous())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(pytest.fail.Exception, match="decode calls"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True, alibi_slopes=torch.rand(B, H))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="alibi_slopes"):  # equal rows, but not one per batch row: refused, not taken
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True,
                                alibi_slopes=slopes.expand(B + 2, H).contiguous())


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_alibi_across_different_layouts(causal, monkeypatch):
    """Shared slopes (H,) with cu_seqlens_q != cu_seqlens_k (chunked prefill against longer caches, longer queries,
    an empty sequence): one packed call (not one per sequence), each sequence equal to flash_attn's attention_ref on
    it alone (ALiBi's |i + Lk - Lq - j| inside the sequence), forward and backward."""
    import attnops.compat.flash_attn as compat
    monkeypatch.setattr(compat, "attention", lambda *a, **kw: pytest.fail("ran one call per sequence"))
    torch.manual_seed(6)
    lens_q, lens_k = [3, 40, 0, 17, 1], [30, 25, 6, 17, 9]
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), 4, 32, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 32, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 30, causal=causal, alibi_slopes=slopes)
    dout = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    for i in range(len(lens_q)):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if a == b:
            continue
        want = attention_ref(q64[None, a:b], k64[None, c:d], v64[None, c:d], causal=causal,
                             alibi_slopes=slopes.double())[0]
        torch.testing.assert_close(out[a:b].double(), want[0], rtol=1e-4, atol=1e-5)
        want.backward(dout[None, a:b].double())
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_positional_dropout_is_honoured():
    """flash_attn's positional dropout_p: the kernels' dropout, its mask from the default generator (so equal
    to attnops.attention's after the same torch.manual_seed; flash_attn's attention_ref agrees given it)."""
    from attnops.core.checks import draw_dropout_seed
    from attnops.ops.softmax.reference import dropout_keep
    from authors_ref import attention_ref

    q, k, v = (torch.randn(2, 30, 4, 16, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(4)
    out = flash_attn_func(q, k, v, 0.25, None, True)
    torch.manual_seed(4)
    assert torch.equal(out, attnops.attention(q, k, v, causal=True, dropout_p=0.25))
    torch.manual_seed(4)
    keep, _ = dropout_keep(int(draw_dropout_seed(None, torch.device("cpu"))), 0.25, 2, 4, 30, 30)
    want, _ = attention_ref(q, k, v, causal=True, dropout_p=0.25, dropout_mask=keep)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    packed = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 18, 18, 0.25, causal=True)
    assert packed.shape == q[0].shape and torch.isfinite(packed).all()


def test_deterministic_is_accepted():
    q = torch.randn(1, 8, 4, 16)
    torch.testing.assert_close(flash_attn_func(q, q, q, deterministic=True), flash_attn_func(q, q, q))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_sequences_stay_apart(causal):
    torch.manual_seed(2)
    lens_q, lens_k = [5, 17, 1], [9, 17, 30]
    cu_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 26, 56], dtype=torch.int32)
    q, k, v = torch.randn(23, 4, 16), torch.randn(56, 2, 16), torch.randn(56, 2, 16)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         return_attn_probs=True)
    assert lse.shape == (4, 23)
    for i in range(3):
        (q0, q1), (k0, k1) = (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1])
        want, _ = ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal)
        torch.testing.assert_close(out[q0:q1].double(), want[0], rtol=1e-4, atol=1e-5)


def test_varlen_packed_variants():
    """flash_attn_varlen_qkvpacked_func / _kvpacked_func: the packed layouts unpacked along dim 1, positional
    arguments in flash_attn's order (dropout_p, softmax_scale, causal), each sequence apart."""
    from attnops.compat.flash_attn import flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

    torch.manual_seed(9)
    cu = torch.tensor([0, 5, 21, 33], dtype=torch.int32)
    qkv = torch.randn(33, 3, 4, 16)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 16, 0.0, 0.3, True)
    kv_cu = torch.tensor([0, 9, 9, 30], dtype=torch.int32)
    kv = torch.randn(30, 2, 2, 16)
    out_kv, lse, probs = flash_attn_varlen_kvpacked_func(qkv[:, 0], kv, cu, kv_cu, 16, 21, 0.0, None, True,
                                                         return_attn_probs=True)
    assert probs is None and lse.shape == (4, 33)
    for i in range(3):
        a, b = int(cu[i]), int(cu[i + 1])
        want, _ = ref(qkv[None, a:b, 0], qkv[None, a:b, 1], qkv[None, a:b, 2], True, scale=0.3)
        torch.testing.assert_close(out[a:b].double(), want[0], rtol=1e-4, atol=1e-5)
        c, d = int(kv_cu[i]), int(kv_cu[i + 1])
        want, _ = ref(qkv[None, a:b, 0], kv[None, c:d, 0], kv[None, c:d, 1], True)
        torch.testing.assert_close(out_kv[a:b].double(), torch.nan_to_num(want[0]), rtol=1e-4, atol=1e-5)


def test_varlen_offsets_are_checked():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="rise from 0"):
        flash_attn_varlen_func(q, q, q, torch.tensor([0, 4, 9]), torch.tensor([0, 4, 10]), 5, 6)


def test_with_kvcache_appends_and_attends():
    torch.manual_seed(3)
    B, S, H, Hkv, D = 2, 64, 4, 2, 16
    k_cache, v_cache = torch.zeros(B, S, Hkv, D), torch.zeros(B, S, Hkv, D)
    k_all, v_all = torch.randn(B, 20, Hkv, D), torch.randn(B, 20, Hkv, D)
    k_cache[:, :17], v_cache[:, :17] = k_all[:, :17], v_all[:, :17]
    q = torch.randn(B, 3, H, D)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_all[:, 17:], v_all[:, 17:],
                                       cache_seqlens=torch.tensor([17, 17], dtype=torch.int32), causal=True,
                                       return_softmax_lse=True)
    torch.testing.assert_close(k_cache[:, 17:20], k_all[:, 17:])  # written in place, as flash_attn does
    want, _ = ref(q, k_all, v_all, causal=True)  # the 3 new queries end the 20 keys
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([20, 20], dtype=torch.int32))
    want, _ = ref(q, k_all, v_all, causal=False)  # not causal: each of the 3 queries sees the 20 keys
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def _rotate_half(x, interleaved):  # flash_attn/layers/rotary.py
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply_rotary_ref(x, cos, sin, offsets, interleaved):
    """flash_attn's apply_rotary_emb_torch with seqlen_offsets: token i of sequence b at offsets[b] + i."""
    ro = cos.shape[-1] * 2
    pos = offsets.long()[:, None] + torch.arange(x.shape[1])
    c, s = cos[pos], sin[pos]  # (B, S, ro / 2)
    c, s = ((t.repeat_interleave(2, -1) if interleaved else torch.cat((t, t), -1))[:, :, None] for t in (c, s))
    return torch.cat([x[..., :ro] * c + _rotate_half(x[..., :ro], interleaved) * s, x[..., ro:]], dim=-1)


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("rotary_dim", [16, 32])
@pytest.mark.parametrize("batch_idx", [False, True], ids=["rows", "batch_idx"])
@pytest.mark.parametrize("new", [1, 3])
def test_with_kvcache_rotary_and_batch_idx(interleaved, rotary_dim, batch_idx, new):
    """Rotary embeddings on q and the new keys at each sequence's positions (the cache keeps rotated keys), and
    ``cache_batch_idx`` choosing the cache rows, against flash_attn's own rotary reference and the float64
    attention: ragged lengths, partial (16 of 32 channels) and full rotary, both pair layouts."""
    torch.manual_seed(11)
    B, S, H, Hkv, D = 3, 48, 4, 2, 32
    Bc = 5 if batch_idx else B  # without cache_batch_idx the cache's rows are the batch (flash_attn's rule too)
    k_cache, v_cache = torch.randn(Bc, S, Hkv, D), torch.randn(Bc, S, Hkv, D)
    k0, v0 = k_cache.clone(), v_cache.clone()
    lens = torch.tensor([0, 9, 40], dtype=torch.int32)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32) if batch_idx else None
    rows = idx.long() if batch_idx else torch.arange(B)
    q, k, v = torch.randn(B, new, H, D), torch.randn(B, new, Hkv, D), torch.randn(B, new, Hkv, D)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * 0.37 ** torch.arange(rotary_dim // 2, dtype=torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                  cache_batch_idx=idx, causal=True, rotary_interleaved=interleaved)
    q_ro = _apply_rotary_ref(q.double(), cos.double(), sin.double(), lens, interleaved)
    k_ro = _apply_rotary_ref(k.double(), cos.double(), sin.double(), lens, interleaved)
    for b in range(B):
        n = int(lens[b]) + new
        r = int(rows[b])
        torch.testing.assert_close(k_cache[r, lens[b]:n].double(), k_ro[b], rtol=1e-5, atol=1e-6)  # rotated, in place
        torch.testing.assert_close(v_cache[r, lens[b]:n], v[b])
        torch.testing.assert_close(k_cache[r, :lens[b]], k0[r, :lens[b]])  # the rest untouched
        torch.testing.assert_close(k_cache[r, n:], k0[r, n:])
        keys = torch.cat([k0[r, :lens[b]].double(), k_ro[b]])[None]
        values = torch.cat([v0[r, :lens[b]].double(), v[b].double()])[None]
        want, _ = ref(q_ro[b:b + 1], keys, values, causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-5)
    untouched = [r for r in range(Bc) if r not in rows.tolist()]
    torch.testing.assert_close(k_cache[untouched], k0[untouched])


def test_with_kvcache_rotary_checks():
    q, kc = torch.randn(1, 1, 2, 32), torch.zeros(1, 16, 2, 32)
    cos = torch.ones(16, 8)
    with pytest.raises(ValueError, match="pass k and v too"):
        flash_attn_with_kvcache(q, kc, kc.clone(), rotary_cos=cos, rotary_sin=cos)
    k = torch.randn(1, 1, 2, 32)
    with pytest.raises(ValueError, match="fewer than the cache"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k, rotary_cos=cos[:8], rotary_sin=cos[:8], cache_seqlens=0)
    with pytest.raises(ValueError, match="rotary_dim"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k, rotary_cos=torch.ones(16, 20), rotary_sin=torch.ones(16, 20),
                                cache_seqlens=0)
    with pytest.raises(ValueError, match="together"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k, rotary_cos=cos, cache_seqlens=0)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k, cache_batch_idx=torch.tensor([1]), cache_seqlens=0)
    with pytest.raises(ValueError, match="pass cache_seqlens"):  # appending needs a place to write
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k)


@pytest.mark.parametrize("paged", [None, 32], ids=["contiguous", "paged32"])
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "same_lengths"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("batch_idx", [False, True], ids=["rows", "batch_idx"])
@pytest.mark.parametrize("alibi", [None, "batch", "shared"], ids=["plain", "alibi", "alibi_shared"])
@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("seqlen_q, seqlen_new, rotary_dim, causal", [
    (1, 1, 0, False), (1, 1, 32, False), (4, 3, 16, True), (1, 0, 0, False),  # decoding, speculative steps
    (150, 150, 16, True), (130, 70, 0, True),  # a prompt prefilled through the cache: 64 queries a call
    (5, 5, 0, False), (70, 0, 0, False),  # non-causal: each query sees the whole cache
], ids=lambda x: str(x))
def test_with_kvcache_as_flash_attn_tests_it(seqlen_q, seqlen_new, rotary_dim, causal, local, alibi, batch_idx,
                                             leftpad, ragged, paged):
    """flash_attn's ``test_flash_attn_kvcache`` (tests/test_flash_attn.py), ported: ragged ``cache_seqlens``, new
    keys appended there (rotated there with rotary embeddings, GPT-NeoX pairs), ``cache_leftpad`` drawn in ``[0,
    cache_seqlens)`` as its ``has_leftpad`` does, a random window, ALiBi ``(B, H)`` (and ``(H,)``: a ragged prompt
    then runs as one varlen call), GQA, ``cache_batch_idx`` or a
    paged cache (flash_attn 2 refuses pages with leftpad; attnops takes them), against its ``attention_ref`` over the
    cache with ``key_padding_mask`` and ``key_leftpad`` (tests/authors_ref.py), in float64. Also long ``q`` (a
    prompt through the cache, past decode_attention's 64 queries: chunks of decode calls on ragged lengths,
    ``attnops.attention`` on the cache's rows where the lengths are all the same) and several non-causal queries;
    the refusal of non-causal windows and ALiBi for several queries."""
    if paged and batch_idx:
        pytest.skip("flash_attn refuses cache_batch_idx with block_table, as attnops does (tests/decode/test_paged.py)")
    torch.manual_seed(7)
    B, S, H, Hkv, D = 3, 320, 6, 3, 64
    B_cache = 2 * B if batch_idx else B
    window = torch.randint(0, S, (2,)) if local else (-1, -1)  # a tensor, as flash_attn's tests pass it
    q = torch.randn(B, seqlen_q, H, D)
    k_new = torch.randn(B, seqlen_new, Hkv, D) if seqlen_new else None
    v_new = torch.randn(B, seqlen_new, Hkv, D) if seqlen_new else None
    k_cache, v_cache = torch.randn(B_cache, S, Hkv, D), torch.randn(B_cache, S, Hkv, D)
    lens = torch.randint(0 if seqlen_new else 1, S - max(seqlen_q, seqlen_new) + 1, (B,), dtype=torch.int32)
    lens[0] = max(int(lens[0]), 5)
    if not ragged:
        lens[:] = lens[0]
    pads = None
    if leftpad:
        pads = torch.stack([torch.randint(0, int(n), ()) if n > 0 else torch.tensor(0) for n in lens]).to(torch.int32)
        pads[0] = lens[0] - 1  # one cached key left before the new ones
    idx = torch.randperm(B_cache)[:B].to(torch.int32) if batch_idx else None
    rows = idx.long() if batch_idx else torch.arange(B)
    arange = torch.arange(S).view(1, S)
    key_padding_mask = arange < (lens + seqlen_new).view(-1, 1)
    if leftpad:
        key_padding_mask &= arange >= pads.view(-1, 1)
    slopes = {None: None, "batch": torch.rand(B, H) * 0.3, "shared": torch.rand(H) * 0.3}[alibi]
    cos = sin = None
    q_ro, k_ro = q, k_new
    if rotary_dim:
        angle = torch.rand(S, rotary_dim // 2, dtype=torch.float64) * 2 * torch.pi
        cos, sin = angle.cos().float(), angle.sin().float()
        q_ro = _apply_rotary_ref(q.double(), cos.double(), sin.double(), lens, False).float()
        k_ro = _apply_rotary_ref(k_new.double(), cos.double(), sin.double(), lens, False).float()
    k_ref, v_ref = k_cache[rows].clone(), v_cache[rows].clone()
    if seqlen_new:
        update = (lens.view(-1, 1) <= arange) & (arange < lens.view(-1, 1) + seqlen_new)
        k_ref[update], v_ref[update] = k_ro.flatten(0, 1), v_new.flatten(0, 1)
    table = None
    k_call, v_call = k_cache, v_cache
    if paged:
        k_call, v_call, table = paged_copy(k_cache[rows], v_cache[rows], torch.full((B,), S), paged)
    call = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, cache_batch_idx=idx, cache_leftpad=pads,
                block_table=table, causal=causal, window_size=window, rotary_interleaved=False, alibi_slopes=slopes)
    if seqlen_q > 1 and not causal and (local or alibi):
        with pytest.raises(NotImplementedError, match="causal=False"):
            flash_attn_with_kvcache(q, k_call, v_call, k_new, v_new, **call)
        return
    out, lse = flash_attn_with_kvcache(q, k_call, v_call, k_new, v_new, return_softmax_lse=True, **call)
    want, want_lse = attention_ref(q_ro.double(), k_ref.double(), v_ref.double(), causal=causal, window_size=window,
                                   alibi_slopes=None if slopes is None else slopes.double(),
                                   key_padding_mask=key_padding_mask, key_leftpad=pads)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=2e-5)
    seen = torch.isfinite(want_lse)  # attention_ref's lse of a row with no key is -inf too, but NaN-free only here
    torch.testing.assert_close(lse.double()[seen], want_lse[seen], rtol=1e-4, atol=2e-5)
    assert torch.all(torch.isneginf(lse[~seen]))
    if seqlen_new and not paged:  # written in place at cache_seqlens, as flash_attn does
        for b in range(B):
            torch.testing.assert_close(k_cache[rows[b], lens[b]:lens[b] + seqlen_new], k_ro[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("page", [16, 256])
@pytest.mark.parametrize("swap", [False, True], ids=["q<k", "q>k"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(3, 799), (127, 513), (113, 203), (256, 512)])
def test_varlen_paged_as_flash_attn_tests_it(seqlen_q, seqlen_k, swap, page, local):
    """flash_attn's ``test_flash_attn_varlen_causal`` with ``paged_kv_block_size`` (vLLM's prefix-cached prefill),
    ported: right-padded q and k of random lengths, the keys in pages of a shuffled pool three times the size (its
    ``_generate_block_kvcache``), ``flash_attn_varlen_func(q_unpad, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k,
    ..., causal=True, window_size, block_table)``, against its ``attention_ref`` per sequence in float64 (its query
    and key padding masks: each sequence bottom-right aligned on its own lengths). GQA 6/3."""
    if swap:
        seqlen_q, seqlen_k = seqlen_k, seqlen_q
    torch.manual_seed(0)
    B, H, Hkv, D = 4, 6, 3, 64
    window = torch.randint(0, seqlen_k, (2,)) if local else (-1, -1)  # a tensor, as flash_attn's tests pass it
    q = torch.randn(B, seqlen_q, H, D)
    per_seq = -(-seqlen_k // page)
    pool_k, pool_v = torch.randn(per_seq * B * 3, page, Hkv, D), torch.randn(per_seq * B * 3, page, Hkv, D)
    table = torch.randperm(per_seq * B * 3, dtype=torch.int32)[:B * per_seq].view(B, per_seq)
    k = pool_k[table.long().flatten()].view(B, per_seq * page, Hkv, D)[:, :seqlen_k]
    v = pool_v[table.long().flatten()].view(B, per_seq * page, Hkv, D)[:, :seqlen_k]
    lens_q = torch.randint(max(1, seqlen_q - 20), seqlen_q + 1, (B,))  # generate_random_padding_mask("random")
    lens_k = torch.randint(max(1, seqlen_k - 20), seqlen_k + 1, (B,))
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int32), lens_q.cumsum(0).to(torch.int32)])
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), lens_k.cumsum(0).to(torch.int32)])
    q_unpad = torch.cat([q[b, :lens_q[b]] for b in range(B)])
    out = flash_attn_varlen_func(q_unpad, pool_k, pool_v, cu_q, cu_k, int(lens_q.max()), int(lens_k.max()),
                                 causal=True, window_size=window, block_table=table)
    for b in range(B):
        want, _ = attention_ref(q[b:b + 1, :lens_q[b]].double(), k[b:b + 1, :lens_k[b]].double(),
                                v[b:b + 1, :lens_k[b]].double(), causal=True, window_size=window)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), want[0], rtol=1e-4, atol=2e-5)


def test_varlen_paged_checks():
    q, pool = torch.randn(10, 4, 32), torch.randn(6, 16, 2, 32)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 20, 33], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    flash_attn_varlen_func(q, pool, pool, cu_q, cu_k, 6, 20, causal=True, block_table=table)
    with pytest.raises(ValueError, match="must hold each"):  # 33 - 20 = 13 keys fit; 40 do not
        flash_attn_varlen_func(q, pool, pool, cu_q, torch.tensor([0, 40, 53], dtype=torch.int32), 6, 40,
                               block_table=table)
    with pytest.raises(ValueError, match="outside the cache"):
        flash_attn_varlen_func(q, pool, pool, cu_q, cu_k, 6, 20, block_table=torch.tensor([[0, 9], [2, 3]],
                                                                                       dtype=torch.int32))
    with pytest.raises(ValueError, match="paged cache"):
        flash_attn_varlen_func(q, pool[0], pool[0], cu_q, cu_k, 6, 20, block_table=table)
