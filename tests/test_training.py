"""Training with attnops modules: a 2-layer model per spec learns a synthetic copy task on CPU, and
torch.compile traces it without graph breaks and matches eager."""

import pytest
import torch
from torch import nn

from attnops import BlockMask
from attnops.nn import Attention, BlockSparse, Dense, Linear

V, HALF = 16, 12  # vocabulary, length of the sequence to copy

SPECS = {
    "dense": Dense(causal=True),
    # every query sees the whole past: the copy needs positions HALF back, beyond a small window
    "block_sparse": BlockSparse(pattern=lambda sq, sk: BlockMask.causal((sq, sk), block_size=16)),
    "linear": Linear(feature_map="focused", normalize=True, causal=True),  # elu + 1 reached 0.28x in 300 steps
}


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
