"""The training-free block predictor (predict_block_mask, pooled_block_map) and the learned BlockGate:
their estimates against exact block maps, selection rules, forced blocks, training, bad input."""

import pytest
import torch

import attnops
from attnops.ops.softmax import reference
from attnops.core.block_map import MapRequest
from attnops.ops.routed import pooled_block_map, select_blocks
from tests.authors_ref import seer_attn_gate, seer_gate_loss, seer_ground_truth, sparge_block_map


def blockwise_constant(B, S, H, Hkv, D, block, scale=1.0):
    """q, k whose blocks each repeat one random vector: block means are then exact summaries."""
    n = -(-S // block)
    q = (torch.randn(B, n, H, D) * scale).repeat_interleave(block, dim=1)[:, :S]
    k = (torch.randn(B, n, Hkv, D) * scale).repeat_interleave(block, dim=1)[:, :S]
    return q.contiguous(), k.contiguous()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [(300, 300), (200, 333)])
def test_pooled_estimate_is_exact_on_blockwise_constant_inputs(seq, causal):
    """With one vector per block the estimate is the true mean block map, the partial last key block
    included (its log n_j term)."""
    Sq, Sk = seq
    block = 32
    q, _ = blockwise_constant(2, Sq, 4, 2, 16, block, scale=2.0)
    _, k = blockwise_constant(2, Sk, 4, 2, 16, block, scale=2.0)
    est = pooled_block_map(q, k, block, causal=causal)
    if causal:  # the true map differs inside diagonal blocks (token causality); compare without it
        q64 = q.double()
        ref = reference.block_sparse_attention(q64, k.double(), k.double(), None, causal=False, window_size=(-1, -1),
                                               softmax_scale=0.25, block_map=MapRequest(block, block, "mean"))[2]
        est_full = pooled_block_map(q, k, block, causal=False)
        torch.testing.assert_close(est_full.double(), ref, rtol=1e-4, atol=1e-6)
        last = torch.clamp((torch.arange(est.shape[-2]) + 1) * block, max=Sq) - 1 + (Sk - Sq)
        future = torch.arange(est.shape[-1]).view(1, -1) > torch.div(last, block, rounding_mode="floor").view(-1, 1)
        assert future.any() and torch.all(est[..., future] == 0)
    else:
        ref = reference.block_sparse_attention(q.double(), k.double(), k.double(), None, causal=False,
                                               window_size=(-1, -1), softmax_scale=0.25,
                                               block_map=MapRequest(block, block, "mean"))[2]
        torch.testing.assert_close(est.double(), ref, rtol=1e-4, atol=1e-6)
    sums = est.sum(-1)
    torch.testing.assert_close(sums[sums > 0], torch.ones_like(sums[sums > 0]))


def test_cdf_rule_keeps_the_requested_mass_of_the_true_map():
    q, k = blockwise_constant(1, 512, 2, 2, 16, 64, scale=1.5)
    mask = attnops.predict_block_mask(q, k, 64, cdf_threshold=0.9, num_sink_blocks=0, rule="mass")
    true_map = attnops.attention(q, k, k, return_block_map=True, map_block_size=64).block_map
    kept_mass = (true_map * mask.to_dense()).sum(-1)
    assert torch.all(kept_mass >= 0.9 - 1e-5)
    assert mask.density < 1.0


def test_selection_rules():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    allowed = torch.ones(2, 4, dtype=torch.bool)
    assert select_blocks(probs, allowed, topk=2).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert select_blocks(probs, allowed, threshold=0.3).tolist() == [[True, True, False, False],
                                                                     [False, False, True, True]]
    assert select_blocks(probs, allowed, cdf_threshold=0.8).tolist() == [[True, True, False, False],
                                                                         [False, True, True, True]]
    allowed[0, 0] = False  # a forbidden block is never selected
    assert not select_blocks(probs, allowed, topk=4)[0, 0]


@pytest.mark.parametrize("causal", [False, True])
def test_forced_blocks_and_causality(causal):
    q = torch.randn(2, 333, 4, 32)
    k = torch.randn(2, 333, 2, 32)
    mask = attnops.predict_block_mask(q, k, (32, 64), topk=1, causal=causal, num_sink_blocks=2, rule="mass")
    dense = mask.to_dense()
    assert dense.shape == (2, 4, 11, 6) and mask.causal == causal
    qb = torch.arange(11)
    diag = torch.div(torch.clamp((qb + 1) * 32, max=333) - 1, 64, rounding_mode="floor")
    assert dense[..., qb, diag].all()
    sink_in_future = causal & (torch.arange(2) > diag.view(-1, 1))  # causality wins over the sinks
    assert (dense[..., :2] | sink_in_future).all()
    if causal:
        assert not (dense & (torch.arange(6) > diag.view(-1, 1))).any()
    assert (dense.sum(-1) <= 4).all()  # topk 1 + diagonal + 2 sinks


