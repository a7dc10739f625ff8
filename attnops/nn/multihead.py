"""Drop-in replacement for ``torch.nn.MultiheadAttention`` and ``swap`` / ``unswap`` of the ones
inside a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnops.core.block_map import check_request
from attnops.maps.capture import attend, capturing, map_options, record
from attnops.nn.specs import AttentionSpec, SoftmaxSpec, resolve_spec
from attnops.ops.softmax import DEFAULT_MAP_BLOCK


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with the attention computed by attnops.

    Same constructor arguments, same parameters and ``state_dict`` keys (``in_proj_weight`` /
    ``in_proj_bias``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ, and ``out_proj``), so
    a torch module's weights load unchanged; ``attention=`` picks the family (default ``SoftmaxSpec()``).

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

    ``key_padding_mask`` (bool or 0/-inf float, ``(B, S)``) works with the SoftmaxSpec: each sequence
    attends over its unpadded keys (kernel calls per sequence when any key is padded); a query whose
    keys are all padded gets zeros (torch gives NaN there). Non-causal, padding may sit anywhere;
    block maps need it at the end of each sequence (kept keys a prefix), elsewhere ``weights`` is
    ``None``. Causal (no window), the kept keys must be one contiguous range per sequence (left or
    right padding); ``weights`` is then ``None``.

    Not supported, each a clear error rather than a silent difference: ``add_bias_kv``,
    ``add_zero_attn``, attention dropout while training (``dropout > 0`` is accepted and is a no-op
    in eval mode), padding with a block-sparse (or other non-softmax) spec, with causal windows, or
    with causality and kept keys that are not contiguous, and an ``attn_mask``
    other than the causal one (a causal ``attn_mask``, or ``is_causal=True``, runs the causal
    kernel).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 attention: Optional[AttentionSpec] = None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("attnops.nn.MultiheadAttention: add_bias_kv / add_zero_attn are not supported")
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
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
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

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._same_dims:
            wq, wk, wv = self.in_proj_weight[:E], self.in_proj_weight[E:2 * E], self.in_proj_weight[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query/key/value must all be 2-d (unbatched) or 3-d, got {query.dim()}/{key.dim()}/"
                             f"{value.dim()}")
        if self.training and self.dropout > 0:
            raise NotImplementedError("attnops kernels have no attention dropout: build the module with dropout=0 "
                                      "(or run it in eval mode)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
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
        causal = is_causal or _is_causal_mask(attn_mask, L, S)
        keep = _kept_keys(key_padding_mask, B, S)
        q, k, v = self._project(query, key, value)
        H, D = self.num_heads, self.head_dim
        q, k, v = q.view(B, L, H, D), k.view(B, S, H, D), v.view(B, S, H, D)
        if keep is None:
            out, weights = attend(self, self.attention, q, k, v, causal=causal, need_map=need_weights)
        else:
            # Non-causal attention does not depend on the order of the keys, so a padded sequence is
            # its unpadded keys gathered: one call per sequence, no token mask in the kernels.
            if not isinstance(self.attention, SoftmaxSpec):
                raise NotImplementedError("key_padding_mask: only the SoftmaxSpec (block masks index key "
                                          "positions, which dropping padded keys would shift)")
            if causal or self.attention.causal:
                out, weights = self._attend_unpadded_causal(q, k, v, keep)
            else:
                out, weights = self._attend_unpadded(q, k, v, keep, need_weights)
        out = self.out_proj(out.reshape(B, L, E))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights or weights is None:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, weights.squeeze(0) if unbatched else weights

    def _attend_unpadded_causal(self, q, k, v, keep: torch.Tensor):
        """Causal attention with padding, for kept keys that are one contiguous range ``[s, e)`` per
        sequence (right or left padding). Query ``i`` sits at ``i + S - L`` (bottom-right, as the
        kernels) and sees the kept keys up to it: the queries at positions in ``[s, e)`` are causal
        attention over ``k[s:e]`` (bottom-right aligned there too: the last of them sits at e - 1), the
        later ones attend to all of ``k[s:e]``, the earlier ones see nothing (zeros). No block maps:
        the pieces' maps would not index the full key positions (``need_weights`` gives None, a
        capture raises)."""
        if capturing():
            raise NotImplementedError("attnops.maps.capture with key padding and causal attention: block maps "
                                      "of the padded pieces are not computed")
        if self.attention.window != (-1, -1):
            raise NotImplementedError("key_padding_mask with causal windowed attention is not supported")
        B, L, H, D = q.shape
        S = k.shape[1]
        outs = []
        for b in range(B):
            kept = torch.nonzero(keep[b]).flatten()
            if kept.numel() == 0:
                outs.append(q.new_zeros(1, L, H, D))
                continue
            s, e = int(kept[0]), int(kept[-1]) + 1
            if e - s != kept.numel():
                raise NotImplementedError("key_padding_mask with causal attention needs each sequence's kept keys "
                                          "contiguous (left or right padding)")
            i_a, i_b = min(max(s - (S - L), 0), L), min(max(e - (S - L), 0), L)
            kb, vb = k[b:b + 1, s:e], v[b:b + 1, s:e]
            pieces = [q.new_zeros(1, i_a, H, D)]
            if i_b > i_a:
                pieces.append(self.attention.attend(q[b:b + 1, i_a:i_b], kb, vb, causal=True))
            if L > i_b:
                pieces.append(SoftmaxSpec().attend(q[b:b + 1, i_b:], kb, vb))
            outs.append(torch.cat(pieces, dim=1))
        return torch.cat(outs), None

    def _attend_unpadded(self, q, k, v, keep: torch.Tensor, need_weights: bool):
        """One call per sequence over its kept keys. Block maps (``need_weights`` or an open capture)
        are the per-sequence maps zero-padded to the full key length, exact when the kept keys are a
        prefix (right padding). With padding elsewhere the gathered keys no longer sit at their
        positions: ``need_weights`` then gives ``None`` (torch's default must not break such calls)
        and a capture, which asked for maps explicitly, raises."""
        capturing_now = capturing()
        want_map = need_weights or capturing_now
        if want_map and not all(bool(kept[:int(kept.sum())].all()) for kept in keep):
            if capturing_now:
                raise NotImplementedError("attnops.maps.capture with key padding that is not at the end of the "
                                          "sequence: block maps index key positions")
            want_map = False
        options = map_options()
        nk = -(-k.shape[1] // check_request(options.get("map_block_size"), options.get("reduce", "mean"),
                                            DEFAULT_MAP_BLOCK).block_k)
        outs, maps = [], []
        for b in range(k.shape[0]):
            kept = keep[b]
            res = self.attention.attend(q[b:b + 1], k[b:b + 1, kept], v[b:b + 1, kept], return_block_map=want_map,
                                        **options)
            if want_map:
                res, block_map = res
                maps.append(F.pad(block_map, (0, nk - block_map.shape[-1])))
            outs.append(res)
        if not want_map:
            return torch.cat(outs), None
        block_map = torch.cat(maps)
        record(self, block_map)
        return torch.cat(outs), block_map


def _blocked(mask: torch.Tensor, name: str) -> torch.Tensor:
    """torch's mask conventions -> bool, True where blocked: a bool mask as is; an additive float mask
    of 0 (kept) and -inf (blocked), any other value being an error."""
    if mask.dtype == torch.bool:
        return mask
    blocked = torch.isinf(mask) & (mask < 0)
    if bool(((mask != 0) & ~blocked).any()):
        raise NotImplementedError(f"attnops.nn.MultiheadAttention: additive {name} values other than 0 / -inf "
                                  "are not supported")
    return blocked


def _kept_keys(mask: Optional[torch.Tensor], B: int, S: int) -> Optional[torch.Tensor]:
    """``key_padding_mask (B, S)`` (bool: True = padding; float: -inf = padding, 0 = kept) -> the
    (B, S) bool keep-mask, or None when it masks nothing."""
    if mask is None:
        return None
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask must be (batch, source length) = ({B}, {S}), got {tuple(mask.shape)}")
    padded = _blocked(mask, "key_padding_mask")
    if not bool(padded.any()):
        return None
    return ~padded


def _is_causal_mask(mask: Optional[torch.Tensor], L: int, S: int) -> bool:
    """True for the causal mask nn.Transformer builds (bool: True = masked; float: -inf above the
    diagonal), False for None; any other mask is an error."""
    if mask is None:
        return False
    if mask.dim() != 2 or tuple(mask.shape) != (L, S):
        raise NotImplementedError(f"attnops.nn.MultiheadAttention: only a 2-d causal attn_mask ({L}, {S}) is "
                                  f"supported, got shape {tuple(mask.shape)}")
    # bottom-right aligned, as attnops' causal (identical to top-left when L == S)
    above = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(S - L + 1)
    if not bool((_blocked(mask, "attn_mask") == above).all()):
        raise NotImplementedError("attnops.nn.MultiheadAttention: only the causal attn_mask is supported; express "
                                  "other patterns as a BlockSparseSpec")
    return True


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
    ``make(module)``, with the same weights and training mode."""
    report = SwapReport()
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
    def make(m):  # add_bias_kv / add_zero_attn passed on so that the constructor refuses them
        return MultiheadAttention(**_constructor_args(m), add_bias_kv=m.bias_k is not None,
                                  add_zero_attn=m.add_zero_attn, attention=spec)

    return _replace(model, lambda m: type(m) is nn.MultiheadAttention, make, filter)


def unswap(model: nn.Module) -> SwapReport:
    """Replace every attnops :class:`MultiheadAttention` in ``model`` by a ``torch.nn.MultiheadAttention``
    with the same weights (the inverse of :func:`swap`)."""
    return _replace(model, lambda m: isinstance(m, MultiheadAttention),
                    lambda m: nn.MultiheadAttention(**_constructor_args(m)))
