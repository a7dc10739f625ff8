"""Drop-in replacement for ``torch.nn.MultiheadAttention`` and ``swap`` / ``unswap`` of the ones
inside a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnops.core.checks import additive_mask
from attnops.maps.capture import attend, refuse_uncaptured
from attnops.nn.specs import (SCORE_MOD_SPECS, VARLEN_SPECS, AttentionSpec, BlockSparseSpec, SoftmaxSpec,
                              attend_unpadded, resolve_spec)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with the attention computed by attnops.

    Same constructor arguments, same parameters and ``state_dict`` keys (``in_proj_weight`` /
    ``in_proj_bias``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ, ``bias_k`` / ``bias_v`` with
    ``add_bias_kv``, and ``out_proj``), so a torch module's weights load unchanged; ``attention=`` picks the
    family (default ``SoftmaxSpec()``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` with ``query (L, B, E)`` (``(B, L, E)`` when
    ``batch_first``, or unbatched ``(L, E)``), ``key``/``value`` ``(S, B, kdim/vdim)``; returns
    ``(attn_output, weights)``. attnops never materialises the L x S weight matrix: with
    ``need_weights=True`` (torch's default) ``weights`` is the *block* attention map, computed by the
    kernels with the forward (``attnops.attention(..., return_block_map=True)``, 64 x 64 blocks or
    the block mask's): ``(B, ceil(L/64), ceil(S/64))`` averaged over heads, ``(B, H, ., .)`` with
    ``average_attn_weights=False``, without the batch dim for unbatched input; a row holds the
    mean probability mass that block's queries put on each key block. ``need_weights=False``
    returns ``None`` and skips the map.

    Masks follow torch: ``attn_mask`` ``(L, S)`` or ``(B * H, L, S)``, bool (True: not attended) or float
    (added to the scores); ``key_padding_mask`` ``(B, S)``, bool (True: padding) or float (added). A causal
    ``attn_mask`` (or ``is_causal=True`` without a mask, bottom-right aligned when ``L != S``) runs the causal kernels;
    with a mask, ``is_causal`` is the hint torch calls it and the mask decides; any other mask and the padding reach the
    kernels as ``attn_bias`` (padding as a ``(B, 1, 1, S)`` key mask, no L x S tensor; empty key blocks are
    skipped), with the SoftmaxSpec or a BlockSparseSpec. A query whose keys are all masked gets zeros, as torch
    2.13's module gives in training and in cross-attention (its inference fast path, self-attention in eval mode,
    gives NaN there instead). ``add_bias_kv`` / ``add_zero_attn`` append their key/value row after the projections,
    visible to every query, as torch's mask path does (torch's fast path for ``is_causal=True``, ``need_weights=False``
    and no padding drops the mask for SDPA's top-left ``is_causal`` and hides those rows from the first queries:
    torch's module itself then differs between ``need_weights=True`` and ``False``).

    Attention dropout (``dropout``, in training only, as torch) runs in the kernels on the SoftmaxSpec,
    BlockSparseSpec and MoBASpec (its mask from the default generator: ``torch.manual_seed`` reproduces it).

    Not supported, each a clear error rather than a silent difference: dropout with the linear or low-rank
    specs, masks or padding with the MoBA, linear or low-rank specs.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 attention: Optional[AttentionSpec] = None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        attention = resolve_spec(attention, SoftmaxSpec())
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = embed_dim // num_heads
        self.attention = attention
        same = self.kdim == embed_dim and self.vdim == embed_dim
        if same:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **kw))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        # nn.TransformerEncoderLayer takes a fused fast path (bypassing self_attn's forward) when this
        # flag is set: reporting False keeps its forward going through this module.
        self._qkv_same_embed_dim = False
        self._same_dims = same
        self._reset_parameters()

    def _reset_parameters(self):  # torch's initialisation, so a fresh module trains the same way
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._same_dims:
            wq, wk, wv = self.in_proj_weight[:E], self.in_proj_weight[E:2 * E], self.in_proj_weight[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        B = q.shape[0]
        if self.bias_k is not None:  # torch: a learned key/value row after the projection
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
        if self.add_zero_attn:  # torch: a zero key/value row after that
            k = torch.cat([k, k.new_zeros(B, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(B, 1, E)], dim=1)
        return q, k, v

    def _finish(self, out: torch.Tensor, B: int, L: int, E: int, unbatched: bool) -> torch.Tensor:
        """The output projection, in the caller's layout."""
        out = self.out_proj(out.reshape(B, L, E))
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query/key/value must all be 2-d (unbatched) or 3-d, got {query.dim()}/{key.dim()}/"
                             f"{value.dim()}")
        if self.training and self.dropout > 0 and not isinstance(self.attention, SCORE_MOD_SPECS):
            raise NotImplementedError(f"attnops.nn.MultiheadAttention: attention dropout needs the SoftmaxSpec, a "
                                      f"BlockSparseSpec or the MoBASpec, not {type(self.attention).__name__}; build "
                                      "the module with dropout=0 (or run it in eval mode)")
        self_attention = query is key  # before the layout changes below make new tensors of both
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"expected query/key/value widths {self.embed_dim}/{self.kdim}/{self.vdim}, got "
                             f"{E}/{key.shape[-1]}/{value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit query "
                             f"{tuple(query.shape)}")
        H, D = self.num_heads, self.head_dim
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)  # key rows appended after the projection
        # is_causal is torch's hint that attn_mask is causal; given a mask, the mask decides (torch's module also
        # follows the mask wherever it keeps one: with weights, padding, or bias_k / zero-attention rows), so a
        # top-left causal mask with L != S is not turned into attnops' bottom-right causality
        causal = _is_causal_mask(attn_mask, L, S) if attn_mask is not None else bool(is_causal)
        bias = _attn_bias(None if causal else attn_mask, key_padding_mask, B, H, L, S)
        if causal and extra:  # the appended rows are visible to every query: causality as an explicit mask
            bias = _and_masks(bias, torch.ones(L, S, dtype=torch.bool, device=query.device).tril(S - L))
            causal = False
        if bias is not None and extra:
            bias = F.pad(bias, (0, extra), value=True if bias.dtype == torch.bool else 0.0)
        q, k, v = self._project(query, key, value)
        q, k, v = q.view(B, L, H, D), k.view(B, S + extra, H, D), v.view(B, S + extra, H, D)
        options = {}
        if self.training and self.dropout > 0:
            options["dropout_p"] = self.dropout
        padding = _padding_of(key_padding_mask)
        if bias is not None and isinstance(self.attention, VARLEN_SPECS) and attn_mask is None and not extra and \
                self_attention and padding is not None:
            # self-attention with padding on MoBA / linear: each row's kept tokens run as one sequence
            if need_weights:
                raise NotImplementedError("attnops.nn.MultiheadAttention: key padding on the "
                                          f"{type(self.attention).__name__} runs each row's tokens as a sequence and "
                                          "has no attention weights; pass need_weights=False")
            refuse_uncaptured(f"key padding on the {type(self.attention).__name__} (unpadded sequences)")
            out = attend_unpadded(self.attention, q, k, v, ~padding, None, causal, None, **options)
            return self._finish(out, B, L, E, unbatched), None
        if bias is not None:
            if not isinstance(self.attention, (SoftmaxSpec, BlockSparseSpec)):
                raise NotImplementedError(f"attnops.nn.MultiheadAttention: masks and key padding need the SoftmaxSpec "
                                          f"or a BlockSparseSpec, not {type(self.attention).__name__} (the MoBA and "
                                          "linear specs take a bool key_padding_mask alone in self-attention, query is "
                                          "key)")
            options["attn_bias"] = bias
        out, weights = attend(self, self.attention, q, k, v, causal=causal, need_map=need_weights, **options)
        out = self._finish(out, B, L, E, unbatched)
        if not need_weights or weights is None:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, weights.squeeze(0) if unbatched else weights


