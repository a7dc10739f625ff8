"""Registered operators validate their own arguments: users and torch.compile call
``torch.ops.attnops.*`` directly, past the Python ops' checks. Every bad argument below must give a
Python exception, never a signal (SIGSEGV, SIGFPE), an unwritten output or an out-of-bounds read.

The calls run in a child process (a crash would take the test runner with it); the child reports
each case as it finishes, so a crash names the case that caused it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import INTERPRET, TRITON

# The child: builds valid arguments per operator, then calls it once per case with one argument
# spoiled. Each case prints "<name>\t<exception type>\t<message>" or "<name>\tNO ERROR".
CHILD = textwrap.dedent(r'''
    import sys, torch
    import attnops
    from attnops import BlockMask

    WITH_TRITON = sys.argv[1] == "1"
    torch.manual_seed(0)
    B, S, H, HKV, D = 1, 128, 4, 2, 32

    def qkv(hkv=HKV, d=D, dtype=torch.float32, s=S, h=H):
        return (torch.randn(B, s, h, d, dtype=dtype), torch.randn(B, s, hkv, d, dtype=dtype),
                torch.randn(B, s, hkv, d, dtype=dtype))

    MASK = BlockMask.causal(S, 64)
    LUT = dict(kv_num_blocks=MASK.kv_num_blocks, kv_indices=MASK.kv_indices,
               q_num_blocks=MASK.q_num_blocks, q_indices=MASK.q_indices)
    I32 = dict(dtype=torch.int32)

    FWD_ORDER = ["q", "k", "v", "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices", "block_q", "block_k",
                 "softmax_scale", "causal", "window_left", "window_right", "map_rows", "map_cols", "map_max", "softcap",
                 "alibi_slopes", "sinks", "attn_bias", "dropout_p", "dropout_seed", "key_bounds", "query_bounds",
                 "alibi_offsets"]
    # segment bounds (attnops.core.segments): two documents of 50 and 78 tokens
    KB = torch.tensor([[0, 50]] * 50 + [[50, S]] * (S - 50), dtype=torch.int32).unsqueeze(0)

    def fwd_args(**over):
        q, k, v = qkv()
        a = dict(q=q, k=k, v=v, **LUT, block_q=64, block_k=64, softmax_scale=0.2, causal=True, window_left=-1,
                 window_right=-1, map_rows=0, map_cols=0, map_max=False, softcap=0.0, alibi_slopes=None, sinks=None,
                 attn_bias=None, dropout_p=0.0, dropout_seed=None, key_bounds=KB, query_bounds=KB, alibi_offsets=None)
        a.update(over)
        return [a[n] for n in FWD_ORDER]

    def bwd_args(**over):
        q, k, v = qkv()
        a = dict(dout=torch.randn_like(q), dlse=None, q=q, k=k, v=v, out=torch.randn_like(q),
                 lse=torch.randn(B, H, S), **LUT, block_q=64, block_k=64, softmax_scale=0.2, causal=True,
                 window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, attn_bias=None, bias_grad=False,
                 dropout_p=0.0, dropout_seed=None, key_bounds=KB, query_bounds=KB, alibi_offsets=None)
        a.update(over)
        order = ["dout", "dlse", "q", "k", "v", "out", "lse"] + FWD_ORDER[3:13] + ["softcap", "alibi_slopes",
                                                                                  "attn_bias", "bias_grad", "dropout_p",
                                                                                  "dropout_seed", "key_bounds",
                                                                                  "query_bounds", "alibi_offsets"]
        return [a[n] for n in order]

    def dec_args(**over):
        q = torch.randn(B, 2, H, D)
        k, v = torch.randn(B, S, HKV, D), torch.randn(B, S, HKV, D)
        a = dict(q=q, k=k, v=v, lens=torch.tensor([100], dtype=torch.int32), keep=None, block_q=64, block_k=64,
                 softmax_scale=0.2, window_left=-1, num_splits=0, map_cols=0, map_max=False, softcap=0.0,
                 alibi_slopes=None)
        a.update(over)
        return [a[n] for n in ["q", "k", "v", "lens", "keep", "block_q", "block_k", "softmax_scale", "window_left",
                               "num_splits", "map_cols", "map_max", "softcap", "alibi_slopes"]]

    def low_args(**over):
        q, k, v = qkv()
        a = dict(q=q, k=k, v=v, qs=q[..., :8], ks=k[..., :8], lens=None, topk=16, local=4, causal=True,
                 softmax_scale=0.2, return_indices=False)
        a.update(over)
        return [a[n] for n in ["q", "k", "v", "qs", "ks", "lens", "topk", "local", "causal", "softmax_scale",
                               "return_indices"]]

    def route_args(**over):
        q, k, _ = qkv()
        a = dict(q=q, k=k, block_size=64, topk=2, causal=True, route_block=64)
        a.update(over)
        return [a[n] for n in ["q", "k", "block_size", "topk", "causal", "route_block"]]

    def select_args(**over):
        a = dict(gate=torch.randn(2, S, -(-S // 64)), block_size=64, topk=2, causal=True, width=1)
        a.update(over)
        return [a[n] for n in ["gate", "block_size", "topk", "causal", "width"]]

    def pairs_args(**over):
        a = dict(chosen=torch.randint(-1, 2, (2, S, 2), dtype=torch.int32), start=torch.tensor([0, 64]),
                 end=torch.tensor([64, S]), group=2)
        a.update(over)
        return [a[n] for n in ["chosen", "start", "end", "group"]]

    def merge_args(**over):
        a = dict(out=torch.randn(S, H, D), own=torch.rand(2 * S), pair=torch.randn(5, D), scale=torch.rand(5),
                 row=torch.randint(0, 2 * S, (5,)), start=1, heads=2)
        a.update(over)
        return [a[n] for n in ["out", "own", "pair", "scale", "row", "start", "heads"]]

    hkv0 = qkv(hkv=0)
    counts = MASK.kv_num_blocks
    idx = MASK.kv_indices
    FWD = {
        "Hkv = 0": dict(k=hkv0[1], v=hkv0[2]),
        "block_q = 0": dict(block_q=0),
        "block_k = 0": dict(block_k=0),
        "block_q < 0": dict(block_q=-64),
        "LUT rows fewer than Nq": dict(kv_num_blocks=counts[:, :, :1].contiguous(), kv_indices=idx[:, :, :1].contiguous()),
        "LUT heads do not match q's": dict(kv_num_blocks=counts.expand(1, 3, -1).contiguous(),
                                           kv_indices=idx.expand(1, 3, -1, -1).contiguous()),
        "LUT batch does not match q's": dict(kv_num_blocks=counts.expand(2, 1, -1).contiguous(),
                                             kv_indices=idx.expand(2, 1, -1, -1).contiguous()),
        "counts > width": dict(kv_num_blocks=torch.full_like(counts, 5)),
        "counts < 0": dict(kv_num_blocks=torch.full_like(counts, -1)),
        "index >= Nk": dict(kv_indices=torch.full_like(idx, 100)),
        "index < 0": dict(kv_indices=torch.full_like(idx, -7)),
        "indices not ascending": dict(kv_indices=idx.flip(-1).contiguous()),
        "indices shape misfits counts": dict(kv_indices=idx[:, :, :1].contiguous()),
        "LUT int64": dict(kv_num_blocks=counts.long(), kv_indices=idx.long()),
        "counts without indices": dict(kv_indices=None),
        "indices 3-d": dict(kv_indices=idx[..., 0].contiguous()),
        "transposed LUT too short": dict(q_num_blocks=MASK.q_num_blocks[:, :, :1].contiguous(),
                                         q_indices=MASK.q_indices[:, :, :1].contiguous()),
        "window_left < -1": dict(window_left=-5),
        "window_right < -1": dict(window_right=-5),
        "q rank 3": dict(q=torch.randn(S, H, D)),
        "head dim 520": dict(**dict(zip("qkv", qkv(d=520)))),
        "q/k dtypes differ": dict(k=torch.randn(B, S, HKV, D, dtype=torch.float64)),
        "integer q": dict(**dict(zip("qkv", (t.long() for t in qkv())))),
        "batch mismatch": dict(k=torch.randn(2, S, HKV, D), v=torch.randn(2, S, HKV, D)),
        "heads not divisible": dict(q=torch.randn(B, S, 3, D)),
        "map_rows does not divide the tile": dict(map_rows=3, map_cols=16),
        "map_cols = 0 with a map": dict(map_rows=16, map_cols=0),
        "map_rows < 0": dict(map_rows=-16, map_cols=16),
        "NaN softmax_scale": dict(softmax_scale=float("nan")),
        "softcap < 0": dict(softcap=-1.0),
        "softcap inf": dict(softcap=float("inf")),
        "alibi_slopes (H + 1,)": dict(alibi_slopes=torch.rand(H + 1)),
        "alibi_slopes (B + 1, H)": dict(alibi_slopes=torch.rand(B + 1, H)),
        "alibi_slopes integer": dict(alibi_slopes=torch.ones(H, dtype=torch.int32)),
        "sinks (Hkv,)": dict(sinks=torch.randn(HKV)),
        "sinks (1, H)": dict(sinks=torch.randn(1, H)),
        "sinks integer": dict(sinks=torch.ones(H, dtype=torch.int64)),
        "attn_bias keys short": dict(attn_bias=torch.zeros(1, 1, S, S - 1)),
        "attn_bias 3-d": dict(attn_bias=torch.zeros(1, S, S)),
        "attn_bias heads misfit": dict(attn_bias=torch.zeros(1, 3, S, S)),
        "attn_bias integer": dict(attn_bias=torch.ones(1, 1, S, S, dtype=torch.int32)),  # bool is a mask: taken
        "key_bounds not monotone": dict(key_bounds=KB.flip(1).contiguous()),
        "key_bounds hi > Sk": dict(key_bounds=(KB + 1).contiguous()),
        "key_bounds lo > hi": dict(key_bounds=KB.flip(2).contiguous()),
        "key_bounds negative": dict(key_bounds=(KB - 60).contiguous()),
        "key_bounds int64": dict(key_bounds=KB.long()),
        "key_bounds rows misfit": dict(key_bounds=KB[:, :-1].contiguous()),
        "key_bounds batch misfit": dict(key_bounds=KB.expand(3, -1, -1).contiguous()),
        "query_bounds without key_bounds": dict(key_bounds=None),
        # ALiBi's per-query offsets (varlen layouts)
        "alibi_offsets without alibi_slopes": dict(alibi_offsets=torch.zeros(S, **I32)),
        "alibi_offsets int64": dict(alibi_slopes=torch.rand(H), alibi_offsets=torch.zeros(S, dtype=torch.long)),
        "alibi_offsets rows misfit": dict(alibi_slopes=torch.rand(H), alibi_offsets=torch.zeros(S - 1, **I32)),
        "alibi_offsets without bounds": dict(alibi_slopes=torch.rand(H), alibi_offsets=torch.zeros(S, **I32),
                                             key_bounds=None, query_bounds=None),
    }
    BWD = {
        "lse shape": dict(lse=torch.randn(B, H, 3)),
        "lse dtype": dict(lse=torch.randn(B, H, S, dtype=torch.float16)),
        "dlse shape": dict(dlse=torch.randn(B, H, 3)),
        "out shape": dict(out=torch.randn(B, 3, H, D)),
        "out dtype": dict(out=torch.randn(B, S, H, D, dtype=torch.float64)),
        "dout shape": dict(dout=torch.randn(B, S, H, 3)),
        "no transposed LUT": dict(q_num_blocks=None, q_indices=None),
        "transposed LUT too short": dict(q_num_blocks=MASK.q_num_blocks[:, :, :1].contiguous(),
                                         q_indices=MASK.q_indices[:, :, :1].contiguous()),
        "transposed counts > width": dict(q_num_blocks=torch.full_like(MASK.q_num_blocks, 50)),
        "transposed index >= Nq": dict(q_indices=torch.full_like(MASK.q_indices, 9)),
        "Hkv = 0": dict(k=hkv0[1], v=hkv0[2]),
        "block_k = 0": dict(block_k=0),
        "softcap < 0": dict(softcap=-2.0),
        "alibi_slopes 3-d": dict(alibi_slopes=torch.rand(1, 1, H)),
        "bias_grad without attn_bias": dict(bias_grad=True),
        "bias_grad of a bool mask": dict(bias_grad=True, attn_bias=torch.ones(1, 1, S, S, dtype=torch.bool)),
        "attn_bias queries misfit": dict(attn_bias=torch.zeros(1, 1, 3, S)),
        "key_bounds without query_bounds": dict(query_bounds=None),
        "query_bounds not monotone": dict(query_bounds=KB.flip(1).contiguous()),
        "query_bounds hi > Sq": dict(query_bounds=(KB + 3).contiguous()),
        "alibi_offsets 2-d": dict(alibi_slopes=torch.rand(H), alibi_offsets=torch.zeros(1, S, **I32)),
        "alibi_offsets without alibi_slopes": dict(alibi_offsets=torch.zeros(S, **I32)),
    }
    DEC = {
        "Hkv = 0": dict(k=torch.randn(B, S, 0, D), v=torch.randn(B, S, 0, D)),
        "block_keep 3-d": dict(keep=torch.ones(1, 1, 2, dtype=torch.uint8)),
        "block_keep too few key blocks": dict(keep=torch.ones(1, 1, 1, 1, dtype=torch.uint8)),
        "block_keep heads misfit": dict(keep=torch.ones(1, 3, 1, 2, dtype=torch.uint8)),
        "block_keep with block_k = 0": dict(keep=torch.ones(1, 1, 1, 2, dtype=torch.uint8), block_k=0),
        "block_keep float": dict(keep=torch.ones(1, 1, 1, 2)),
        "k dtype differs from q": dict(k=torch.randn(B, S, HKV, D, dtype=torch.float16)),
        "v dtype differs from q": dict(v=torch.randn(B, S, HKV, D, dtype=torch.bfloat16)),
        "seqlens beyond int32": dict(lens=torch.tensor([2 ** 32 + 5])),
        "seqlens > S_max": dict(lens=torch.tensor([S + 1])),
        "seqlens < 0": dict(lens=torch.tensor([-3])),
        "seqlens float": dict(lens=torch.tensor([5.0])),
        "seqlens shape": dict(lens=torch.tensor([5, 5])),
        "num_splits < 0": dict(num_splits=-2),
        "window_left < -1": dict(window_left=-3),
        "map_cols < 0": dict(map_cols=-64),
        "head dim 520": dict(q=torch.randn(B, 2, H, 520), k=torch.randn(B, S, HKV, 520), v=torch.randn(B, S, HKV, 520)),
        "q rank 3": dict(q=torch.randn(2, H, D)),
        "softcap NaN": dict(softcap=float("nan")),
        "alibi_slopes (2 * H,)": dict(alibi_slopes=torch.rand(2 * H)),
    }
    LOW = {
        "Hkv = 0": dict(k=hkv0[1], v=hkv0[2], ks=hkv0[1][..., :8]),
        "seqlens beyond int32": dict(lens=torch.tensor([2 ** 32 + 5])),
        "seqlens < 0": dict(lens=torch.tensor([-1])),
        "seqlens float": dict(lens=torch.tensor([5.0])),
        "topk = 0": dict(topk=0),
        "local > topk": dict(local=20),
        "score rank above D": dict(qs=torch.randn(B, S, H, 40), ks=torch.randn(B, S, HKV, 40)),
        "score dtypes differ": dict(ks=torch.randn(B, S, HKV, 8, dtype=torch.float16)),
        "k dtype differs": dict(k=torch.randn(B, S, HKV, D, dtype=torch.float64)),
    }
    ROUTE = {
        "k dtype differs": dict(k=torch.randn(B, S, HKV, D, dtype=torch.float16)),
        "k integer": dict(k=torch.randint(0, 3, (B, S, HKV, D))),
        "Hkv = 0": dict(k=hkv0[1]),
        "block_size = 0": dict(block_size=0),
        "route_block = 0": dict(route_block=0),
        "block_size not a multiple of route_block": dict(block_size=96),
        "topk = 0": dict(topk=0),
        "q rank 3": dict(q=torch.randn(S, H, D)),
        "sequence lengths differ": dict(k=torch.randn(B, 64, HKV, D)),
    }

    SELECT = {
        "gate float64": dict(gate=torch.randn(2, S, 2, dtype=torch.float64)),
        "gate rank 2": dict(gate=torch.randn(S, 2)),
        "blocks do not fit": dict(gate=torch.randn(2, S, 3)),
        "block_size = 0": dict(block_size=0),
        "topk = 1": dict(topk=1),
        "width too small": dict(topk=3, width=0),
    }
    PAIRS = {
        "chosen int64": dict(chosen=torch.zeros(2, S, 2, dtype=torch.int64)),
        "chosen rank 2": dict(chosen=torch.zeros(S, 2, dtype=torch.int32)),
        "block index >= blocks": dict(chosen=torch.full((2, S, 2), 2, dtype=torch.int32)),
        "block_start int32": dict(start=torch.tensor([0, 64], dtype=torch.int32)),
        "block_end shorter": dict(end=torch.tensor([64])),
        "block beyond the tokens": dict(end=torch.tensor([64, S + 1])),
        "blocks out of order": dict(start=torch.tensor([64, 0]), end=torch.tensor([S, 64])),
        "block start > end": dict(start=torch.tensor([0, 70]), end=torch.tensor([64, 66])),
        "heads not a multiple of group": dict(group=3),
        "group = 0": dict(group=0),
    }
    MERGE = {
        "out int32": dict(out=torch.randint(0, 4, (S, H, D), dtype=torch.int32)),
        "own float64 for a bfloat16 out": dict(out=torch.randn(S, H, D, dtype=torch.bfloat16),
                                               own=torch.rand(2 * S, dtype=torch.float64)),
        "out not contiguous": dict(out=torch.randn(H, S, D).transpose(0, 1)),
        "out rank 2": dict(out=torch.randn(S, D)),
        "heads beyond out": dict(start=3),
        "heads = 0": dict(heads=0),
        "own too short": dict(own=torch.rand(S)),
        "own dtype": dict(own=torch.rand(2 * S, dtype=torch.float64)),
        "pair width": dict(pair=torch.randn(5, D + 1)),
        "pair integer": dict(pair=torch.ones(5, D, dtype=torch.int32)),
        "scale length": dict(scale=torch.rand(4)),
        "row int32": dict(row=torch.zeros(5, dtype=torch.int32)),
        "row beyond the rows": dict(row=torch.full((5,), 2 * S)),
        "row negative": dict(row=torch.full((5,), -1)),
    }

    ops = torch.ops.attnops
    groups = [("block_sparse_attn_fwd", FWD, fwd_args), ("block_sparse_attn_bwd", BWD, bwd_args),
              ("decode_attn_fwd", DEC, dec_args), ("lowrank_attn_fwd", LOW, low_args), ("moba_route", ROUTE, route_args),
              ("moba_token_select", SELECT, select_args), ("moba_token_pairs", PAIRS, pairs_args),
              ("moba_token_merge", MERGE, merge_args)]
    for op_name, cases, build in groups:
        names = [op_name] + ([op_name + "_triton"] if WITH_TRITON and not op_name.startswith("moba_token") else [])
        for name in names:
            op = getattr(ops, name)
            for case, over in cases.items():
                if name == "decode_attn_fwd_triton" and "map_cols" in over:
                    continue  # the Triton decode operator has no fused-map arguments
                label = f"{name}: {case}"
                print(label, end="\t", flush=True)
                try:
                    args = build(**over)
                    if name == "decode_attn_fwd_triton":
                        args = args[:10] + args[12:]  # no fused-map arguments
                    op(*args)
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    print(f"{type(e).__name__}\t{msg[:200]}", flush=True)
                else:
                    print("NO ERROR", flush=True)
''')

ACCEPTED = ("RuntimeError", "ValueError", "TypeError", "IndexError", "NotImplementedError")


def _run_child():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with_triton = "1" if TRITON and INTERPRET else "0"
    return subprocess.run([sys.executable, "-c", CHILD, with_triton], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)


@pytest.fixture(scope="module")
def child_result():
    return _run_child()


def test_no_operator_call_crashes_the_process(child_result):
    lines = [ln for ln in child_result.stdout.splitlines() if ln.strip()]
    last = lines[-1].split("\t")[0] if lines else "(before the first case)"
    assert child_result.returncode == 0, (
        f"the child process died (return code {child_result.returncode}) in case {last!r}\n"
        f"stderr tail:\n{child_result.stderr[-3000:]}")


def test_every_bad_argument_raises_a_python_exception(child_result):
    lines = [ln.split("\t") for ln in child_result.stdout.splitlines() if ln.strip()]
    assert len(lines) > 60, child_result.stdout[-2000:] + child_result.stderr[-3000:]
    silent = [ln[0] for ln in lines if len(ln) < 2 or ln[1] == "NO ERROR"]
    odd = [f"{ln[0]}: {ln[1]}" for ln in lines if len(ln) >= 2 and ln[1] != "NO ERROR" and ln[1] not in ACCEPTED]
    assert not silent, "no error for: " + "; ".join(silent)
    assert not odd, "unexpected exception types: " + "; ".join(odd)
    # the operator's own check said it (named), not some later failure that happened to raise
    unnamed = [f"{ln[0]}: {ln[2] if len(ln) > 2 else ''}" for ln in lines
               if len(ln) >= 2 and ln[1] != "NO ERROR" and not (len(ln) > 2 and ln[2].startswith(ln[0].split(":")[0]))]
    assert not unnamed, "errors not raised by the operator's checks: " + "; ".join(unnamed)
