"""Baseline and extra providers for attention-shaped cases (inputs ``(q, k, v)``, ``(B, S, H, D)``).

Baseline: FlashAttention, i.e. ``flash_attn.flash_attn_func`` when importable; else torch SDPA
forced to its flash backend on CUDA; on CPU, torch SDPA (its CPU flash kernel). Extras where they
apply: FlexAttention (compiled, the same block mask) and xformers ``memory_efficient_attention``
(when it has an operator for the device). Each factory returns ``(provider, note)``, the provider
``None`` with the reason in ``note`` when it cannot run here.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch

from attnops.bench.registry import Provider
from attnops.core.masks import BlockMask


def _bhsd(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad)


def _bhsd_inputs(inputs, requires_grad: bool):
    return tuple(_bhsd(t, requires_grad) for t in inputs)


def with_backward(p: Provider) -> Provider:
    """Times forward + backward (gradients of every input, a fixed random upstream gradient)."""

    def prepare(inputs):
        return {"inner": p.prepare(inputs), "dout": None}

    def run(state):
        out = p.run(state["inner"])
        if state["dout"] is None:  # first (warm-up) call
            state["dout"] = torch.randn_like(out)
        torch.autograd.grad(out, p.grad_inputs(state["inner"]), state["dout"])
        return out

    return Provider(name=p.name, run=run, prepare=prepare, output=lambda st, r: p.output(st["inner"], r),
                    same_function=p.same_function, grad_inputs=lambda st: p.grad_inputs(st["inner"]))


def flash_attn_provider(causal: bool, window: Tuple[int, int], device: str, needs_grad: bool
                        ) -> Tuple[Optional[Provider], str]:
    if not device.startswith("cuda"):
        return None, "flash_attn: GPU only"
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None, "flash_attn not importable"

    def prepare(inputs):
        return tuple(t.detach().clone().requires_grad_(needs_grad) for t in inputs)

    return Provider(
        name="flash_attn",
        prepare=prepare,
        run=lambda st: flash_attn_func(*st, causal=causal, window_size=window),
        grad_inputs=lambda st: st,
    ), ""


def sdpa_provider(causal: bool, device: str, needs_grad: bool, same_function: bool,
                  attn_mask: Optional[torch.Tensor] = None) -> Tuple[Provider, str]:
    """torch SDPA; forced to the flash backend on CUDA (it then refuses what FA2 would refuse). With
    ``attn_mask`` (SDPA's convention), whatever backend SDPA picks for a mask (flash takes none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = (functools.partial(sdpa_kernel, [SDPBackend.FLASH_ATTENTION])
           if device.startswith("cuda") and attn_mask is None else contextlib.nullcontext)

    def run(st):
        q, k, v = st
        mask, is_causal = attn_mask, causal
        if causal and mask is None and q.shape[-2] != k.shape[-2]:
            # SDPA's is_causal is aligned top-left, attnops' (flash_attn >= 2.1) bottom-right: one query then sees
            # every key, several get the lower-right bias
            is_causal = False
            if q.shape[-2] > 1:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(q.shape[-2], k.shape[-2])
        with ctx():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])

    name = ("sdpa_flash" if device.startswith("cuda") else "sdpa") if attn_mask is None else "sdpa (mask)"
    return Provider(
        name=name,
        prepare=lambda inputs: _bhsd_inputs(inputs, needs_grad),
        run=run,
        output=lambda st, out: out.transpose(1, 2),
        same_function=same_function,
        grad_inputs=lambda st: st,
    ), ""


def flex_provider(mask: Optional[BlockMask], causal: bool, window: Tuple[int, int], shape: dict, device: str,
                  needs_grad: bool) -> Tuple[Optional[Provider], str]:
    """FlexAttention compiled, with a flex block mask holding exactly our blocks and predicates."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, f"flex_attention unavailable: {e}"
    Sq, Sk = shape["Sq"], shape["Sk"]
    left, right = window
    if causal:
        right = 0
    offset = Sk - Sq
    if mask is None and left < 0 and right < 0:
        flex_mask = None
    else:
        if mask is not None:
            blocks = mask.to_dense().to(device)
            bq, bk = mask.block_size
            batched, per_head = blocks.shape[0] > 1, blocks.shape[1] > 1
        block_size = mask.block_size if mask is not None else (128, 128)

        def mask_mod(b, h, qi, ki):
            keep = qi >= 0
            if mask is not None:
                keep = keep & blocks[b if batched else 0, h if per_head else 0, qi // bq, ki // bk]
            if right >= 0:
                keep = keep & (ki <= qi + offset + right)
            if left >= 0:
                keep = keep & (ki >= qi + offset - left)
            return keep

        Bm = shape["B"] if mask is not None and batched else None
        Hm = shape["H"] if mask is not None and per_head else None
        try:
            flex_mask = create_block_mask(mask_mod, Bm, Hm, Sq, Sk, device=device, BLOCK_SIZE=block_size)
        except Exception as e:  # noqa: BLE001 - report any failure as a missing column
            return None, f"flex create_block_mask failed: {type(e).__name__}: {e}"
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(st):
        q, k, v = st
        return compiled(q, k, v, block_mask=flex_mask, enable_gqa=q.shape[1] != k.shape[1])

    return Provider(
        name="flex",
        prepare=lambda inputs: _bhsd_inputs(inputs, needs_grad),
        run=run,
        output=lambda st, out: out.transpose(1, 2),
        grad_inputs=lambda st: st,
    ), ""


def xformers_provider(causal: bool, device: str, needs_grad: bool, shape: dict) -> Tuple[Optional[Provider], str]:
    try:
        import xformers.ops as xops
    except ImportError:
        return None, "xformers not importable"
    if not device.startswith("cuda"):
        return None, "xformers: no memory_efficient_attention operator for CPU"
    bias = xops.LowerTriangularFromBottomRightMask() if causal else None
    group = shape["H"] // shape["Hkv"]

    def prepare(inputs):
        q, k, v = (t.detach().clone().requires_grad_(needs_grad) for t in inputs)
        return q, k, v

    def run(st):
        q, k, v = st
        if group > 1:  # xformers wants (B, S, G, Hkv, D) for grouped heads
            B, S, H, D = q.shape
            q5 = q.view(B, S, shape["Hkv"], group, D).transpose(2, 3)
            k5 = k.unsqueeze(2).expand(-1, -1, group, -1, -1)
            v5 = v.unsqueeze(2).expand(-1, -1, group, -1, -1)
            return xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias).transpose(2, 3).reshape(B, S, H, D)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    return Provider(name="xformers", prepare=prepare, run=run, grad_inputs=lambda st: st), ""
