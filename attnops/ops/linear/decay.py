"""Fixed per-head decays of linear attention (RetNet, Lightning Attention): presets and checks. Data-
dependent gates are tensors the op merges with them into one log-gate."""

from __future__ import annotations

from typing import Optional

import torch


def _alibi_slopes(n: int) -> list:
    """ALiBi's head slopes (Press et al.), the decay rates of Lightning Attention / TransNormerLLM:
    a geometric sequence from ``2^(-8/n)`` for a power-of-two ``n``, interleaved otherwise."""
    def power_of_two(m: int) -> list:
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]

    if n & (n - 1) == 0:
        return power_of_two(n)
    closest = 1 << (n.bit_length() - 1)
    return power_of_two(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def decay_preset(name: str, num_heads: int, layer_idx: Optional[int] = None,
                 num_layers: Optional[int] = None) -> torch.Tensor:
    """Log-decays ``(H,)`` float64 of a named preset.

    - ``"retnet"``: ``log(1 - 2^(-5-h))``, RetNet's gamma per head.
    - ``"lightning"``: ``-slope_h`` with ALiBi's slopes, as the official Lightning Attention reference
      (``lambda = exp(-s)``, one set of rates for every layer).
    - ``"lightning"`` with ``layer_idx`` and ``num_layers``: flash-linear-attention's per-layer rates
      (``fla/ops/lightning_attn/chunk.py``, ``chunk_lightning_attn``): ``-(8 / H) * (1 - layer_idx / num_layers) * h``
      for ``h = 0 .. H-1`` (head 0 does not decay; later layers decay less). Pass the tensor as ``decay=``.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("layer_idx and num_layers go together (the per-layer Lightning preset)")
    if layer_idx is not None:
        if name != "lightning":
            raise ValueError(f"layer_idx / num_layers apply to the 'lightning' preset only, not {name!r}")
        for arg, value in (("layer_idx", layer_idx), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{arg} must be an int, got {value!r}")
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers), got {layer_idx} of {num_layers}")
        return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h
    if name == "retnet":
        return torch.log1p(-torch.exp2(-5.0 - h))
    if name == "lightning":
        return -torch.tensor(_alibi_slopes(num_heads), dtype=torch.float64)
    raise ValueError(f"decay must be a (H,) tensor of log-decays or one of 'retnet', 'lightning'; got {name!r}")


def check_nonpositive(name: str, t: torch.Tensor) -> None:
    # Reading values on a GPU would synchronise every call: checked on the CPU only (as cache_seqlens),
    # and not inside a compiled graph (a data-dependent branch is a graph break).
    if torch.compiler.is_compiling():
        return
    if t.device.type == "cpu" and t.numel() and bool((t > 0).any()):
        raise ValueError(f"{name} holds log-decays, which must be <= 0 (a decay factor exp(x) <= 1); "
                         f"got a maximum of {float(t.max()):.4g}")


def resolve_decay(decay, num_heads: int, device=None) -> Optional[torch.Tensor]:
    """``decay`` (None, a preset name or a ``(H,)`` tensor of log-decays <= 0) as a ``(H,)`` tensor or
    None; a tensor on another device than ``device`` (when given) is an error."""
    if decay is None:
        return None
    if isinstance(decay, str):
        return decay_preset(decay, num_heads)
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay must be None, a preset name or a (H,) tensor, got {type(decay).__name__}")
    if decay.shape != (num_heads,) or not decay.is_floating_point():
        raise ValueError(f"decay must be a float tensor of shape ({num_heads},) (one log-decay per head), got "
                         f"{decay.dtype} {tuple(decay.shape)}")
    if device is not None and decay.device != device:
        raise ValueError(f"decay is on {decay.device} but q is on {device}")
    check_nonpositive("decay", decay)
    return decay