@pytest.mark.parametrize("rule", ["sparge", "mass"])
def test_self_similarity_check_keeps_loose_blocks_dense(rule):
    q = torch.randn(1, 256, 2, 32)  # random tokens: mean pairwise cosine ~ 0
    k = torch.randn(1, 256, 2, 32)
    mask = attnops.predict_block_mask(q, k, 64, topk=1, causal=True, sim_threshold=0.5, rule=rule)
    assert torch.equal(mask.to_dense(), attnops.BlockMask.causal(256, 64).to_dense().expand(1, 2, 4, 4))
    q2, k2 = blockwise_constant(1, 256, 2, 2, 32, 64)  # cosine 1 inside every block
    mask2 = attnops.predict_block_mask(q2, k2, 64, topk=1, causal=True, num_sink_blocks=0, sim_threshold=0.5,
                                       rule=rule)
    assert mask2.density < mask.density


def test_predicted_mask_runs_the_exact_core():
    q, k = blockwise_constant(1, 300, 4, 2, 32, 32)
    v = torch.randn(1, 300, 2, 32)
    mask = attnops.predict_block_mask(q, k, 32, cdf_threshold=0.95, causal=True)
    out = attnops.block_sparse_attention(q, k, v, mask)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), mask, causal=True,
                                           window_size=(-1, -1), softmax_scale=32 ** -0.5)[0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(rule="mass"), "exactly one"),
    (dict(topk=2, threshold=0.1, rule="mass"), "exactly one"),
    (dict(topk=2, cdf_threshold=0.1), "exactly one"),
    (dict(topk=0), "topk must be"),
    (dict(threshold=1.5, rule="mass"), "threshold must"),
    (dict(cdf_threshold=0.0), "cdf_threshold must"),
    (dict(topk=1, sim_threshold=2.0), "sim_threshold"),
    (dict(topk=1, num_sink_blocks=-1), "num_sink_blocks"),
])
def test_predictor_bad_arguments(kwargs, match):
    q, k = torch.randn(1, 128, 2, 16), torch.randn(1, 128, 1, 16)
    with pytest.raises(ValueError, match=match):
        attnops.predict_block_mask(q, k, 64, **kwargs)
    with pytest.raises(ValueError, match="powers of two"):
        attnops.predict_block_mask(q, k, 48, topk=1)


