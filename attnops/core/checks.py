"""Input validation shared by the ops: run once, in the op, before any kernel (kernels trust it)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from attnops.core.masks import BlockMask

MAX_HEAD_DIM = 512
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


class QKVShape(NamedTuple):
    batch: int
    seq_len_q: int
    seq_len_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def autocast_inputs(*tensors):
    """Under ``torch.autocast``, floating inputs in the autocast dtype of their device (the lower precision
    SDPA runs in there); unchanged otherwise. Mixed-dtype q / k / v then meet the kernels in one dtype, as
    they do in SDPA."""
    if not torch._C._is_any_autocast_enabled():  # the common case, answered in 0.1 us
        return tensors
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or first.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def check_tensor(name: str, t, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; attnops supports float16, bfloat16, float32 and float64")


def check_qkv_tensors(q, k, v) -> None:
    """q, k, v are 4-d tensors of one supported dtype on one device."""
    # The common case in one expression, about half the time of the steps below (a call at S = 16 is ~50 us);
    # they diagnose whatever it refuses.
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) \
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in _SUPPORTED \
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device:
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_qkv(q, k, v, max_head_dim: int = MAX_HEAD_DIM) -> QKVShape:
    """Checks the flash_attn layout ``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)``, ``H % Hkv == 0``."""
    check_qkv_tensors(q, k, v)
    B, Sq, H, D = q.shape
    k_shape = k.shape  # each .shape read builds a torch.Size
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    Bk, Sk, Hkv, Dk = k_shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: q has {D}, k/v have {Dk}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
    if not 1 <= D <= max_head_dim:
        raise ValueError(f"head dim {D} is not supported (1 <= D <= {max_head_dim})")
    return QKVShape(B, Sq, Sk, H, Hkv, D)


# Scores are exponentiated in float32 (half and bfloat16 inputs included) with the scale folded into
# q: a scale beyond this turns any |q . k| above ~5e28 into an overflowing score (NaN rows, where the
# float64 reference is finite), and no model has a use for one (temperatures are O(1) to O(100)).
MAX_SOFTMAX_SCALE = 2.0 ** 32


def resolve_softmax_scale(softmax_scale: Optional[float], head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, (torch.Tensor, bool)) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a Python number, got {softmax_scale!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if abs(softmax_scale) > MAX_SOFTMAX_SCALE:
        raise ValueError(f"|softmax_scale| must be <= 2**32 (scores are exponentiated in float32 and would "
                         f"overflow), got {softmax_scale}")
    return float(softmax_scale)


def check_causal(causal) -> bool:
    """``causal`` must be a bool: a number there is usually flash_attn's positional ``dropout_p``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}. attnops.attention's positional order is "
                        "(q, k, v, causal, softmax_scale, window_size); flash_attn's is (q, k, v, dropout_p, "
                        "softmax_scale, causal): pass causal= and softmax_scale= by keyword")
    return causal


def refuse_unsupported_ad(op: str, *tensors) -> None:
    """The ops have reverse-mode gradients through torch.autograd only. Their kernels are opaque to forward-mode
    AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``), which would otherwise see a zero
    tangent: a silent wrong derivative; and torch.func's reverse-mode transforms (``grad``, ``vjp``, ``jacrev``)
    cannot run their autograd registration (torch raises about ``setup_context`` deep inside). Both refused
    before any kernel runs, by name; ``torch.vmap`` runs (one call per sample)."""
    if torch.compiler.is_compiling():
        return
    # a tangent needs an open dual level (forward_ad.dual_level) or a torch.func transform (jvp / jacfwd)
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if fwAD._current_level < 0 and interpreter is None:
        return
    if interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Grad:
        raise NotImplementedError(
            f"attnops.{op} has no torch.func reverse-mode rule (torch.func.grad / vjp / jacrev); use "
            "loss.backward() or torch.autograd.grad")
    for t in tensors:
        if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"attnops.{op} has no forward-mode derivative (torch.func.jvp / jacfwd / torch.autograd.forward_ad "
                "gave a tangent to one of its inputs); use reverse mode: loss.backward() or torch.autograd.grad")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def clamp_window(window: Tuple[int, int], seq_len_q: int, seq_len_k: int) -> Tuple[int, int]:
    """A validated ``(left, right)`` window with sides wider than the sequences clamped to them (the
    same keys: ``left >= Sk`` and ``right >= Sq`` see everything), so that any Python int reaches
    the kernels as a small int64."""
    left, right = window
    return (left if left < 0 else min(left, seq_len_k), right if right < 0 else min(right, seq_len_q))


