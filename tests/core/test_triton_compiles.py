"""Every Triton kernel compiles for a Hopper GPU (sm_90), on this CPU machine.

The kernel tests run under TRITON_INTERPRET=1, which executes the Python and accepts what the compiler
refuses (the first GPU run found ALiBi and the sinks failing to compile: tests/core/test_triton_globals.py).
Triton's compiler itself needs no GPU: the front end, the MLIR passes, LLVM's NVPTX backend and the ptxas
that Triton ships all run here. This test calls the public ops with the Triton backend on CPU tensors in a
subprocess where ``triton.jit`` is the compiler's JITFunction, with a driver that targets sm_90 and a
``run`` that compiles instead of launching (``warmup=True``): every launcher runs its own argument
handling, and every kernel it launches is compiled from the arguments it would have launched with, down
to the cubin. The outputs are never written (nothing runs), so nothing here checks values: the
interpreted tests do. Cases switch every constexpr flag on in one call and off in another, in bf16, f16
and f32, at head dims that pad (40, 96) and that do not; each kernel (every ``*_kernel`` jit function of
attnops) must compile at least once.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")



def _nvidia_backend() -> str:
    try:
        from triton.backends import backends

        return "" if "nvidia" in backends else "Triton was installed without its NVIDIA backend"
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"triton.backends: {e}"


@pytest.mark.skipif(bool(_nvidia_backend()), reason=_nvidia_backend() or "ok")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTNOPS_TRITON_AUTOTUNE="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n\n".join(f"{case}:\n{err}" for case, err in report["failures"].items())
    assert len(report["kernels"]) >= 16, report["kernels"]  # every family's kernels were found (16 when written)
    missing = set(report["kernels"]) - set(report["compiled"])
    assert not missing, f"never compiled (no case launches them): {sorted(missing)}"
    # the configuration a launch without autotuning takes must fit an H100's shared memory (227 KiB a block)
    too_big = {name: nbytes for name, nbytes in report["compiled"].items() if nbytes > 227 * 1024}
    assert not too_big, f"shared memory over 227 KiB: {too_big}"


# ---- the subprocess ----------------------------------------------------------------------------------

def _compile_only(target):
    """Makes every Triton launch compile for ``target`` and return without running; returns the list that
    ``(kernel name, shared memory bytes)`` of each compilation is appended to."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:  # what JITFunction.run asks of a driver, for a GPU that is not there
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

    driver.set_active(CompileOnlyDriver())
    compiled = []
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel.metadata.shared))
        return kernel

    JITFunction.run = run
    return compiled


def _triton_on_cpu_tensors():
    """The dispatcher's Triton backend for CPU tensors without the interpreter (the families import their
    Triton modules only where Triton can run)."""
    import importlib

    from attnops.core import backends, dispatch

    backends.TRITON, backends.TRITON_REASON = True, ""
    runs_on = dispatch._runs_on
    dispatch._runs_on = lambda name, device: name == "triton" or runs_on(name, device)
    for family in ("softmax", "routed", "lowrank", "decode", "linear"):
        importlib.import_module(f"attnops.ops.{family}.triton")