def clustered(B, S, H, D, block, seed):
    """Tokens near one direction per block, each block with its own spread: block self-similarities
    cover (0, 1), so per-head thresholds split blocks into similar and dissimilar ones."""
    g = torch.Generator().manual_seed(seed)
    n = -(-S // block)
    centre = torch.randn(B, n, H, D, generator=g).repeat_interleave(block, dim=1)[:, :S]
    spread = (torch.rand(B, n, H, 1, generator=g) * 2.5 + 0.1).repeat_interleave(block, dim=1)[:, :S]
    return (centre + spread * torch.randn(B, S, H, D, generator=g)).contiguous()


SPARGE_CASES = [  # (Sq, Sk, H, Hkv, D, blocks, causal, kwargs for ours; the port takes the same values)
    (1000, 1000, 4, 4, 64, (128, 64), True, dict(cdf_threshold=[0.5, 0.7, 0.9, 0.99], sim_threshold=[0.1, 0.3, 0.5, 0.7])),
    (1000, 1000, 4, 4, 40, (128, 64), True, dict(topk=[0.1, 0.25, 0.5, 1.0], sim_threshold=[0.2, 0.4, 0.6, 0.0])),
    (777, 777, 4, 4, 96, (64, 64), True, dict(cdf_threshold=0.8, sim_threshold=0.35, num_sink_blocks=1)),
    (333, 517, 4, 2, 64, (64, 64), False, dict(cdf_threshold=0.9, sim_threshold=0.3)),
    (333, 517, 4, 2, 64, (64, 128), False, dict(topk=0.3, num_sink_blocks=1)),
]


@pytest.mark.parametrize("case", range(len(SPARGE_CASES)))
def test_sparge_rule_equals_the_authors_block_map(case):
    """rule="sparge" (the default) is SpargeAttn's get_block_map_meansim, block for block (port in
    tests/authors_ref.py): per-head cdf / topk fractions / similarity thresholds, GQA, causal, sinks,
    partial blocks, head dims 40 / 64 / 96."""
    Sq, Sk, H, Hkv, D, (bq, bk), causal, kw = SPARGE_CASES[case]
    q = clustered(2, Sq, H, D, bq, seed=case)
    k = clustered(2, Sk, Hkv, D, bk, seed=100 + case)
    ours = attnops.predict_block_mask(q, k, (bq, bk), causal=causal, **kw).to_dense()
    port = dict(cdfthreshd=None, simthreshd1=-1.0)
    for name, theirs in (("cdf_threshold", "cdfthreshd"), ("topk", "topk"), ("sim_threshold", "simthreshd1")):
        if name in kw:
            port[theirs] = torch.tensor(kw[name]) if isinstance(kw[name], list) else kw[name]
    ref = sparge_block_map(q.transpose(1, 2), k.transpose(1, 2), is_causal=causal, BLKQ=bq, BLKK=bk,
                           attention_sink=kw.get("num_sink_blocks", 0) == 1, **port)
    assert ref.shape == ours.shape
    assert torch.equal(ours, ref), f"{int((ours != ref).sum())} of {ref.numel()} blocks differ"
    assert 0.05 < ours.float().mean() < 0.95  # neither rule degenerate on these inputs
    if "sim_threshold" in kw:  # the similarity check ran both ways
        sims = attnops.ops.routed.predictor._self_similarity(k, bk, with_self=True)
        assert (sims > 0.3).any() and (sims < 0.3).any()


def test_sparge_and_mass_rules_differ_as_documented():
    """The mass rule keeps the crossing block and the diagonal: at the same cdf_threshold it keeps a
    superset of SpargeAttn's blocks when no similarity check runs (its +log n_j term only moves the partial
    block, absent here)."""
    q, k = clustered(1, 1024, 4, 64, 64, seed=7), clustered(1, 1024, 4, 64, 64, seed=8)
    sparge = attnops.predict_block_mask(q, k, 64, cdf_threshold=0.7, causal=True).to_dense()
    mass = attnops.predict_block_mask(q, k, 64, cdf_threshold=0.7, causal=True, rule="mass",
                                      num_sink_blocks=0).to_dense()
    assert torch.equal(sparge & mass, sparge) and mass.sum() > sparge.sum()
    diag = torch.arange(16)
    assert mass[..., diag, diag].all()


def test_per_head_values_and_fractional_topk():
    q, k = torch.randn(1, 512, 4, 32), torch.randn(1, 512, 2, 32)
    for rule in ("sparge", "mass"):
        per_head = attnops.predict_block_mask(q, k, 64, topk=[1, 2, 3, 8], rule=rule, num_sink_blocks=0).to_dense()
        for h, count in enumerate((1, 2, 3, 8)):
            single = attnops.predict_block_mask(q, k, 64, topk=count, rule=rule, num_sink_blocks=0).to_dense()
            assert torch.equal(per_head[:, h], single[:, h])
        frac = attnops.predict_block_mask(q, k, 64, topk=0.3, rule=rule, num_sink_blocks=0).to_dense()
        count = attnops.predict_block_mask(q, k, 64, topk=2, rule=rule, num_sink_blocks=0).to_dense()
        assert torch.equal(frac, count)  # int(0.3 * 8) = 2 blocks
    for name in ("cdf_threshold", "sim_threshold"):
        extra = {} if name == "cdf_threshold" else dict(topk=0.5)
        per_head = attnops.predict_block_mask(q, k, 64, **{name: [0.3, 0.5, 0.7, 0.9]}, **extra).to_dense()
        for h, x in enumerate((0.3, 0.5, 0.7, 0.9)):
            single = attnops.predict_block_mask(q, k, 64, **{name: x}, **extra).to_dense()
            assert torch.equal(per_head[:, h], single[:, h])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(topk=[1, 2]), ValueError, "one per head"),
    (dict(topk=1.5), ValueError, "a count.*a fraction"),
    (dict(topk=0.0), ValueError, "topk must be"),
    (dict(cdf_threshold=[0.5, 0.5, 0.5, 1.2]), ValueError, "cdf_threshold must lie"),
    (dict(threshold=0.2), ValueError, "rule='mass' only"),
    (dict(topk=1, rule="seer"), ValueError, "rule must be one of"),
    (dict(topk=1, sim_threshold=torch.ones(2, 2)), ValueError, "one per head"),
    (dict(topk=True), TypeError, "topk must be a number"),
])
def test_sparge_rule_bad_arguments(kwargs, error, match):
    q, k = torch.randn(1, 128, 4, 16), torch.randn(1, 128, 2, 16)
    with pytest.raises(error, match=match):
        attnops.predict_block_mask(q, k, 64, **kwargs)


