"""The authors' reference implementations, ported for the tests (einops rearranges written as views):
flash_attn's ``attention_ref`` (tests/test_flash_attn.py) with ``construct_local_mask`` and
``attn_bias_from_alibi_slopes``, gpt-oss's sinks (``sdpa`` in gpt_oss/torch/model.py) and SpargeAttn's
block prediction (``get_block_map_meansim``)."""

import math
import warnings

import torch


def _columns(sk, key_padding_mask=None, key_leftpad=None):
    """The key columns and key counts of flash_attn tests' masks: with ``key_leftpad (B,)`` a key's column counts
    from its sequence's first key (``2**32`` before it), and with ``key_padding_mask (B, Sk)`` the key count is
    each sequence's; as (B, 1, 1, Sk) and (B, 1, 1, 1) then, else (Sk,) and an int."""
    col = torch.arange(sk)
    if key_leftpad is not None:
        lp = key_leftpad.long().view(-1, 1, 1, 1)
        col = torch.where(col >= lp, col - lp, 2 ** 32)
    count = sk if key_padding_mask is None else key_padding_mask.sum(-1).view(-1, 1, 1, 1)
    return col, count


def _local_mask(sq, sk, window_size, key_padding_mask=None, key_leftpad=None):
    """flash_attn tests' ``construct_local_mask`` (True = masked), -1 sides unbounded."""
    row = torch.arange(sq).unsqueeze(1)
    col, sk = _columns(sk, key_padding_mask, key_leftpad)
    masked = torch.zeros(sq, col.shape[-1], dtype=torch.bool)
    if window_size[1] >= 0:
        masked = masked | (col > torch.minimum(row + sk - sq + window_size[1], torch.as_tensor(sk)))
    if window_size[0] >= 0:
        masked = masked | (col < row + sk - sq - window_size[0])
    return masked


def _alibi_bias(slopes, sq, sk, key_padding_mask=None, key_leftpad=None):
    """flash_attn tests' ``attn_bias_from_alibi_slopes`` (non-causal form, the documented one)."""
    slopes = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    col, sk = _columns(sk, key_padding_mask, key_leftpad)
    rel = (torch.arange(sq).unsqueeze(1) + sk - sq - col).abs()
    return -slopes[:, :, None, None] * rel.to(slopes.dtype)


def attention_ref(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None,
                  attn_bias=None, dropout_p=0.0, dropout_mask=None, key_padding_mask=None, key_leftpad=None):
    """flash_attn's ``attention_ref`` (scores, softcap, local mask, attn_bias, softmax, zero fully
    masked rows) with gpt-oss's sinks: a sink column joins the softmax and is dropped after it.
    ``attn_bias``: additive, broadcast to (B, H, Sq, Sk) (ALiBi's bias joins it, as in flash_attn's tests).
    ``dropout_mask`` (B, H, Sq, Sk) bool, True = kept, with ``dropout_p``: flash_attn's own handling (the
    probabilities are masked, V is scaled by ``1 / (1 - dropout_p)``). ``key_padding_mask (B, Sk)`` bool (True =
    a key) and ``key_leftpad (B,)``: flash_attn's KV-cache test (``test_flash_attn_kvcache``): padded keys are
    masked, and windows and ALiBi count columns from each sequence's first key and rows from its key count."""
    if causal:
        window_size = (window_size[0], 0)
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    local = _local_mask(sq, sk, window_size, key_padding_mask, key_leftpad)
    scores = scores.masked_fill(local, float("-inf"))
    if alibi_slopes is not None:
        scores = scores + _alibi_bias(alibi_slopes.to(scores.dtype), sq, sk, key_padding_mask, key_leftpad)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        full = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(full, dim=-1)
        attn = torch.softmax(full, dim=-1)[..., :-1]
    else:
        lse = torch.logsumexp(scores, dim=-1)
        attn = torch.softmax(scores, dim=-1)
    attn = attn.masked_fill(local.all(dim=-1, keepdim=True), 0.0)
    attn = attn.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)  # rows a -inf bias masks
    dropout_scaling = 1.0 / (1 - dropout_p)
    attn_drop = attn.masked_fill(~dropout_mask, 0.0) if dropout_mask is not None else attn
    return torch.einsum("bhts,bshd->bthd", attn_drop, v * dropout_scaling), lse


