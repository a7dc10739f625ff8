"""Routing Transformer attention (Roy et al. 2021): the op against its float64 oracle (a dense same-cluster mask;
forward and the gradients of q, k, v) over odd shapes, GQA, causal and not, on every backend; the assignment, the
online k-means step, the module, and the refusals."""

import pytest
import torch

import attnops
from attnops.ops.clustered import cluster_assignment, reference, update_centroids
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D, C)
SHAPES = [(2, 333, 333, 4, 2, 40, 5), (1, 200, 250, 3, 3, 96, 8), (2, 130, 130, 2, 1, 64, 1)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-C{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype, causal, fwd_impl):
    B, Sq, Sk, H, Hkv, D, C = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    centroids = torch.randn(Hkv, C, D, generator=g)
    qc, kc = cluster_assignment(q.to(dtype), centroids), cluster_assignment(k.to(dtype), centroids)

    def ours(q, k, v):
        return attnops.routing_attention(q, k, v, centroids.to(q.device), causal=causal, backend=fwd_impl.backend)

    def oracle(q, k, v):
        return reference.routing_attention(q, k, v, qc, kc, causal=causal)

    dout = torch.randn(B, Sq, H, D, generator=g)
    assert_op_matches_oracle(ours, oracle, [q, k, v], dout, dtype, fwd_impl.device, ("dq", "dk", "dv"))


def test_clusters_are_the_nearest_centroid_on_the_sphere():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 4, 16, generator=g)
    mu = torch.randn(2, 6, 16, generator=g)
    got = cluster_assignment(x, mu)
    cos = torch.nn.functional.cosine_similarity(x.unsqueeze(-2), mu.repeat_interleave(2, 0)[None, None], dim=-1)
    assert torch.equal(got, cos.argmax(-1))
    _, qc, kc = attnops.routing_attention(x, x[:, :, ::2], x[:, :, ::2], mu, return_clusters=True)
    assert torch.equal(qc, got) and torch.equal(kc, cluster_assignment(x[:, :, ::2], mu))


def test_a_query_attends_only_its_cluster():
    """Two clusters along +e0 / -e0: a query of one cluster ignores the other's values completely."""
    S, D = 64, 8
    mu = torch.zeros(1, 2, D)
    mu[0, 0, 0], mu[0, 1, 0] = 1.0, -1.0
    side = torch.arange(S) % 2 == 0
    k = torch.randn(1, S, 1, D) * 0.1
    k[0, :, 0, 0] = torch.where(side, 1.0, -1.0)
    q = k.clone()
    v = torch.where(side.view(1, S, 1, 1), 1.0, -100.0).expand(1, S, 1, D).contiguous()
    out = attnops.routing_attention(q, k, v, mu, causal=True)
    assert torch.allclose(out[0, side, 0], torch.ones(int(side.sum()), D))
    assert torch.allclose(out[0, ~side, 0], torch.full((int((~side).sum()), D), -100.0))


def test_online_kmeans_moves_centroids_to_their_data():
    g = torch.Generator().manual_seed(2)
    D = 8
    centers = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=-1)
    labels = torch.randint(0, 3, (4000,), generator=g)
    data = centers[labels] + 0.05 * torch.randn(4000, D, generator=g)
    q = data.view(1, 4000, 1, D)
    mu = centers.unsqueeze(0) + 0.3 * torch.randn(1, 3, D, generator=g)
    before = (torch.nn.functional.normalize(mu[0], dim=-1) * centers).sum(-1)
    for _ in range(50):
        update_centroids(mu, q, q, decay=0.9)
    after = (mu[0] * centers).sum(-1)
    assert (after > before).all() and (after > 0.99).all()
    assert torch.allclose(mu.norm(dim=-1), torch.ones(1, 3))


def test_module_trains_and_updates_its_centroids_in_training_only():
    torch.manual_seed(3)
    layer = attnops.nn.RoutingAttention(32, 4, num_clusters=4, num_kv_heads=2)
    x = torch.randn(2, 50, 32, requires_grad=True)
    before = layer.centroids.clone()
    layer.eval()
    y = layer(x)
    assert torch.equal(layer.centroids, before)
    layer.train()
    y = layer(x)
    assert not torch.equal(layer.centroids, before)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and layer.q_proj.weight.grad.abs().sum() > 0
    x2 = x.detach().clone()
    x2[:, -1] += 1.0
    layer.eval()
    torch.testing.assert_close(layer(x2)[:, :-1], layer(x.detach())[:, :-1])  # causal


def test_long_sequence_without_n_by_n_and_refusals():
    g = torch.Generator().manual_seed(4)
    S = 65536
    q, k, v = (torch.randn(1, S, 1, 16, generator=g) for _ in range(3))
    mu = torch.randn(1, 64, 16, generator=g)  # ~1K keys per cluster
    out = attnops.routing_attention(q, k, v, mu)
    assert out.shape == q.shape and torch.isfinite(out).all()
    small = q[:, :32], k[:, :32], v[:, :32]
    with pytest.raises(ValueError, match="centroids must be"):
        attnops.routing_attention(*small, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="centroids must be"):
        attnops.routing_attention(*small, torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnops.routing_attention(*small, mu, causal=None)
    with pytest.raises(TypeError, match="positional"):
        attnops.routing_attention(*small, mu, True)