def _padding_of(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A key padding mask as bool (True: padding): a bool one, or a float one of 0 / -inf only (the form
    ``nn.TransformerEncoder`` converts masks to); None for anything else."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    if key_padding_mask.is_floating_point():
        pad = torch.isneginf(key_padding_mask)
        if bool(((key_padding_mask == 0) | pad).all()):
            return pad
    return None


def _attn_bias(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], B: int, H: int, L: int,
               S: int) -> Optional[torch.Tensor]:
    """torch's masks as the kernels' ``attn_bias`` (SDPA's convention: bool True = attended, float added):
    ``attn_mask`` ``(L, S)`` -> ``(L, S)``, ``(B * H, L, S)`` -> ``(B, H, L, S)``; ``key_padding_mask`` ``(B, S)`` ->
    ``(B, 1, 1, S)``; both combined. None when neither masks anything."""
    parts = []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
            m = attn_mask
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * H, L, S):
            m = attn_mask.view(B, H, L, S)
        else:
            raise ValueError(f"attn_mask must be (L, S) = ({L}, {S}) or (B * num_heads, L, S) = ({B * H}, {L}, {S}), "
                             f"got {tuple(attn_mask.shape)}")
        parts.append(~m if m.dtype == torch.bool else m)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must be (batch, source length) = ({B}, {S}), got "
                             f"{tuple(key_padding_mask.shape)}")
        m = key_padding_mask.view(B, 1, 1, S)
        parts.append(~m if m.dtype == torch.bool else m)
    bias = None
    for part in parts:
        bias = part if bias is None else _and_masks(bias, part)
    if bias is not None and bias.dtype == torch.bool and bool(bias.all()):
        return None  # nothing masked: the plain kernels
    return bias