# ---- BlockGate ------------------------------------------------------------------------------------

def test_gate_shapes_causality_and_gqa():
    gate = attnops.nn.BlockGate(32, 4, block_size=(32, 64), pooling=("avg", "max", "min"), hidden=16, num_kv_heads=2)
    q, k = torch.randn(2, 200, 4, 32), torch.randn(2, 333, 2, 32)
    logits = gate(q, k, causal=True)
    assert logits.shape == (2, 4, 7, 6) and logits.dtype == torch.float32
    pos_last = torch.clamp((torch.arange(7) + 1) * 32, max=200) - 1 + 133
    future = torch.arange(6).view(1, -1) > (pos_last // 64).view(-1, 1)
    assert torch.isneginf(logits[..., future]).all() and torch.isfinite(logits[..., ~future]).all()
    mask = gate.block_mask(q, k, causal=True, topk=2)
    assert mask.shape == (2, 4, 200, 333) and mask.causal
    assert mask.to_dense()[..., torch.arange(7), pos_last // 64].all()  # the diagonal block


def test_gate_target_is_the_normalised_max_map():
    gate = attnops.nn.BlockGate(16, 2, block_size=32)
    q, k = torch.randn(1, 150, 2, 16), torch.randn(1, 150, 2, 16)
    target = gate.target(q, k, causal=True)
    ref = reference.block_sparse_attention(q.double(), k.double(), k.double(), None, causal=True,
                                           window_size=(-1, -1), softmax_scale=0.25,
                                           block_map=MapRequest(32, 32, "max"))[2]
    torch.testing.assert_close(target.double(), ref / ref.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_gate_loss_is_kl_and_leaves_q_k_alone():
    gate = attnops.nn.BlockGate(16, 2, block_size=32)
    q = torch.randn(1, 128, 2, 16, requires_grad=True)
    k = torch.randn(1, 128, 2, 16, requires_grad=True)
    loss = gate.loss(q, k, causal=True)
    target = gate.target(q, k, causal=True)
    log_p = torch.log_softmax(gate(q, k, causal=True), -1)
    kl = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - log_p), torch.zeros_like(log_p))
    torch.testing.assert_close(loss, kl.sum() / 8)  # B * H * Nq query blocks, every one with a target
    loss.backward()
    assert q.grad is None and k.grad is None and gate.q_proj.grad is not None
    assert gate.loss(q, k, target=torch.softmax(gate(q, k), -1).detach()).item() == pytest.approx(0.0, abs=1e-6)


def test_gate_learns_a_block_routing():
    """Queries of block i look for a hidden key pattern placed in block perm[i]: trained on the
    kernels' max-pooled maps, the gate's top-1 block finds it far more often than at init."""
    torch.manual_seed(0)
    S, block, D, H, n = 256, 32, 16, 2, 8
    patterns = torch.randn(n, H, D) * 3.0

    def sample():
        perm = torch.stack([torch.randperm(n) for _ in range(4)])  # (B, n)
        k = torch.randn(4, S, H, D) * 0.5
        q = torch.randn(4, S, H, D) * 0.5
        for b in range(4):
            k[b] += patterns[perm[b]].repeat_interleave(block, 0)  # block j carries pattern perm[j]
            q[b] += patterns.repeat_interleave(block, 0)  # query block i looks for pattern i
        where = torch.argsort(perm, dim=1)  # the key block holding pattern i
        return q, k, where

    def hit_rate(gate):
        q, k, where = sample()
        top = gate(q, k, causal=False).argmax(-1)  # (B, H, n)
        return float((top == where.unsqueeze(1)).float().mean())

    gate = attnops.nn.BlockGate(D, H, block_size=block, hidden=16)
    before = hit_rate(gate)
    opt = torch.optim.Adam(gate.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        q, k, _ = sample()
        loss = gate.loss(q, k, causal=False)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert hit_rate(gate) > max(0.9, before + 0.3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pooling=("avg", "mean")), "pooling"),
    (dict(pooling=()), "pooling"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(hidden=0), "hidden"),
    (dict(block_size=24), "powers of two"),
])
def test_gate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attnops.nn.BlockGate(16, 4, **kwargs)