def check_score_mods(softcap, alibi_slopes, sinks, shape: QKVShape, device: torch.device) -> dict:
    """The score modifiers of the softmax ops (conventions.md), as keyword arguments for the dispatcher:
    ``softcap`` a number >= 0 (0: off), ``alibi_slopes`` a floating ``(H,)`` or ``(B, H)`` tensor (flash_attn's
    ALiBi; no gradient: refused when it requires one), ``sinks`` a floating ``(H,)`` tensor (learnable: its
    gradient flows). All on q's device."""
    if isinstance(softcap, (torch.Tensor, bool)) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a Python number, got {softcap!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap}")
    if alibi_slopes is None and sinks is None:
        return dict(softcap=float(softcap), alibi_slopes=None, sinks=None)
    H, B = shape.num_heads, shape.batch
    for name, t, shapes in (("alibi_slopes", alibi_slopes, ((H,), (B, H))), ("sinks", sinks, ((H,),))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t!r:.80}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on q's device ({device}), got {t.device}")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes has no gradient in attnops (flash_attn's ALiBi is fixed); pass "
                         "alibi_slopes.detach(), or a bias with its gradient as attn_bias")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float64 if alibi_slopes.dtype == torch.float64 else torch.float32)
    return dict(softcap=float(softcap), alibi_slopes=alibi_slopes, sinks=sinks)


def shared_alibi_slopes(alibi_slopes, rows: int):
    """Per-sequence slopes ``(rows, H)`` whose rows are all equal (a model's ``(H,)`` slopes expanded per sequence,
    the usual form) as their ``(H,)`` row, so that a packed batch, which has one set of slopes, can take them; anything
    else unchanged (another row count is the op's checks' to refuse). A host read of one comparison, where the caller
    reads the layout anyway."""
    if (isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() == 2 and alibi_slopes.shape[0] == rows > 0
            and bool((alibi_slopes == alibi_slopes[:1]).all())):
        return alibi_slopes[0]
    return alibi_slopes


def check_dropout(dropout_p, generator: Optional[torch.Generator], device: torch.device) -> dict:
    """Attention dropout, as keyword arguments for the dispatcher: ``dropout_p`` a Python number in [0, 1);
    when > 0, one int64 seed is drawn from ``generator`` (default: ``device``'s default generator), so the mask
    is a function of the generator's state at the call (``torch.manual_seed`` reproduces it) and the backward
    regenerates it from the seed. Nothing is drawn when ``dropout_p == 0``."""
    check_dropout_p(dropout_p, generator)
    if dropout_p == 0:
        return {}
    return {"dropout_p": float(dropout_p), "dropout_seed": draw_dropout_seed(generator, device)}