def sparge_block_map(q, k, is_causal=False, BLKQ=128, BLKK=64, simthreshd1=0.1, cdfthreshd=0.9, topk=None,
                     attention_sink=False):
    """SpargeAttn's ``get_block_map_meansim`` (thu-ml/SpargeAttn, commit 1e9db8142c659b1cac6be80aa96d1db60a878ace,
    spas_sage_attn/utils.py, with ``hyperparameter_check``, ``get_pool_sim_triton_simmean``,
    ``fill_block_map_triton`` and ``fill_causal_mask_triton``), its Triton kernels written in PyTorch.
    q ``(B, H, Sq, D)``, k ``(B, Hkv, Sk, D)`` as SpargeAttn lays them out; returns the bool
    ``(B, H, Nq, Nk)`` map. Two readings of the kernels: a partial last block's pool and gram use its
    valid rows (the kernel divides by them, ``BS_``; its masked load leaves the padding undefined), and
    the gram is float32 (the kernel rounds the unit rows to float16 for ``tl.dot``)."""
    H = q.size(1)

    def per_head(x):  # hyperparameter_check
        return torch.full((H,), float(x)) if isinstance(x, (int, float)) else x.float().reshape(H)

    def pool_sim(x, bs, thr):  # get_pool_sim_triton_simmean, one program per (b, h, block)
        B, Hx, N, D = x.shape
        nb = (N + bs - 1) // bs
        pool = torch.empty(B, Hx, nb, D)
        sim = torch.empty(B, Hx, nb, dtype=torch.bool)
        for i in range(nb):
            blk = x[:, :, i * bs:(i + 1) * bs].float()
            n = blk.shape[2]
            pool[:, :, i] = blk.sum(2) / n
            unit = blk / blk.norm(dim=-1, keepdim=True)
            grams = unit @ unit.transpose(-1, -2)
            sim[:, :, i] = grams.sum((-1, -2)) / (n * n) > thr[:Hx].view(1, Hx)  # the kernel reads thr[h]
        return pool, sim

    simthreshd1 = per_head(simthreshd1)
    cdfthreshd = per_head(cdfthreshd) if cdfthreshd is not None else None
    topk = per_head(topk) if topk is not None else None
    pooled_q, sim_q = pool_sim(q, BLKQ, simthreshd1)
    pooled_k, sim_k = pool_sim(k, BLKK, simthreshd1)
    if k.size(1) != H:
        pooled_k = pooled_k.repeat_interleave(H // k.size(1), dim=1)
        sim_k = sim_k.repeat_interleave(H // k.size(1), dim=1)
    nq, nk = pooled_q.shape[-2], pooled_k.shape[-2]
    sim_k = sim_k.unsqueeze(-2).expand(-1, -1, nq, -1)
    sim_q = sim_q.unsqueeze(-1).expand(-1, -1, -1, nk)
    score = pooled_q @ pooled_k.transpose(-1, -2) * q.shape[-1] ** -0.5
    score[~sim_k] = -torch.inf
    if is_causal:
        causal_mask = torch.arange(nk).view(1, -1) < (torch.arange(nq).view(-1, 1) + 1) * (BLKQ / BLKK)
        score = score.masked_fill(~causal_mask[None, None], -torch.inf)
    score = score.softmax(-1)
    sorted_score = torch.sort(score, dim=-1, descending=True)
    cdf = torch.cumsum(sorted_score.values, dim=-1)
    B, H, Q, K = cdf.shape
    if cdfthreshd is not None:
        thr = cdfthreshd.view(1, H, 1, 1).expand(B, -1, Q, 1).contiguous()
        num_to_select = torch.searchsorted(cdf, thr, right=True).squeeze(-1)
    else:
        num_to_select = (topk * K).to(torch.int64).view(1, H, 1).expand(B, -1, Q)
    final_map = torch.zeros_like(score, dtype=torch.bool)
    final_map[~sim_k] = 1
    final_map[~sim_q] = 1
    for b in range(B):  # fill_block_map_triton: at least one block per row
        for h in range(H):
            for i in range(Q):
                n = max(int(num_to_select[b, h, i]), 1)
                final_map[b, h, i, sorted_score.indices[b, h, i, :n]] = 1
    if is_causal:
        final_map = final_map * causal_mask[None, None]
    if attention_sink:
        final_map[:, :, :, 0] = 1
    return final_map


def sklearn_pca(x):
    """``sklearn.decomposition.PCA().fit(x)`` as Loki calls it per head (hpcgroup/loki, commit
    9774a4d015cddff027436c19a08c34d219b34616, pca_analysis/pca.py, ``compute_pca``), its full-SVD path:
    ``x (N, D)`` -> ``(explained_variance_ratio_, components_ (D, D) rows = axes, mean_)``, float64."""
    x = x.double()
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / (x.shape[0] - 1)
    return var / var.sum(), vt, mean


def loki_top_r(explained_variance_ratio, top_r):
    """Loki's rank (hpcgroup/loki, methods/pca_topk/modify_llama.py, ``get_pca_components``), with the
    per-head ratios ``(Hkv, D)`` saved as float32 by pca.py: a fraction ``top_r < 1`` keeps
    ``max_h #(cumsum_h < top_r)`` components, else ``int(top_r)``."""
    if top_r < 1:
        return int((explained_variance_ratio.float().cumsum(-1) < top_r).sum(-1).max())
    return int(top_r)


def loki_chosen(q, k, components_r, top_k, causal=True):
    """The keys Loki attends to (methods/pca_topk/modify_llama.py ``get_pca_forward`` and
    methods/pca_topk/utils.py ``mask_attn_pca_topk``): q ``(B, H, Sq, D)``, k ``(B, H, Sk, D)`` (kv heads
    repeated), ``components_r (H, D, r)``; ``top_k <= 1`` is ``int(top_k * Sk)`` keys; scores
    ``(q P_r) (k P_r)^T / sqrt(D)`` plus the causal mask, ``torch.topk``. Returns ``(B, H, Sq, Sk)`` bool
    restricted to the keys the causal mask lets through (Loki's picks beyond them carry ``-inf``-like
    scores and get no probability)."""
    sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    topk = int(top_k * sk) if top_k <= 1 else int(top_k)
    scores = (q @ components_r) @ (k @ components_r).transpose(-1, -2) / math.sqrt(d)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible = torch.arange(sk).view(1, -1) <= torch.arange(sq).view(-1, 1) + sk - sq
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, torch.topk(scores, min(topk, sk), dim=-1).indices, True)
    return chosen & visible


def _seer_pool(x, block, name):
    """SeerAttention's POOL_FUNCS over the sequence of ``x (B, S, H, D)``, ceil_mode: a partial last block
    pools its rows."""
    import torch.nn.functional as F
    if name == "avg":
        return F.avg_pool3d(x, kernel_size=[block, 1, 1], stride=[block, 1, 1], ceil_mode=True)
    if name == "max":
        return F.max_pool3d(x, kernel_size=[block, 1, 1], stride=[block, 1, 1], ceil_mode=True)
    return -F.max_pool3d(-x, kernel_size=[block, 1, 1], stride=[block, 1, 1], ceil_mode=True)


def _llama_rope(x, positions, theta):
    """transformers' LlamaRotaryEmbedding (default rope) + apply_rotary_pos_emb(unsqueeze_dim=2) on
    ``x (B, T, H, d)``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    rotated = torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)
    return x * cos + rotated * sin


def seer_attn_gate(q, k, q_weight, k_weight, block_size, q_pooling, k_pooling, theta):
    """SeerAttention's ``AttnGate.forward(q, k, block_attention_mask, block_position_embeddings,
    use_softmax=False)`` as training calls it (microsoft/SeerAttention, seer_attn/attn_gate.py, the
    version with ``MultiHeadLinear``'s ``einsum('bshi,hio->bsho')``; block positions and causal block mask
    from ``SeerAttnLlamaModel.forward`` in seer_attn/llama/modeling_llama_seerattn.py). q ``(B, S, H, D)``
    and k ``(B, S, Hkv, D)`` before the rotary embedding; ``q_weight (H, q_in, hidden)`` or None (Seer's
    single-linear gate: k projected per query head, ``k_weight (H, k_in, hidden)``), ``k_weight``.
    Returns the masked logits ``(B, H, Nq, Nk)``."""
    S, H = q.shape[1], q.shape[2]
    qp = torch.cat([_seer_pool(q, block_size, n) for n in q_pooling], dim=-1)
    if q_weight is not None:
        qp = torch.einsum("bshi,hio->bsho", qp, q_weight)
    kp = torch.cat([_seer_pool(k, block_size, n) for n in k_pooling], dim=-1)
    if kp.shape[2] < k_weight.shape[0]:  # repeat_kv_varlen
        kp = kp.repeat_interleave(k_weight.shape[0] // kp.shape[2], dim=2)
    kp = torch.einsum("bshi,hio->bsho", kp, k_weight)
    block_positions = torch.arange(S)[0::block_size]
    qp, kp = _llama_rope(qp, block_positions, theta), _llama_rope(kp, block_positions, theta)
    qp, kp = qp.transpose(1, 2), kp.transpose(1, 2)
    if kp.shape[1] < H:
        kp = kp.repeat_interleave(H // kp.shape[1], dim=1)
    attn = torch.matmul(qp, kp.transpose(-1, -2)) * qp.shape[-1] ** -0.5
    n = attn.shape[-1]
    mask = torch.triu(torch.full((n, n), torch.finfo(attn.dtype).min), diagonal=1)
    return attn + mask


def seer_ground_truth(q, k, block_size, scale):
    """Seer's training target (``attn_with_pooling`` in seer_attn/kernels/attn_pooling_kernel.py): causal
    softmax probabilities of the rotated q ``(B, S, H, D)``, k ``(B, S, Hkv, D)``, max-pooled over each
    (query block, key block) tile, each row divided by its sum."""
    B, S, H, _ = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    n = -(-S // block_size)
    padded = torch.nn.functional.pad(probs, (0, n * block_size - S, 0, n * block_size - S))
    pooled = padded.view(B, H, n, block_size, n, block_size).amax(dim=(3, 5))
    return pooled / pooled.sum(-1, keepdim=True)


def seer_gate_loss(gate_logits, ground_truth):
    """The gate loss of ``LlamaSeerAttention.forward`` in training: the first quarter of the query blocks
    dropped, ``torch.nn.KLDivLoss()`` (reduction "mean") of the gate's log-softmax against the ground truth."""
    gt = ground_truth[:, :, ground_truth.shape[2] // 4:].to(torch.float32)
    out = gate_logits[:, :, gate_logits.shape[2] // 4:].to(torch.float32)
    with warnings.catch_warnings():  # torch's note that "mean" is not "batchmean": Seer uses "mean"
        warnings.simplefilter("ignore", UserWarning)
        return torch.nn.KLDivLoss()(torch.nn.functional.log_softmax(out, dim=-1), gt)


def flow_attention_core(queries, keys, values, eps=1e-6):
    """thuml/Flowformer Flow_Attention.py (commit 5414858), ``Flow_Attention.forward`` from step 2 (sigmoid
    feature map) to step 4, on projected ``(B, H, L, D)`` queries / ``(B, H, S, D)`` keys and values."""
    queries, keys = torch.sigmoid(queries), torch.sigmoid(keys)
    sink_incoming = 1.0 / (torch.einsum("nhld,nhd->nhl", queries + eps, keys.sum(dim=2) + eps))
    source_outgoing = 1.0 / (torch.einsum("nhld,nhd->nhl", keys + eps, queries.sum(dim=2) + eps))
    conserved_sink = torch.einsum("nhld,nhd->nhl", queries + eps,
                                  (keys * source_outgoing[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.einsum("nhld,nhd->nhl", keys + eps,
                                    (queries * sink_incoming[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
    sink_allocation = torch.sigmoid(conserved_sink * (float(queries.shape[2]) / float(keys.shape[2])))
    source_competition = torch.softmax(conserved_source, dim=-1) * float(keys.shape[2])
    kv = torch.einsum("nhld,nhlm->nhdm", keys, values * source_competition[:, :, :, None])
    qkv = torch.einsum("nhld,nhdm->nhlm", queries * sink_incoming[:, :, :, None], kv)
    return qkv * sink_allocation[:, :, :, None]


def flow_attention_causal_core(queries, keys, values, eps=1e-6):
    """thuml/Flowformer Flowformer_RL/decision_transformer/models/flowformer_attention.py (commit 0621ac0),
    ``Flowformer_attention.forward`` steps 2 to 4 (its per-position ``normal[..., None]``; source clamp 10), on
    projected ``(B, H, L, D)`` tensors."""
    queries, keys = torch.sigmoid(queries), torch.sigmoid(keys)
    sink_incoming = 1.0 / (torch.einsum("nhld,nhld->nhl", queries + eps, keys.cumsum(dim=2) + eps))
    source_outgoing = 1.0 / (torch.einsum("nhld,nhld->nhl", keys + eps, queries.cumsum(dim=2) + eps))
    normal = ((torch.arange(queries.shape[2])).to(queries.dtype) + 1.0)[None, None, :]
    sink_incoming = sink_incoming * normal
    source_outgoing = source_outgoing * normal
    conserved_sink = torch.einsum("nhld,nhld->nhl", queries + eps,
                                  (keys * source_outgoing[:, :, :, None]).cumsum(dim=2) + eps) / normal
    conserved_source = torch.einsum("nhld,nhld->nhl", keys + eps,
                                    (queries * sink_incoming[:, :, :, None]).cumsum(dim=2) + eps) / normal
    conserved_source = torch.clamp(conserved_source, min=-10.0, max=10.0)
    sink_allocation = torch.sigmoid(conserved_sink)
    conserved_source = torch.exp(conserved_source)
    source_competition = (conserved_source / conserved_source.cumsum(dim=-1)) * normal
    q = queries * (sink_incoming[:, :, :, None] / normal[:, :, :, None])
    kv = torch.cumsum(torch.einsum("nhld,nhlm->nhldm", keys, values * source_competition[:, :, :, None]), dim=2)
    return torch.einsum("nhld,nhldm->nhlm", q, kv) * sink_allocation[:, :, :, None]


def lln_attention_port(q, k, v, causal=False, eps=1e-8, diag=False):
    """``LLNAttention.forward`` and ``LLNPlusDiagAttention(mode="average")`` of the authors' lln/lln_attention.py
    (Linear Log-Normal Attention with Unbiased Concentration, Nahshan et al.), on ``(B, H, N, D)`` tensors; the
    causal mask's ``CausalDotProduct`` (fast_transformers) written as a cumulative sum of outer products, and
    ``BlockDiagAttention``'s masked blocks as their causal pattern."""
    import torch.nn.functional as F
    with torch.no_grad():
        sig_q, sig_k = q.std(), k.std()
        a, b = 0.14855178144710912, -0.35487039130661086
        sig_tild = ((sig_q ** 2 * sig_k ** 2 - b) / (2 * a)) ** 0.5
        alpha, beta = sig_tild / sig_q, sig_tild / sig_k
    qs, ks = alpha * q, beta * k
    qs = qs - qs.amax(dim=-1, keepdim=True)
    ks = ks - ks.amax(dim=(-2, -1), keepdim=True)
    Q, K = torch.exp(qs), torch.exp(ks)
    if not causal:
        S = torch.einsum("...nd,...d->...n", Q, K.sum(dim=-2)) + eps
        out = torch.matmul(Q, torch.matmul(K.transpose(-2, -1), v)) / S.unsqueeze(-1)
    else:
        S = torch.einsum("...nd,...nd->...n", Q, K.cumsum(-2)) + eps
        kv = torch.einsum("...nd,...nm->...ndm", K, v).cumsum(-3)
        out = torch.einsum("...nd,...ndm->...nm", Q, kv) / S.unsqueeze(-1)
    if not diag:
        return out
    B, H, N, D = q.shape

    def sdpa(q, k, v):
        scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-2, -1))
        if causal:
            n = scores.shape[-1]
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(scores.dtype).min)
        return torch.matmul(F.softmax(scores, dim=-1), v)

    ND = D * int(N / D)
    h = H * int(ND / D)
    blocks = sdpa(*(t[:, :, :ND, :].reshape(B, h, D, D) for t in (q, k, v))).reshape(B, H, ND, D)
    rest = sdpa(q[:, :, ND:, :], k[:, :, ND:, :], v[:, :, ND:, :])
    return 0.5 * (out + torch.cat([blocks, rest], dim=-2))


def moh_vit_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, wg, wg_0, wg_1, num_heads, shared_head,
                      routed_head):
    """SkyworkAI/MoH MoH-ViT/attention.py (commit 66bb340), ``MoHAttention.forward`` without q/k norms and dropout
    (identity by default), with its non-fused attention branch; weights as tensors (``wg``: routed, ``wg_0``: the
    shared / routed mix, ``wg_1``: shared; None where the authors' module has none). Returns ``(out, l_aux)``."""
    import torch.nn.functional as F
    B, N, C = x.shape
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    _x = x.reshape(B * N, C)
    l_aux = None
    if routed_head > 0:
        logits = F.linear(_x, wg)
        gates = F.softmax(logits, dim=1)
        num_tokens, num_experts = gates.shape
        _, indices = torch.topk(gates, k=routed_head, dim=1)
        mask = F.one_hot(indices, num_classes=num_experts).sum(dim=1)
        me = gates.mean(dim=0)
        ce = mask.float().mean(dim=0).to(me.dtype)
        l_aux = torch.mean(me * ce) * num_experts * num_experts
        routed_head_gates = gates * mask
        denom_s = torch.sum(routed_head_gates, dim=1, keepdim=True)
        denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
        routed_head_gates = routed_head_gates / denom_s
        routed_head_gates = routed_head_gates.reshape(B, N, -1) * routed_head
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    x = attn.softmax(dim=-1) @ v
    x = x.transpose(1, 2)
    if routed_head > 0:
        if shared_head > 0:
            shared_head_weight = F.linear(_x, wg_1)
            shared_head_gates = F.softmax(shared_head_weight, dim=1).reshape(B, N, -1) * shared_head
            weight_0 = F.softmax(F.linear(_x, wg_0), dim=1).reshape(B, N, 2) * 2
            shared_head_gates = torch.einsum("bn,bne->bne", weight_0[:, :, 0], shared_head_gates)
            routed_head_gates = torch.einsum("bn,bne->bne", weight_0[:, :, 1], routed_head_gates)
            masked_gates = torch.cat([shared_head_gates, routed_head_gates], dim=2)
        else:
            masked_gates = routed_head_gates
    else:
        masked_gates = F.softmax(F.linear(_x, wg_1), dim=1).reshape(B, N, -1) * shared_head
    x = torch.einsum("bne,bned->bned", masked_gates, x).reshape(B, N, head_dim * num_heads)
    return F.linear(x, proj_weight, proj_bias), l_aux


def moh_llama3_head_mask(query_states, num_heads, head_dim, shared_head, routed_head):
    """SkyworkAI/MoH MoH-LLaMA3/Inference_code/modeling_llama.py (commit 66bb340), ``LlamaAttention.forward``:
    the 0 / 1 head mask ``(bsz, q_len, H)`` from ``query_states (bsz, q_len, H * head_dim)``."""
    import torch.nn.functional as F
    bsz, q_len = query_states.shape[:2]
    gate = query_states.reshape(-1, num_heads, head_dim)
    logits = torch.stack([torch.norm(gate[:, i, :], p=2, dim=1) for i in range(shared_head, num_heads)], dim=1)
    logits_std = logits.std(dim=1, keepdim=True)
    logits_norm = logits / (logits_std / 1)
    gates = F.softmax(logits_norm, dim=1)
    num_tokens, num_experts = gates.shape
    _, indices = torch.topk(gates, k=routed_head, dim=1)
    mask = F.one_hot(indices, num_classes=num_experts).sum(dim=1)
    mask = mask.reshape(bsz, q_len, -1)
    return torch.cat([torch.ones_like(mask).to(query_states.dtype), mask], dim=-1).to(query_states.dtype)


def moba_attn_varlen_naive(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, return_masks=False):
    """MoonshotAI/MoBA moba/moba_naive.py, ``moba_attn_varlen_naive`` (MHA: ``q, k, v (S, H, D)``); as theirs,
    plus ``return_masks``: also the ``[H, S, S]`` bool mask each sequence attends with (their final ``gate`` is
    0 there and -inf elsewhere), for the float64 oracle."""
    batch = cu_seqlens.numel() - 1
    softmax_scale = q.shape[-1] ** (-0.5)
    o = torch.zeros_like(q)
    masks = []
    for batch_idx in range(batch):
        batch_start = cu_seqlens[batch_idx].item()
        batch_end = cu_seqlens[batch_idx + 1].item()
        q_ = q[batch_start:batch_end]
        k_ = k[batch_start:batch_end]
        v_ = v[batch_start:batch_end]
        o_ = o[batch_start:batch_end]
        key_gate_weight = []
        batch_size = batch_end - batch_start
        num_block = math.ceil(batch_size / moba_chunk_size)
        for block_idx in range(0, num_block):
            block_start = block_idx * moba_chunk_size
            block_end = min(batch_size, block_start + moba_chunk_size)
            key_gate_weight.append(k_[block_start:block_end].mean(dim=0, keepdim=True))
        key_gate_weight = torch.cat(key_gate_weight, dim=0)
        q_ = q_.type(torch.float32)
        key_gate_weight = key_gate_weight.type(torch.float32)
        gate = torch.einsum("shd,nhd->hsn", q_, key_gate_weight)
        key_gate_weight = key_gate_weight.type_as(k)
        q_ = q_.type_as(k)
        for i in range(num_block):
            gate[:, : (i + 1) * moba_chunk_size, i] = float("-inf")
            gate[:, i * moba_chunk_size: (i + 1) * moba_chunk_size, i] = float("inf")
        gate_top_k_val, gate_top_k_idx = torch.topk(gate, k=min(moba_topk, num_block), dim=-1, largest=True,
                                                    sorted=False)
        gate_top_k_val, _ = gate_top_k_val.min(dim=-1)
        need_attend = gate >= gate_top_k_val.unsqueeze(-1)
        gate_idx_mask = torch.zeros(need_attend.shape, dtype=torch.bool, device=q.device)
        gate_idx_mask = gate_idx_mask.scatter_(dim=-1, index=gate_top_k_idx, value=True)
        need_attend = torch.logical_and(need_attend, gate_idx_mask)
        gate[need_attend] = 0
        gate[~need_attend] = -float("inf")
        gate = gate.repeat_interleave(moba_chunk_size, dim=-1)[:, :, :batch_size]
        gate.masked_fill_(torch.ones_like(gate, dtype=torch.bool).tril().logical_not(), -float("inf"))
        masks.append(gate == 0)
        q_ = q_.type(torch.float32)
        k_ = k_.type(torch.float32)
        v_ = v_.type(torch.float32)
        qk = torch.einsum("xhd,yhd->hxy", q_, k_)
        qk += gate
        qk *= softmax_scale
        p = qk.softmax(dim=-1)
        o_ += torch.einsum("hxy,yhd->xhd", p, v_)
        o = o.type_as(q)
    return (o, masks) if return_masks else o


# --- HyperAttention: insuhan/hyper-attn @68b91e9, models/attention/{hyper_attn,angular_lsh,utils}.py, the torch
# (non-flash) path. Two seams: the LSH directions are an argument (the module draws them at construction) and the
# sampled columns come from ``sample_fn(n_key, batch, heads, m)`` (the authors call torch.randint there).

def _hyper_gray_array(size_n):
    if size_n == 1:
        return torch.tensor([0, 1])
    a = _hyper_gray_array(size_n - 1)
    return torch.concat([a, torch.flip(a, dims=[0]) + 2 ** (size_n - 1)], 0)


def _hyper_hash(mat, proj_dir):
    mask = torch.einsum('...nd,...dr -> ...nr', mat, proj_dir.to(mat.dtype))
    mask = mask > 0
    bin_ids = (mask * 2 ** torch.arange(proj_dir.shape[-1]).view(1, 1, 1, -1)).sum(-1)
    return _hyper_gray_array(proj_dir.shape[-1])[bin_ids]


def _hyper_indexing(x, indices, chunk_size=-1):
    if chunk_size < 0 or (chunk_size > 0 and x.shape[-2] % chunk_size == 0):
        return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    x = x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    new_n = math.ceil(x.shape[2] / chunk_size) * chunk_size
    return torch.nn.functional.pad(x, (0, 0, 0, new_n - x.shape[2]), mode='constant', value=0.)


def _hyper_add(attn1, lse1, attn2, lse2):
    c = (1 / (1 + (lse2 - lse1).exp())).to(dtype=attn1.dtype)
    attn = c * attn1 + (1 - c) * attn2
    lse = lse1 - (c + torch.finfo(lse1.dtype).eps).log()
    return attn, lse


def _hyper_exact(query, key, value, softmax_scale, causal=False, bias=None):
    qk = query @ key.transpose(-1, -2) * softmax_scale
    if causal:
        qk += (torch.ones(query.shape[2], key.shape[2]) * torch.finfo(query.dtype).min).triu(1).reshape(
            1, 1, query.shape[2], key.shape[2])
    if bias is not None:  # the flash path's bias argument, added to QK^T
        qk = qk + bias
    out = qk.softmax(dim=-1) @ value
    lse = torch.logsumexp(qk, dim=-1, keepdim=True)
    return out, lse


def _hyper_no_causal(query, key, value, scale, proj_dir, sample_fn, block_size, sample_size, min_seq_len):
    batch_size, head_size, n_query, dim = query.shape
    n_key = key.shape[2]
    if min_seq_len > n_query:
        return _hyper_exact(query, key, value, scale, causal=False)
    _, query_sort_idx = torch.sort(_hyper_hash(query, proj_dir), dim=2, stable=True)
    _, key_sort_idx = torch.sort(_hyper_hash(key, proj_dir), dim=2, stable=True)
    query_sort_idx_inv = torch.argsort(query_sort_idx, dim=2, stable=True)
    key_block_size = block_size
    query_sorted = _hyper_indexing(query, query_sort_idx, key_block_size)
    key_sorted = _hyper_indexing(key, key_sort_idx, key_block_size)
    value_sorted = _hyper_indexing(value, key_sort_idx, key_block_size)
    num_blocks = key_sorted.shape[2] // key_block_size
    query_block_size = query_sorted.shape[2] // num_blocks
    query_split_per_block = query_sorted.view(-1, 1, query_block_size, dim)
    key_split_per_block = key_sorted.view(-1, 1, key_block_size, dim)
    value_split_per_block = value_sorted.view(-1, 1, key_block_size, dim)
    attn_block, lse_block = _hyper_exact(query_split_per_block, key_split_per_block, value_split_per_block,
                                         softmax_scale=scale, causal=False)
    attn_block = attn_block.contiguous().view(batch_size, head_size, query_sorted.shape[2], -1)
    lse_block = lse_block.contiguous().view(batch_size, head_size, query_sorted.shape[2], -1)
    if query_sorted.shape[2] != n_query:
        attn_block, lse_block = attn_block[:, :, :n_query, :], lse_block[:, :, :n_query, :]
        query_sorted = query_sorted[:, :, :n_query, :]
        key_sorted = key_sorted[:, :, :n_key, :]
        value_sorted = value_sorted[:, :, :n_key, :]
    if sample_size > 0 and (n_query > query_block_size) and (n_key > key_block_size):
        sampled_set = sample_fn(n_key, batch_size, head_size, sample_size)
        offset_n = torch.arange(n_query).view(1, -1, 1)
        weights = n_key / sample_size
        value_subset = _hyper_indexing(value_sorted, sampled_set)
        key_subset = _hyper_indexing(key_sorted, sampled_set)
        block_mask = (offset_n // query_block_size) == (sampled_set // key_block_size).view(-1, 1, sample_size)
        block_mask = block_mask.view(batch_size, head_size, -1, sample_size)
        block_mask = block_mask.to(query_sorted.dtype)
        block_mask *= torch.finfo(query_sorted.dtype).min
        attn_res, lse_res = _hyper_exact(query_sorted, key_subset, value_subset, scale, causal=False, bias=block_mask)
        lse_res = lse_res + math.log(weights)
        attn, lse = _hyper_add(attn_block, lse_block, attn_res, lse_res)
    else:
        attn, lse = attn_block, lse_block
    attn = _hyper_indexing(attn, query_sort_idx_inv)
    lse = _hyper_indexing(lse, query_sort_idx_inv)
    return attn, lse


def hyper_attention_port(query, key, value, proj_dir, sample_fn, scale=None, causal=False, block_size=256,
                         sample_size=256, min_seq_len=4096):
    """``HyperAttention.forward(query, key, value, scale, causal, return_lse=True)`` on ``(B, H, S, D)`` tensors."""
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    n_query = query.shape[2]
    batch_size, n_heads, n_key, dim = key.shape
    scale = dim ** (-0.5) if scale is None else scale
    args = (proj_dir, sample_fn, block_size, sample_size, min_seq_len)
    if not causal:
        return _hyper_no_causal(query, key, value, scale, *args)
    if n_key <= min_seq_len:
        return _hyper_exact(query, key, value, scale, causal=True)
    if n_query % 2:
        query = torch.nn.functional.pad(query, (0, 0, 0, 1), mode='constant', value=0.)
        key = torch.nn.functional.pad(key, (0, 0, 0, 1), mode='constant', value=0.)
        value = torch.nn.functional.pad(value, (0, 0, 0, 1), mode='constant', value=0.)
    q_bd = query.view(batch_size, 2 * n_heads, query.shape[2] // 2, query.shape[-1])
    k_bd = key.view(batch_size, 2 * n_heads, key.shape[2] // 2, key.shape[-1])
    v_bd = value.view(batch_size, 2 * n_heads, key.shape[2] // 2, value.shape[-1])
    attn_bd, lse_bd = hyper_attention_port(q_bd, k_bd, v_bd, proj_dir, sample_fn, scale, True, block_size,
                                           sample_size, min_seq_len)
    attn_bd = attn_bd.contiguous().view(batch_size, n_heads, -1, dim)
    lse_bd = lse_bd.contiguous().view(batch_size, n_heads, -1, 1)
    attn_unmasked, lse_unmasked = _hyper_no_causal(query[:, :, key.shape[2] // 2:, :], key[:, :, :key.shape[2] // 2, :],
                                                   value[:, :, :key.shape[2] // 2, :], scale, *args)
    attn_up, lse_up = attn_bd[:, :, :query.shape[2] // 2, :], lse_bd[:, :, :query.shape[2] // 2, :]
    attn_down, lse_down = _hyper_add(attn_bd[:, :, query.shape[2] // 2:, :], lse_bd[:, :, query.shape[2] // 2:, :],
                                     attn_unmasked, lse_unmasked)
    attn = torch.cat((attn_up, attn_down), dim=-2)
    lse = torch.cat((lse_up, lse_down), dim=-2)
    if n_query % 2:
        attn = attn[:, :, :-1, :]
        lse = lse[:, :, :-1, :]
    return attn, lse


def agent_deit_forward(x, p, num_heads, agent_num, window):
    """LeapLabTHU/Agent-Attention agent_transformer/models/agent_deit.py ``AgentAttention.forward`` (attn_drop and
    proj_drop 0), its modules as functions of the state dict ``p`` (the names of their module)."""
    b, n, c = x.shape
    h = int(n ** 0.5)
    w = int(n ** 0.5)
    head_dim = c // num_heads
    scale = head_dim ** -0.5
    qkv = torch.nn.functional.linear(x, p["qkv.weight"], p.get("qkv.bias")).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    pool = torch.nn.AdaptiveAvgPool2d(output_size=(int(agent_num ** 0.5), int(agent_num ** 0.5)))
    agent_tokens = pool(q[:, 1:, :].reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    q = q.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    k = k.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    v = v.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    agent_tokens = agent_tokens.reshape(b, agent_num, num_heads, head_dim).permute(0, 2, 1, 3)
    position_bias1 = torch.nn.functional.interpolate(p["an_bias"], size=(window, window), mode='bilinear')
    position_bias1 = position_bias1.reshape(1, num_heads, agent_num, -1).repeat(b, 1, 1, 1)
    position_bias2 = (p["ah_bias"] + p["aw_bias"]).reshape(1, num_heads, agent_num, -1).repeat(b, 1, 1, 1)
    position_bias = position_bias1 + position_bias2
    position_bias = torch.cat([p["ac_bias"].repeat(b, 1, 1, 1), position_bias], dim=-1)
    agent_attn = torch.softmax((agent_tokens * scale) @ k.transpose(-2, -1) + position_bias, dim=-1)
    agent_v = agent_attn @ v
    agent_bias1 = torch.nn.functional.interpolate(p["na_bias"], size=(window, window), mode='bilinear')
    agent_bias1 = agent_bias1.reshape(1, num_heads, agent_num, -1).permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
    agent_bias2 = (p["ha_bias"] + p["wa_bias"]).reshape(1, num_heads, -1, agent_num).repeat(b, 1, 1, 1)
    agent_bias = agent_bias1 + agent_bias2
    agent_bias = torch.cat([p["ca_bias"].repeat(b, 1, 1, 1), agent_bias], dim=-2)
    q_attn = torch.softmax((q * scale) @ agent_tokens.transpose(-2, -1) + agent_bias, dim=-1)
    x = q_attn @ agent_v
    x = x.transpose(1, 2).reshape(b, n, c)
    v_ = v[:, :, 1:, :].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    dwc = torch.nn.functional.conv2d(v_, p["dwc.weight"], p["dwc.bias"], padding=1, groups=c)
    x = x.clone()  # (their in-place update of a view of the autograd graph's tensor)
    x[:, 1:, :] = x[:, 1:, :] + dwc.permute(0, 2, 3, 1).reshape(b, n - 1, c)
    return torch.nn.functional.linear(x, p["proj.weight"], p["proj.bias"])


# --- Landmark attention: epfml/landmark-attention @9f13a60, llama/ltriton/test_flash_landmark_attention.py: its
# ``landmark_grouped_softmax`` (the same as llama/llama_mem.py's) and its dense reference ``f()``. One seam: their
# number of softmax groups is a constant (16 there, 64 in llama_mem.py), which must exceed the blocks; here it is
# ``mem_cnt``.

class _LandmarkGroupedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, mem_cnt, resp_mem_idx):
        new_shape = list(x.shape)
        new_shape[dim] = mem_cnt
        max_by_group = x.new_zeros((*new_shape,))
        max_by_group.scatter_reduce_(src=x, index=resp_mem_idx, dim=dim, reduce="amax", include_self=False)
        maxes = torch.gather(max_by_group, dim, resp_mem_idx)
        x_exp = torch.exp((x - maxes).to(torch.float32 if x.dtype != torch.float64 else x.dtype))
        cumsum_by_group = torch.zeros_like(max_by_group, dtype=x_exp.dtype)
        cumsum_by_group.scatter_add_(dim, resp_mem_idx, x_exp, )
        denom = torch.gather(cumsum_by_group, dim, resp_mem_idx)
        probs = x_exp / denom
        ctx.mem_cnt = mem_cnt
        ctx.dim = dim
        ctx.save_for_backward(resp_mem_idx, probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        mem_cnt = ctx.mem_cnt
        dim = ctx.dim
        resp_mem_idx, probs = ctx.saved_tensors
        grad_pair = grad_probs * probs
        new_shape = list(probs.shape)
        new_shape[dim] = mem_cnt
        cumsum_by_group = grad_pair.new_zeros((*new_shape,))
        cumsum_by_group.scatter_add_(dim, resp_mem_idx, grad_pair)
        grad_sum = torch.gather(cumsum_by_group, dim, resp_mem_idx)
        grad_x = grad_pair - probs * grad_sum
        return grad_x, None, None, None


def landmark_grouped_softmax(x, dim, is_mem, last_section_mask, mem_cnt):
    last_and_rest_mask = last_section_mask
    full_access_mask = is_mem | last_and_rest_mask
    max_mem_cnt = mem_cnt
    mem_group_idx = torch.cumsum(is_mem, dim=dim)
    mem_bucket_id = max_mem_cnt - 1
    resp_mem_idx = torch.where(last_and_rest_mask, max_mem_cnt - 1, torch.where(is_mem, mem_bucket_id, mem_group_idx))
    probs = _LandmarkGroupedSoftmax.apply(x, dim, max_mem_cnt, resp_mem_idx)
    new_shape = list(x.shape)
    new_shape[dim] = max_mem_cnt
    group_prob = probs.new_zeros((*new_shape, ))
    group_prob.scatter_(dim, torch.where(is_mem, mem_group_idx - 1, max_mem_cnt - 1), probs)
    probs = probs.mul(torch.where(full_access_mask, last_section_mask, torch.gather(group_prob, dim, resp_mem_idx)))
    return probs


def landmark_attention_port(q, k, v, mem_freq):
    """Their test's ``f()`` on ``(B, H, S, D)`` tensors (landmarks every ``mem_freq + 1`` keys, the last of each
    block)."""
    batch, nheads, seqlen_q, d = q.shape
    seqlen_k = k.shape[2]
    block_size = mem_freq + 1
    is_mem = torch.arange(0, seqlen_k, device=q.device) % block_size == (block_size - 1)
    att = q @ k.transpose(-1, -2) / math.sqrt(d)
    att_mask = torch.tril(torch.ones((1, 1, seqlen_q, seqlen_k), device=q.device), diagonal=seqlen_k - seqlen_q) == 1.
    last_section_mask = (torch.arange(0, seqlen_k, device=q.device) // (mem_freq + 1))[None, :] == (
        torch.arange(seqlen_k - seqlen_q, seqlen_k, device=q.device) // (mem_freq + 1))[:, None]
    last_section_mask = last_section_mask.unsqueeze(0).unsqueeze(1)
    is_mem_ = is_mem.view(1, 1, 1, seqlen_k)
    mask = att_mask & ~(last_section_mask & is_mem_)
    last_section_mask = last_section_mask & mask
    is_mem_ = is_mem_ & mask
    is_mem_ = is_mem_.expand(batch, nheads, seqlen_q, seqlen_k)
    att = att.masked_fill(~mask, float("-inf"))
    att = landmark_grouped_softmax(att, -1, is_mem_, last_section_mask, seqlen_k // block_size + 2).to(q.dtype)
    att = att.masked_fill(~mask, 0.0)
    return att @ v