def _cases():
    import torch

    import attnops

    def leaves(*shapes, dtype):
        return [torch.randn(*s, dtype=dtype).requires_grad_(True) for s in shapes]

    def backward(out):
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    def softmax_all_on():  # every score modifier, a two-sided window, GQA, D=96 (padded to 128), bf16
        q, k, v = leaves((2, 200, 4, 96), (2, 200, 2, 96), (2, 200, 2, 96), dtype=torch.bfloat16)
        bias = torch.randn(1, 4, 200, 200, requires_grad=True)
        out, *_ = attnops.attention(q, k, v, window_size=(64, 16), softcap=5.0, alibi_slopes=torch.rand(4),
                                    sinks=torch.randn(4, requires_grad=True), attn_bias=bias, dropout_p=0.1,
                                    return_lse=True, return_max_scores=True, backend="triton")
        backward(out)

    def softmax_plain_f32():
        q, k, v = leaves(*[(1, 130, 2, 64)] * 3, dtype=torch.float32)
        backward(attnops.attention(q, k, v, backend="triton"))

    def softmax_wide_heads_f32():  # head dim 512 (Gemma 4's global layers) in float32, the largest tiles in bytes
        q, k, v = leaves((1, 130, 4, 512), (1, 130, 2, 512), (1, 130, 2, 512), dtype=torch.float32)
        backward(attnops.attention(q, k, v, causal=True, backend="triton"))

    def block_mask_and_map_f16():  # a LUT, a causal block mask, the block map, D=128, f16
        q, k, v = leaves(*[(1, 256, 2, 128)] * 3, dtype=torch.float16)
        mask = attnops.BlockMask.sliding_window(256, 96, block_size=64)
        res = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True, backend="triton")
        backward(res.out)

    def varlen_bf16():  # document bounds (segments) with dropout and a bool bias
        q, k, v = leaves(*[(150, 2, 40)] * 3, dtype=torch.bfloat16)
        cu = torch.tensor([0, 50, 150], dtype=torch.int32)
        out = attnops.varlen_attention(q, k, v, cu, cu, 100, 100, causal=True, dropout_p=0.2, backend="triton")
        backward(out)

    def decode_all_on():
        q = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16)
        kc, vc = (torch.randn(2, 300, 2, 128, dtype=torch.bfloat16) for _ in range(2))
        attnops.decode_attention(q, kc, vc, torch.tensor([300, 123], dtype=torch.int32), window_size=(100, 0),
                                 softcap=30.0, alibi_slopes=torch.rand(8), sinks=torch.randn(8), backend="triton")

    def decode_wide_heads_f32():  # head dim 320, padded to 512
        q = torch.randn(1, 2, 8, 320)
        kc, vc = (torch.randn(1, 100, 2, 320) for _ in range(2))
        attnops.decode_attention(q, kc, vc, torch.tensor([100], dtype=torch.int32), backend="triton")

    def decode_plain_f32():
        q = torch.randn(1, 3, 4, 64)
        kc, vc = (torch.randn(1, 100, 4, 64) for _ in range(2))
        attnops.decode_attention(q, kc, vc, torch.tensor([100], dtype=torch.int32), backend="triton")

    def decode_paged_bf16():  # a paged cache: the page table's loads
        q = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16)
        kc, vc = (torch.randn(12, 64, 2, 128, dtype=torch.bfloat16) for _ in range(2))
        table = torch.arange(10, dtype=torch.int32).view(2, 5)
        attnops.decode_attention(q, kc, vc, torch.tensor([300, 123], dtype=torch.int32), block_table=table,
                                 backend="triton")

    def moba_router_bf16():  # the router alone: its LUT is never written here (nothing runs), so the core
        q, k = (torch.randn(1, 512, 2, 64, dtype=torch.bfloat16) for _ in range(2))  # would refuse it
        attnops.moba_block_mask(q, k, block_size=128, topk=2, backend="triton")

    def lowrank_bf16():
        q, k, v = (torch.randn(1, 1, 4, 64, dtype=torch.bfloat16), *(torch.randn(1, 300, 4, 64, dtype=torch.bfloat16)
                                                                      for _ in range(2)))
        attnops.lowrank_key_attention(q, k, v, rank=16, topk=64, backend="triton")

    def linear_head_gates_bf16():
        q, k, v = leaves(*[(1, 130, 2, 64)] * 3, dtype=torch.bfloat16)
        gate = torch.nn.functional.logsigmoid(torch.randn(1, 130, 2))
        backward(attnops.linear_attention(q, k, v, gate=gate, normalize=True, backend="triton"))

    def linear_channel_gates_f32():
        q, k, v = leaves((1, 100, 2, 32), (1, 100, 2, 32), (1, 100, 2, 48), dtype=torch.float32)
        gate = torch.nn.functional.logsigmoid(torch.randn(1, 100, 2, 32))
        backward(attnops.linear_attention(q, k, v, gate=gate, backend="triton"))

    def linear_recurrent_bf16():  # a few new tokens without gradients: the recurrent kernel
        q, k, v = (torch.randn(1, 4, 2, 64, dtype=torch.bfloat16) for _ in range(3))
        attnops.linear_attention(q, k, v, decay="retnet", backend="triton")

    return {name: fn for name, fn in locals().items() if callable(fn) and name not in ("leaves", "backward")}


def main():
    import traceback

    from triton.backends.compiler import GPUTarget

    compiled = _compile_only(GPUTarget("cuda", 90, 32))
    _triton_on_cpu_tensors()
    failures = {}
    for name, case in _cases().items():
        try:
            case()
        except Exception:  # noqa: BLE001 - every case is reported
            failures[name] = traceback.format_exc(limit=-4)
    shared = {}
    for name, nbytes in compiled:
        shared[name] = max(shared.get(name, 0), nbytes)
    # every kernel a launcher starts (named *_kernel; the helpers are inlined into them), found as
    # tests/core/test_triton_globals.py finds them: a new kernel that no case launches fails the test
    from test_triton_globals import _jit_functions

    kernels = sorted({name for _, name in _jit_functions() if name.endswith("_kernel")})
    print(json.dumps({"compiled": shared, "kernels": kernels, "failures": failures}))


if __name__ == "__main__":
    main()