def check_dropout_p(dropout_p, generator: Optional[torch.Generator] = None) -> None:
    """``dropout_p`` a Python number in [0, 1), ``generator`` None or a torch.Generator (draws nothing)."""
    if isinstance(dropout_p, (torch.Tensor, bool)) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a Python number, got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def draw_dropout_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One int64 seed ``(1,)`` on ``device`` from ``generator`` (or the device's default generator): the one
    draw a dropout call makes."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attended) as the additive bias it stands for: 0 where True, -inf where False."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def check_attn_bias(attn_bias, shape: QKVShape, device: torch.device, dtype: torch.dtype, keep_bool: bool = False):
    """SDPA's ``attn_mask`` / an additive bias, as ``(bias, keep_blocks_of)``: ``attn_bias`` is a floating
    (added to the scores after the mask and ALiBi, differentiable) or bool (False: not attended) tensor
    broadcastable to ``(B, H, Sq, Sk)`` (fewer dims are leading 1s; each dim full or 1), on q's device.
    The kernels take a ``(B|1, H|1, Sq|1, Sk)`` float in lse's dtype; a bool mask becomes 0 / -inf (or stays
    bool with ``keep_bool``, for the caller to pass to a kernel that reads masks, see :func:`bias_for`), and
    ``keep_blocks_of(block_q, block_k)`` then gives its ``(B|1, H|1, Nq, Nk)`` block bitmap (blocks without a
    True are skipped); None for float biases."""
    if attn_bias is None:
        return None, None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a tensor, got {type(attn_bias).__name__}")
    if not (attn_bias.is_floating_point() or attn_bias.dtype == torch.bool):
        raise TypeError(f"attn_bias must be floating point (additive) or bool (a mask), got {attn_bias.dtype}")
    if attn_bias.device != device:
        raise ValueError(f"attn_bias must be on q's device ({device}), got {attn_bias.device}")
    full = (shape.batch, shape.num_heads, shape.seq_len_q, shape.seq_len_k)
    if attn_bias.dim() > 4 or any(n not in (1, f) for n, f in zip(attn_bias.shape[::-1], full[::-1])):
        raise ValueError(f"attn_bias must broadcast to (B, H, Sq, Sk) = {full} with every dim full or 1, got "
                         f"{tuple(attn_bias.shape)}")
    bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    if bias.shape[3] != shape.seq_len_k:  # the kernels read keys contiguously
        bias = bias.expand(*bias.shape[:3], shape.seq_len_k)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if bias.dtype != torch.bool:
        return bias.to(work), None
    mask = bias

    def keep_blocks_of(block_q: int, block_k: int) -> torch.Tensor:
        nq, nk = -(-shape.seq_len_q // block_q), -(-shape.seq_len_k // block_k)
        if mask.shape[2] > 1:
            tiles = _tile_any(mask, block_q, block_k)
            if tiles is not None:
                return tiles
        m = torch.nn.functional.pad(mask, (0, nk * block_k - shape.seq_len_k))
        m = m.reshape(*m.shape[:3], nk, block_k).any(4)  # (Bm, Hm, Sqm, Nk)
        if m.shape[2] == 1:  # a key mask (padding): the same blocks for every query block, no Sq x Sk
            return m.expand(*m.shape[:2], nq, nk)
        m = torch.nn.functional.pad(m, (0, 0, 0, nq * block_q - shape.seq_len_q))
        return m.reshape(*m.shape[:2], nq, block_q, nk).any(3)

    return (mask if keep_bool else additive_mask(mask, work)), keep_blocks_of


def _tile_any(mask: torch.Tensor, block_q: int, block_k: int) -> Optional[torch.Tensor]:
    """``mask (Bm, Hm, Sq, Sk)`` bool -> ``(Bm, Hm, ceil(Sq / block_q), Sk / block_k)``: whether each tile
    holds a True, read 8 pairs at a time as int64 words (13x faster than ``any`` over the bools at 4K);
    None where that view does not exist (a non-contiguous mask, or Sk not a multiple of block_k)."""
    Bm, Hm, Sq, Sk = mask.shape
    if not mask.is_contiguous() or Sk % block_k or block_k % 8:
        return None
    words = mask.view(torch.uint8).view(torch.int64)  # (Bm, Hm, Sq, Sk / 8), each word >= 0 (bytes are 0 / 1)
    full = Sq // block_q * block_q
    parts = []
    if full:
        parts.append(words[:, :, :full].reshape(Bm, Hm, Sq // block_q, block_q, Sk // 8).amax(3))
    if Sq > full:
        parts.append(words[:, :, full:].amax(2, keepdim=True))
    rows = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    return rows.reshape(Bm, Hm, rows.shape[2], Sk // block_k, block_k // 8).amax(-1) != 0


def bias_for(impl, bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``bias`` as the backend ``impl`` takes it: a bool mask stays bool for a kernel that reads masks
    (``impl.reads_bool_masks``: the C++ core, one byte per pair and no Sq x Sk float copy), else 0 / -inf in
    lse's dtype."""
    if bias is None or bias.dtype != torch.bool or getattr(impl, "reads_bool_masks", False):
        return bias
    return additive_mask(bias, torch.float64 if dtype == torch.float64 else torch.float32)


def check_block_mask(block_mask, shape: QKVShape, device: torch.device) -> BlockMask:
    """A mask fits when its lengths equal (Sq, Sk), its B/H are 1 or q's, and it is on q's device."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an attnops.BlockMask, got {type(block_mask).__name__}")
    mB, mH, msq, msk = block_mask.shape
    if (msq, msk) != (shape.seq_len_q, shape.seq_len_k):
        raise ValueError(
            f"block_mask was built for (Sq, Sk) = ({msq}, {msk}) but q/k have ({shape.seq_len_q}, {shape.seq_len_k})"
        )
    if mB not in (1, shape.batch) or mH not in (1, shape.num_heads):
        raise ValueError(
            f"block_mask batch/heads ({mB}, {mH}) must be 1 or match q's ({shape.batch}, {shape.num_heads})"
        )
    if block_mask.device != device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {device}; use block_mask.to(device)")
    return block_mask.check()  # the LUT's shapes, and its values once per mask (validate=False included)
