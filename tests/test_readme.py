"""Every Python snippet of README.md runs, so the README cannot drift from the API.

Each ```python block runs on its own, after the setup below that gives it the objects its prose assumes
(small inputs, a tiny random-weight model); a block without a setup entry fails the test, so a new snippet
needs one. Blocks are matched by their first line."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

_QKV = """
q = torch.randn(1, 1024, 8, 64); k = torch.randn(1, 1024, 2, 64); v = torch.randn(1, 1024, 2, 64)
mask = attnops.BlockMask.sliding_window(1024, window=256)
"""

# first line of a block -> the setup it runs after (``import torch, attnops`` always precedes it)
SETUP = {
    "import torch, attnops": "",
    "cache = attnops.KVCache(batch=2,": """
k_pad, v_pad = torch.randn(2, 17, 1, 64), torch.randn(2, 17, 1, 64); q_pad = torch.randn(2, 17, 8, 64)
k_new, v_new = torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64); q_new = torch.randn(2, 1, 8, 64)
k_pages, v_pages = torch.randn(40, 16, 1, 64), torch.randn(40, 16, 1, 64)
table = torch.randperm(40).to(torch.int32).view(2, 20); pads = torch.tensor([0, 3], dtype=torch.int32)
x = torch.randn(1, 20, 512); x_prompt, x_next = x[:, :19], x[:, 19:]
""",
    "out = attnops.attention(q, k, v, causal=True, softcap=50.0)": _QKV + "slopes = torch.rand(8) * 0.1\n",
    "bias = torch.nn.Parameter(": _QKV + "attention_mask = torch.ones(1, 1024, dtype=torch.long)\n",
    "out = attnops.attention(q, k, v, causal=True, dropout_p=0.1)": _QKV + "g = torch.Generator().manual_seed(0)\n",
    "cu = torch.tensor([0, 300, 301, 1024]": _QKV + """
q1, k1, v1 = torch.randn(1024, 8, 64), torch.randn(1024, 2, 64), torch.randn(1024, 2, 64)
ids = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 1, 723]))[None]
x = torch.randn(1, 1024, 4, 32)
""",
    "mha = attnops.nn.MultiheadAttention(512, 8": """
from transformers import AutoModelForCausalLM, LlamaConfig
torch_mha = torch.nn.MultiheadAttention(512, 8, batch_first=True)
model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(512, 8, batch_first=True), 2)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
""",
    "out, block_map = attnops.attention(q, k, v, causal=True, return_block_map=True)": _QKV + """
model = torch.nn.Sequential(attnops.nn.Attention(64, 4), attnops.nn.Attention(64, 4))
tokens = torch.randn(1, 128, 64)
""",
    "out = attnops.moba_attention(q, k, v, block_size=512": _QKV,
    "out, max_scores = attnops.attention(q, k, v, causal=True, return_max_scores=True)": _QKV + """
model = torch.nn.Sequential(attnops.nn.Attention(64, 4), attnops.nn.Attention(64, 4))
tokens = torch.randn(1, 128, 64)
""",
    "out, state = attnops.aaren(query, k, v, output_final_state=True)": _QKV + """
query = torch.randn(8, 64); k_new, v_new = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64)
x = torch.randn(1, 100, 512)
""",
    "out = attnops.flow_attention(q, k, v, causal=True)": _QKV,
    "out = attnops.lln_attention(q, k, v, causal=True, diag=True)": _QKV,
    "model = attnops.integrations.transformers.linearize(model)": """
from transformers import AutoModelForCausalLM, LlamaConfig
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=1, num_attention_heads=4))
""",
    "out = attnops.regla_attention(q, k, v, gate_logits, refine_logits)": _QKV + """
gate_logits, refine_logits = torch.randn(1, 1024, 8, 64), torch.randn(1, 1024, 8, 64)
x = torch.randn(1, 100, 512)
""",
    "out = attnops.routing_attention(q, k, v, centroids, causal=True)": _QKV + """
centroids = torch.nn.functional.normalize(torch.randn(2, 32, 64), dim=-1)
""",
    "w = attnops.ops.moh.query_norm_heads(q, num_shared_heads=4, top_k=2)": _QKV + """
x = torch.randn(1, 100, 512); task_loss = torch.zeros(())
""",
    "out = attnops.agent_attention(q, k, v, num_agents=49)": _QKV + """
a = torch.randn(1, 49, 8, 64); b_ak = torch.randn(1, 8, 49, 1024) * 0.1; b_qa = torch.randn(8, 1024, 49) * 0.1
""",
    "out = attnops.linear_attention(q, k, v)": _QKV + """
log_g = torch.nn.functional.logsigmoid(torch.randn(1, 1024, 8)); n = 600
x = torch.randn(1, 64, 1024); x_next = torch.randn(1, 1, 1024)
""",
    "import torch.distributed as dist": _QKV + """
import socket, torch.distributed
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0)); _port = _s.getsockname()[1]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port}", rank=0, world_size=1)
x = torch.randn(1, 1024, 512)
""",
    "proj = attnops.lowrank.calibrate(sample_keys": _QKV + """
sample_keys = torch.randn(2, 512, 2, 64)
k_new, v_new, q_new = torch.randn(1, 300, 2, 64), torch.randn(1, 300, 2, 64), torch.randn(1, 1, 8, 64)
model = torch.nn.Sequential(attnops.nn.Attention(128, 4, num_kv_heads=2))
batches = [torch.randn(1, 100, 128) for _ in range(2)]
""",
}


def _blocks():
    text = README.read_text()
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def _first_line(block: str) -> str:
    return block.strip().splitlines()[0]


def _setup_for(block: str):
    line = _first_line(block)
    for key, setup in SETUP.items():
        if line.startswith(key):
            return setup
    return None


def test_every_snippet_has_a_setup():
    missing = [_first_line(b) for b in _blocks() if _setup_for(b) is None]
    assert not missing, f"README snippets without a setup in tests/test_readme.py: {missing}"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_snippet_runs(index, tmp_path, monkeypatch):
    block = _blocks()[index]
    setup = _setup_for(block)
    if setup is None:
        pytest.fail(f"no setup for README snippet {_first_line(block)!r}")
    monkeypatch.chdir(tmp_path)  # snippets that write files (plots, saved projections) write here
    torch.manual_seed(0)
    namespace = {}
    try:
        exec(compile("import torch, attnops\n" + setup, "<setup>", "exec"), namespace)
        exec(compile(block, f"README.md snippet {index + 1}", "exec"), namespace)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the context-parallel snippet's single-rank group