def test_gate_rejects_mismatched_inputs():
    gate = attnops.nn.BlockGate(16, 4, num_kv_heads=2)
    with pytest.raises(ValueError, match="BlockGate expects"):
        gate(torch.randn(1, 64, 4, 16), torch.randn(1, 64, 4, 16))


@pytest.mark.parametrize("config", ["two_linears_gqa", "single_linear"])
def test_rotary_gate_is_seers_attn_gate_and_loss(config):
    """With rotary= the gate is SeerAttention's AttnGate on pre-rotary q/k (block RoPE at each block's first
    position, the model's base) and its loss is Seer's KLDivLoss over the last 3/4 of query blocks, both
    against ports of Seer's code (tests/authors_ref.py); the target is Seer's ground truth."""
    torch.manual_seed(0)
    S, D, theta, block = 300, 32, 500.0, 64  # a partial last block
    if config == "two_linears_gqa":
        H, Hkv, hidden, qpool, kpool = 4, 2, 16, ("avg", "max"), ("max", "min", "avg")
    else:  # Seer's Qavg_Kmaxminavg with hidden == D: no q linear, k projected per query head (MHA here)
        H, Hkv, hidden, qpool, kpool = 4, 4, D, ("avg",), ("max", "min", "avg")
    gate = attnops.nn.BlockGate(D, H, block_size=block, pooling=qpool, k_pooling=kpool, hidden=hidden,
                                num_kv_heads=Hkv, rotary=attnops.nn.Rotary(D, theta))
    assert gate.objective == "seer"
    if config == "single_linear":
        with torch.no_grad():
            gate.q_proj.copy_(torch.eye(D).expand(H, D, D))
    q, k = torch.randn(2, S, H, D), torch.randn(2, S, Hkv, D)
    ref_logits = seer_attn_gate(q, k, None if config == "single_linear" else gate.q_proj.detach(),
                                gate.k_proj.detach(), block, qpool, kpool, theta)
    logits = gate(q, k, causal=True)
    allowed = torch.isfinite(logits)
    assert torch.equal(allowed, ref_logits > -1e30)
    torch.testing.assert_close(logits[allowed], ref_logits[allowed], rtol=1e-4, atol=1e-4)
    rope = attnops.nn.Rotary(D, theta)
    truth = seer_ground_truth(rope(q), rope(k), block, D ** -0.5)
    target = gate.target(q, k, causal=True)
    torch.testing.assert_close(target.double(), truth, rtol=1e-4, atol=1e-6)
    ref_loss = seer_gate_loss(ref_logits, truth)
    torch.testing.assert_close(gate.loss(q, k, causal=True), ref_loss.float(), rtol=1e-4, atol=1e-7)
    assert gate.loss(q, k, causal=True, target=target).item() == pytest.approx(ref_loss.item(), rel=1e-4)
    other = attnops.nn.BlockGate(D, H, block_size=block, pooling=qpool, k_pooling=kpool, hidden=hidden,
                                 num_kv_heads=Hkv, rotary=rope, objective="query_block_mean")
    other.load_state_dict(gate.state_dict())
    assert other.loss(q, k, causal=True).item() != pytest.approx(ref_loss.item(), rel=1e-2)  # the documented alternative


def test_rotary_gate_arguments():
    with pytest.raises(TypeError, match="Rotary"):
        attnops.nn.BlockGate(16, 2, rotary=10000.0)
    with pytest.raises(ValueError, match="head_dim 32"):
        attnops.nn.BlockGate(16, 2, rotary=attnops.nn.Rotary(32))
    with pytest.raises(ValueError, match="even hidden"):
        attnops.nn.BlockGate(16, 2, rotary=attnops.nn.Rotary(16), hidden=5)
    with pytest.raises(ValueError, match="objective"):
        attnops.nn.BlockGate(16, 2, objective="mse")
    with pytest.raises(ValueError, match="k_pooling"):
        attnops.nn.BlockGate(16, 2, k_pooling=("sum",))
    assert attnops.nn.BlockGate(16, 2).objective == "query_block_mean"