def _and_masks(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """Two attn_biases at once: bool masks and-ed, otherwise added (a bool one as 0 / -inf)."""
    if a is None:
        return b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = a.dtype if a.is_floating_point() else b.dtype
    a, b = (additive_mask(m, dtype) if m.dtype == torch.bool else m.to(dtype) for m in (a, b))
    return a + b


def _is_causal_mask(mask: Optional[torch.Tensor], L: int, S: int) -> bool:
    """Whether ``attn_mask`` is the causal mask nn.Transformer builds (bool: True = masked; float: -inf above
    the diagonal, 0 elsewhere), bottom-right aligned as attnops' causal (identical to top-left when L == S)."""
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (L, S):
        return False
    above = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(S - L + 1)
    if mask.dtype == torch.bool:
        return bool((mask == above).all())
    return bool(((mask == 0) == ~above).all() and torch.isneginf(mask[above]).all())


# ---- swap / unswap ----------------------------------------------------------------------------------

@dataclass
class SwapReport:
    """What ``swap`` / ``unswap`` replaced: the dotted names of the modules."""

    swapped: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # rejected by ``filter``

    def __len__(self) -> int:
        return len(self.swapped)


def _constructor_args(module: nn.Module) -> dict:
    """The arguments both MultiheadAttention classes share, read off an instance of either."""
    p = module.out_proj.weight
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
                bias=module.in_proj_bias is not None, kdim=module.kdim, vdim=module.vdim,
                batch_first=module.batch_first, device=p.device, dtype=p.dtype)


def _replace(model: nn.Module, select: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module],
             filter: Optional[Callable[[str, nn.Module], bool]] = None) -> SwapReport:
    """Replace every submodule that ``select`` picks (and ``filter(name, module)`` accepts) by
    ``make(module)``, with the same weights and training mode. Atomic: every replacement is built (and
    loaded) before the first is installed, so an error leaves the model as it was."""
    report = SwapReport()
    built = []
    for name, module in list(model.named_modules()):
        if not select(module):
            continue
        if filter is not None and not filter(name, module):
            report.skipped.append(name)
            continue
        if not name:
            raise ValueError("swap/unswap replace submodules; pass the model that contains the attention module")
        new = make(module)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        built.append((name, new))
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.swapped.append(name)
    return report


def swap(model: nn.Module, spec: Optional[AttentionSpec] = None,
         filter: Optional[Callable[[str, nn.Module], bool]] = None) -> SwapReport:
    """Replace, in place, every ``torch.nn.MultiheadAttention`` in ``model`` (those inside
    ``nn.TransformerEncoder/DecoderLayer`` included) with :class:`MultiheadAttention` carrying the
    same weights, device and dtype, and ``attention=spec``. ``filter(name, module)`` chooses which.
    Returns a :class:`SwapReport`; :func:`unswap` restores."""
    def make(m):
        return MultiheadAttention(**_constructor_args(m), add_bias_kv=m.bias_k is not None,
                                  add_zero_attn=m.add_zero_attn, attention=spec)

    report = _replace(model, lambda m: type(m) is nn.MultiheadAttention, make, filter)
    _sync_nested_fast_path(model)
    return report


def _sync_nested_fast_path(model: nn.Module) -> None:
    """``nn.TransformerEncoder``'s inference fast path turns a padded batch into a nested tensor before its
    layers run (decided by ``use_nested_tensor``, set when the encoder was built around torch's attention):
    our module takes the padding mask instead, so the fast path is turned off on encoders that hold one, and
    restored by :func:`unswap`. (The layers' own fast path, which would bypass the module and run torch's
    fused kernel on its weights, already declines: ``_qkv_same_embed_dim`` is False here.)"""
    for enc in model.modules():
        if not isinstance(enc, nn.TransformerEncoder):
            continue
        ours = any(isinstance(m, MultiheadAttention) for m in enc.modules())
        if ours and getattr(enc, "use_nested_tensor", False):
            enc._attnops_use_nested_tensor = True
            enc.use_nested_tensor = False
        elif not ours and getattr(enc, "_attnops_use_nested_tensor", False):
            enc.use_nested_tensor = True
            del enc._attnops_use_nested_tensor


def unswap(model: nn.Module) -> SwapReport:
    """Replace every attnops :class:`MultiheadAttention` in ``model`` by a ``torch.nn.MultiheadAttention``
    with the same weights (the inverse of :func:`swap`)."""
    report = _replace(model, lambda m: isinstance(m, MultiheadAttention),
                      lambda m: nn.MultiheadAttention(**_constructor_args(m), add_bias_kv=m.bias_k is not None,
                                                      add_zero_attn=m.add_zero_attn))
    _sync_nested_fast_path(model)
    return report
