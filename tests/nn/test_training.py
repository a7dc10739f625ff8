"""Training with attnops modules: a 2-layer model per spec learns a synthetic copy task on CPU, and
torch.compile traces it without graph breaks and matches eager."""

import pytest
import torch
from torch import nn

from attnops import BlockMask
from attnops.lowrank import KeyProjection
from attnops.nn import Attention, BlockSparseSpec, SoftmaxSpec, LinearAttentionSpec, LowRankKeySpec, MoBASpec

V, HALF = 16, 12  # vocabulary, length of the sequence to copy

SPECS = {
    "dense": SoftmaxSpec(causal=True),
    # every query sees the whole past: the copy needs positions HALF back, beyond a small window
    "block_sparse": BlockSparseSpec(pattern=lambda sq, sk: BlockMask.causal((sq, sk), block_size=16)),
    "linear": LinearAttentionSpec(feature_map="focused", normalize=True, causal=True),  # elu + 1 reached 0.28x in 300 steps
    # one 64-token block at the copy task's length (routing is exercised at 200 tokens below); tile routing: its
    # shapes do not depend on the routing, so it compiles fullgraph (token routing's pair count does)
    "moba": MoBASpec(block_size=64, topk=2, causal=True, routing="tile"),
}
# Low-rank keys (Loki) are an inference method (forward only): compiled, not trained, below.


class TinyLM(nn.Module):
    def __init__(self, spec, dim=64, heads=4, kv_heads=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(V + 1, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.RMSNorm(dim), attn=Attention(dim, heads, kv_heads, attention=spec, rope=10000.0),
                norm2=nn.RMSNorm(dim), mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)))))
        self.head = nn.Linear(dim, V + 1)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b["attn"](b["norm1"](x))
            x = x + b["mlp"](b["norm2"](x))
        return self.head(x)


def copy_batch(batch, gen):
    seq = torch.randint(0, V, (batch, HALF), generator=gen)
    sep = torch.full((batch, 1), V)
    ids = torch.cat([seq, sep, seq], dim=1)  # predict the second copy
    return ids[:, :-1], ids[:, 1:]


def copy_loss(model, ids, targets):
    logits = model(ids)[:, HALF:]  # positions whose next token is a copied one
    return nn.functional.cross_entropy(logits.reshape(-1, V + 1), targets[:, HALF:].reshape(-1))


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_copy_task_loss_falls(spec):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyLM(SPECS[spec])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    eval_ids, eval_targets = copy_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = copy_loss(model, eval_ids, eval_targets).item()
    for _ in range(300):
        ids, targets = copy_batch(32, gen)
        loss = copy_loss(model, ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = copy_loss(model, eval_ids, eval_targets).item()
    # chance is ln(17) = 2.83; a model that copies gets near 0
    assert end < 0.25 * start, (start, end)


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_compiled_model_has_no_graph_breaks_and_matches_eager(spec):
    torch.manual_seed(0)
    model = TinyLM(SPECS[spec], layers=1)
    ids, _ = copy_batch(2, torch.Generator().manual_seed(0))
    eager = model(ids)  # one eager step first: a pattern's block mask is built (and cached) outside the graph
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(ids)
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # the backward traces too
    assert model.blocks[0]["attn"].q_proj.weight.grad is not None


def test_compiled_moba_routes_without_graph_breaks():
    """At 200 tokens MoBA routes (4 blocks of 64, top-2); the routed mask's transpose (for dk/dv)
    is built inside the graph with data-independent shapes."""
    torch.manual_seed(0)
    model = TinyLM(SPECS["moba"], layers=1)
    ids = torch.randint(0, V, (2, 200), generator=torch.Generator().manual_seed(0))
    eager = model(ids)
    eager.sum().backward()
    expected_grad = model.blocks[0]["attn"].q_proj.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(model, fullgraph=True)(ids)
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(model.blocks[0]["attn"].q_proj.weight.grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_compiled_lowrank_key_model_matches_eager():
    torch.manual_seed(0)
    spec = LowRankKeySpec(KeyProjection.identity(2, 16), rank=4, topk=8, local=2)
    model = TinyLM(spec, layers=1).eval()
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        out = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
