"""Attention specs: small frozen dataclasses that say which attnops family a module runs, validated
on construction. A module turns its spec into one op call through ``spec.attend(q, k, v)``
(through ``attnops.maps.attend``, which asks for the block map while a capture is open).

One per family: ``SoftmaxSpec``, ``BlockSparseSpec``, ``MoBASpec``, ``LinearAttentionSpec``, ``LowRankKeySpec``, and the
composed methods' ``MoHSpec``, ``AgentSpec``, ``FlowSpec``, ``LLNSpec``, ``SEASpec``, ``HyperSpec``, ``ReGLASpec`` and
``RoutingSpec`` (a new family adds one class and its ``attend``; a spec whose method keeps parameters or buffers on
the layer, ``ReGLASpec`` and ``RoutingSpec``, sets ``needs_module``, gets the layer as ``module`` and gives a layer
its state in ``attach_to``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from attnops.core.checks import QKVShape
from attnops.core.masks import BlockMask
from attnops.nn.regla import NORMS, ReGLAGates
from attnops.nn.routing import check_routing_args
from attnops.ops.agent import agent_attention
from attnops.ops.clustered import routing_attention, update_centroids
from attnops.ops.flow import flow_attention
from attnops.ops.hyper import hyper_attention
from attnops.ops.linear import decay_preset, linear_attention, resolve_feature_map
from attnops.ops.lln import lln_attention
from attnops.ops.lowrank import KeyProjection, check_lowrank_args, lowrank_key_attention
from attnops.ops.moh import moh_attention, query_norm_heads
from attnops.ops.regla import regla_attention
from attnops.ops.regla.op import KEY_SHIFTS
from attnops.ops.routed import check_moba_args, moba_attention, sea_attention
from attnops.ops.softmax import attention, block_sparse_attention


@dataclass(frozen=True)
class SoftmaxSpec:
    """Exact softmax attention: ``causal`` (bottom-right aligned), ``window = (left, right)`` as in
    flash_attn (-1: unbounded)."""

    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    reports_max_scores = True  # attend() takes return_max_scores (attnops.maps.capture(max_scores=True))

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"SoftmaxSpec.causal must be a bool, got {self.causal!r}")
        w = tuple(self.window)
        if len(w) != 2 or not all(isinstance(x, int) and x >= -1 for x in w):
            raise ValueError(f"SoftmaxSpec.window must be (left, right) ints >= -1, got {self.window!r}")
        object.__setattr__(self, "window", w)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)`` -> ``(B, Sq, H, D)``; ``causal`` from the call
        (``is_causal``) adds to the spec's. ``options``: the ops' keyword options, the block map's
        (``return_block_map``, ``map_block_size``, ``reduce``; with ``return_block_map=True`` the result is
        ``(out, block_map)``) and, for the softmax specs (:data:`SCORE_MOD_SPECS`), the score modifiers
        ``softcap``, ``alibi_slopes``, ``sinks``."""
        return attention(q, k, v, causal=self.causal or causal, window_size=self.window, softmax_scale=softmax_scale,
                         **options)


@dataclass(frozen=True)
class BlockSparseSpec:
    """Exact attention on a block mask: a fixed ``BlockMask``, or ``pattern(seq_len_q, seq_len_k)``
    returning one (masks depend on the sequence lengths, so modules usually take a pattern, e.g.
    ``lambda sq, sk: BlockMask.sliding_window(sq, window=512)``)."""

    block_mask: Optional[BlockMask] = None
    pattern: Optional[Callable[[int, int], BlockMask]] = None
    # masks built by ``pattern``, per (Sq, Sk, device): built once, not per layer and step. Building
    # one reads tensor values (validation), which torch.compile cannot trace: run one eager step
    # before compiling (as with FlexAttention's create_block_mask) and the compiled graph only
    # looks the mask up.
    _masks: Dict[Tuple[int, int, str], BlockMask] = field(default_factory=dict, init=False, compare=False,
                                                          repr=False)
    reports_max_scores = True

    def __post_init__(self):
        if (self.block_mask is None) == (self.pattern is None):
            raise ValueError("BlockSparseSpec takes exactly one of block_mask= or pattern=")
        if self.block_mask is not None and not isinstance(self.block_mask, BlockMask):
            raise TypeError(f"BlockSparseSpec.block_mask must be a BlockMask, got {type(self.block_mask).__name__}")
        if self.pattern is not None and not callable(self.pattern):
            raise TypeError("BlockSparseSpec.pattern must be callable (seq_len_q, seq_len_k) -> BlockMask")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """As :meth:`SoftmaxSpec.attend`, on the fixed or pattern-built block mask."""
        mask = self.block_mask if self.block_mask is not None else self._mask_for(q.shape[1], k.shape[1], q.device)
        if causal and not mask.causal:  # causality belongs to the mask (its LUT is built causal)
            raise ValueError("BlockSparseSpec: the call is causal but the block mask is not; build it causal "
                             "(e.g. BlockMask.causal, BlockMask.sliding_window(..., causal=True))")
        return block_sparse_attention(q, k, v, mask, softmax_scale=softmax_scale, **options)

    def _mask_for(self, seq_len_q: int, seq_len_k: int, device: torch.device) -> BlockMask:
        key = (seq_len_q, seq_len_k, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = self.pattern(seq_len_q, seq_len_k)
            if not isinstance(mask, BlockMask):
                raise TypeError(f"BlockSparseSpec.pattern must return a BlockMask, got {type(mask).__name__}")
            mask = self._masks[key] = mask.to(device)
        return mask


@dataclass(frozen=True)
class MoBASpec:
    """MoBA block-routed attention (:func:`attnops.moba_attention`): each query attends its own
    ``block_size`` block and the ``topk - 1`` blocks whose mean key scores highest against it (``routing="token"``,
    the paper's; ``"tile"``: per 64-row query tile, faster, block maps); ``causal`` adds to the call's. Prefill
    and training route; a cached decoding step (fewer queries than keys) attends to the whole cache exactly, as
    MoBA's own implementation does for decoding."""

    block_size: int = 512
    topk: int = 3
    causal: bool = False
    routing: str = "token"
    reports_max_scores = True

    def __post_init__(self):
        check_moba_args(self.block_size, self.topk, prefix="MoBA.", routing=self.routing)
        if not isinstance(self.causal, bool):
            raise TypeError(f"MoBASpec.causal must be a bool, got {self.causal!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """As :meth:`SoftmaxSpec.attend`."""
        causal = self.causal or causal
        if q.shape[1] != k.shape[1]:
            return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, **options)
        return moba_attention(q, k, v, block_size=self.block_size, topk=self.topk, causal=causal, routing=self.routing,
                              softmax_scale=softmax_scale, **options)


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Linear attention (:func:`attnops.linear_attention`) in place of softmax attention, on the
    module's own q/k/v: ``feature_map`` (a name or a callable), ``normalize`` (default on here: a
    drop-in for softmax attention has no output norm to stabilise it), ``decay`` (None or a preset
    name), ``causal`` added to the call's. A cached decoding step (fewer queries than keys) runs the
    recurrence over the cached prefix, then the new queries: the same result as the prefill.
    Non-causal calls may cross-attend (k/v of their own length)."""

    feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "elu"
    normalize: bool = True
    decay: Optional[str] = None
    causal: bool = False

    def __post_init__(self):
        resolve_feature_map(self.feature_map)
        for name in ("normalize", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LinearAttentionSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.decay is not None:
            decay_preset(self.decay, 1)  # validates the name
        if self.decay is not None and not self.causal:
            raise ValueError("LinearAttentionSpec.decay needs causal=True: a decay orders the sequence")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **block_map) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """As :meth:`SoftmaxSpec.attend`; block maps (``return_block_map=True``, mean only) are those of
        :func:`attnops.linear_attention`, for prefill and training calls (a cached step's map would
        need the cached prefix's queries: refused)."""
        causal = self.causal or causal
        kw = dict(feature_map=self.feature_map, normalize=self.normalize, decay=self.decay, softmax_scale=softmax_scale)
        prefix = k.shape[1] - q.shape[1]
        if not causal or prefix == 0:
            return linear_attention(q, k, v, causal=causal, **kw, **block_map)
        if prefix < 0:
            raise ValueError(f"LinearAttentionSpec: causal attention with more queries ({q.shape[1]}) than keys ({k.shape[1]})")
        if block_map.get("return_block_map"):
            raise NotImplementedError("attnops.nn.LinearAttentionSpec: no block map for a cached decoding step (the map of a "
                                      "linear-attention prefill is computed; capture the prefill)")
        # the state after the cached prefix (its outputs are not needed), then the new tokens from it
        _, state = linear_attention(k[:, :prefix].repeat_interleave(q.shape[2] // k.shape[2], dim=2), k[:, :prefix],
                                    v[:, :prefix], causal=True, output_final_state=True, **kw)
        return linear_attention(q, k[:, prefix:], v[:, prefix:], causal=True, initial_state=state, **kw)


@dataclass(frozen=True)
class LowRankKeySpec:
    """Low-rank-key attention (Loki, :func:`attnops.lowrank_key_attention`): each query attends
    exactly to its ``topk`` keys of highest score in the first ``rank`` components of
    ``projection`` (None: of the raw head dims), the newest ``local`` always among them; ``causal``
    adds to the call's. Forward only (an inference method: calibrate a trained model, then swap
    this in). In :class:`attnops.nn.Attention` the cached steps keep the keys in the basis; called
    through other modules (transformers' attention functions) the op rotates the keys per call."""

    projection: Optional[KeyProjection]
    rank: Union[int, float]  # a float in (0, 1): Loki's top_r (needs the projection)
    topk: Union[int, float]  # a float in (0, 1]: Loki's fraction of the keys, per call
    local: int = 0
    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"LowRankKeySpec.causal must be a bool, got {self.causal!r}")
        p = self.projection
        if p is not None and not isinstance(p, KeyProjection):
            raise TypeError(f"LowRankKeySpec.projection must be a KeyProjection or None, got {type(p).__name__}")
        head_dim = p.head_dim if p is not None else (self.rank if isinstance(self.rank, int) else 1)
        shape = QKVShape(1, 1, 1, 1, 1, head_dim) if p is None else QKVShape(1, 1, 1, p.num_kv_heads,
                                                                            p.num_kv_heads, head_dim)
        check_lowrank_args(p, self.rank, self.topk, self.local, shape, self.causal, prefix="LowRankKeySpec.")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **block_map) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """As :meth:`SoftmaxSpec.attend`; block maps are those of the chosen keys."""
        return lowrank_key_attention(q, k, v, projection=self.projection, rank=self.rank, topk=self.topk,
                                     causal=self.causal or causal,
                                     softmax_scale=softmax_scale, local=self.local, **block_map)


def _no_block_map(spec: str, options: dict) -> None:
    """The composed specs return no block map: a map request (a capture, ``need_weights``) is refused."""
    if options.get("return_block_map"):
        raise NotImplementedError(f"attnops.nn.{spec}: no block map (the op has no per-block probabilities to "
                                  "export); capture maps with a softmax, block-sparse, MoBA or linear spec")
    unknown = set(options) - {"return_block_map", "map_block_size", "reduce"}
    if unknown:
        raise NotImplementedError(f"attnops.nn.{spec} cannot apply {', '.join(sorted(unknown))}")


def _head_count(value: Union[int, float], num_heads: int) -> int:
    """An int count, or a float fraction of the heads (``int(H * x)``, the MoH authors' rounding)."""
    return value if isinstance(value, int) else int(num_heads * value)


def _check_count_or_fraction(value, name: str, low: int) -> None:
    ok_int = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok_float = isinstance(value, float) and 0.0 < value < 1.0
    if not (ok_int or ok_float):
        raise ValueError(f"MoHSpec.{name} must be an int >= {low} or a float fraction of the heads in (0, 1), got "
                         f"{value!r}")


@dataclass(frozen=True)
class MoHSpec:
    """Mixture-of-Head attention (:func:`attnops.moh_attention`) with MoH-LLaMA3's parameter-free router
    (:func:`attnops.ops.moh.query_norm_heads`): the first ``num_shared_heads`` heads always, and per token the
    ``top_k`` other heads with the largest query norm; only those (token, head) pairs are computed, the others
    output 0. Counts are ints, or float fractions of the heads (``int(H * x)``); the defaults are the authors'
    MoH-LLaMA3 (half the heads shared, a quarter routed: 75% active). ``causal`` adds to the call's; a cached
    step (fewer queries than keys) routes its own queries. A module with learned gates is
    :class:`attnops.nn.MoHAttention`."""

    num_shared_heads: Union[int, float] = 0.5
    top_k: Union[int, float] = 0.25
    causal: bool = False

    def __post_init__(self):
        _check_count_or_fraction(self.num_shared_heads, "num_shared_heads", 0)
        _check_count_or_fraction(self.top_k, "top_k", 1)
        if not isinstance(self.causal, bool):
            raise TypeError(f"MoHSpec.causal must be a bool, got {self.causal!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map."""
        _no_block_map("MoHSpec", options)
        H = q.shape[2]
        shared, top_k = _head_count(self.num_shared_heads, H), _head_count(self.top_k, H)
        try:
            weights = query_norm_heads(q, shared, top_k)
        except ValueError as e:
            raise ValueError(f"MoHSpec({self.num_shared_heads}, {self.top_k}) with {H} heads: {e}") from None
        return moh_attention(q, k, v, weights, causal=self.causal or causal, softmax_scale=softmax_scale)


@dataclass(frozen=True)
class AgentSpec:
    """Agent attention (:func:`attnops.agent_attention`): ``num_agents`` agents pooled from the queries gather
    the keys and values, then the queries attend the agents; without the paper's position biases and
    depthwise convolution (they are parameters of a vision block, not of attention). Non-causal: a causal call
    is refused (an encoder block: ``attnops.nn.Attention(..., causal=False)``, ``nn.MultiheadAttention``)."""

    num_agents: int = 49

    def __post_init__(self):
        if isinstance(self.num_agents, bool) or not isinstance(self.num_agents, int) or self.num_agents < 1:
            raise ValueError(f"AgentSpec.num_agents must be an int >= 1, got {self.num_agents!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map; fewer queries than agents use every query as an
        agent."""
        _no_block_map("AgentSpec", options)
        if causal:
            raise ValueError("AgentSpec: agent attention is non-causal (the agents pool every query); use it in a "
                             "non-causal block (causal=False)")
        return agent_attention(q, k, v, num_agents=min(self.num_agents, q.shape[1]), softmax_scale=softmax_scale)


@dataclass(frozen=True)
class SEASpec:
    """SEA-style estimated-mask attention (:func:`attnops.sea_attention`): a Performer estimate of the block map
    picks ``topk`` key blocks per query block (besides the diagonal one), exact attention runs there; ``causal``
    adds to the call's. A cached decoding step (fewer queries than keys) attends the whole cache exactly."""

    block_size: int = 64
    topk: Union[int, float] = 8
    num_features: int = 64
    seed: int = 0
    causal: bool = False

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"SEASpec.causal must be a bool, got {self.causal!r}")
        probe = torch.zeros(1, self.block_size if isinstance(self.block_size, int) and self.block_size > 0 else 1, 1, 8)
        sea_attention(probe, probe, probe, block_size=self.block_size, topk=self.topk, num_features=self.num_features,
                      seed=self.seed)  # validates every field on a one-block input

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map (the estimate is ``sea_attention(return_estimate=True)``)."""
        _no_block_map("SEASpec", options)
        causal = self.causal or causal
        if q.shape[1] != k.shape[1]:
            return attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
        return sea_attention(q, k, v, block_size=self.block_size, topk=self.topk, num_features=self.num_features,
                             seed=self.seed, causal=causal, softmax_scale=softmax_scale)


@dataclass(frozen=True)
class HyperSpec:
    """HyperAttention (:func:`attnops.hyper_attention`, the authors' defaults): sortLSH blocks plus sampled columns,
    exact below ``min_seq_len``; ``causal`` adds to the call's. A cached decoding step (or chunk) of at most
    ``min_seq_len`` queries attends the cache exactly, as the op does."""

    block_size: int = 256
    sample_size: int = 256
    num_projections: int = 7
    min_seq_len: int = 4096
    seed: int = 0
    causal: bool = False

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"HyperSpec.causal must be a bool, got {self.causal!r}")
        probe = torch.zeros(1, 2, 1, 8)
        hyper_attention(probe, probe, probe, block_size=self.block_size, sample_size=self.sample_size,
                        num_projections=self.num_projections, min_seq_len=self.min_seq_len,
                        seed=self.seed)  # validates every field

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map."""
        _no_block_map("HyperSpec", options)
        return hyper_attention(q, k, v, causal=self.causal or causal, softmax_scale=softmax_scale,
                               block_size=self.block_size, sample_size=self.sample_size,
                               num_projections=self.num_projections, min_seq_len=self.min_seq_len, seed=self.seed)


def _whole_sequence(spec: str, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError(f"attnops.nn.{spec}: a cached decoding step (fewer queries than keys) needs the "
                                  "cached prefix's queries, which a KV cache does not keep; run without a cache "
                                  "(use_cache=False) or over the whole sequence")


@dataclass(frozen=True)
class FlowSpec:
    """Flowformer's flow attention (:func:`attnops.flow_attention`) on the module's q / k / v; ``causal`` adds
    to the call's. Its normalisation reads q as well as k at every position, so causal calls take the whole
    sequence (a cached step is refused, not approximated). ``source_clamp``: the conserved source flow's clamp;
    None takes the authors' value for the form (1 in their non-causal code, 10 in their causal code).
    ``softmax_scale`` does not apply (sigmoid features): only the default scale passes."""

    causal: bool = False
    source_clamp: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"FlowSpec.causal must be a bool, got {self.causal!r}")
        c = self.source_clamp
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
            raise ValueError(f"FlowSpec.source_clamp must be None or a number > 0, got {c!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map."""
        _no_block_map("FlowSpec", options)
        causal = self.causal or causal
        _whole_sequence("FlowSpec", q, k, causal)
        _no_scale("FlowSpec", softmax_scale, q.shape[-1])
        clamp = self.source_clamp if self.source_clamp is not None else (10.0 if causal else 1.0)
        return flow_attention(q, k, v, causal=causal, source_clamp=float(clamp))


@dataclass(frozen=True)
class LLNSpec:
    """Linear Log-Normal attention (:func:`attnops.lln_attention`); ``diag`` is LLN+Diag; ``causal`` adds to the
    call's. Its moment matching reads the statistics of the whole call's q and k, so causal calls take the
    whole sequence (a cached step is refused). ``softmax_scale`` does not apply (moment-matched scales)."""

    diag: bool = False
    causal: bool = False

    def __post_init__(self):
        for name in ("diag", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LLNSpec.{name} must be a bool, got {getattr(self, name)!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`; no block map."""
        _no_block_map("LLNSpec", options)
        causal = self.causal or causal
        _whole_sequence("LLNSpec", q, k, causal)
        _no_scale("LLNSpec", softmax_scale, q.shape[-1])
        return lln_attention(q, k, v, causal=causal, diag=self.diag)


@dataclass(frozen=True)
class ReGLASpec:
    """ReGLA (:func:`attnops.regla_attention`) in an attention layer that owns ReGLA's gates: a Hugging Face layer
    after :func:`attnops.integrations.transformers.linearize`, which gives it ``regla`` (gate and refining-gate
    projections and the output norm, :class:`attnops.nn.regla.ReGLAGates`) and keeps its input hidden states for
    them. Causal over the whole sequence: ReGLA carries a recurrent state, not a KV cache, so a cached decoding step
    is refused (``use_cache=False``; ``attnops.nn.ReGLA`` decodes with its state). ``softmax_scale`` does not apply
    (the paper's variance-reduction scale)."""

    key_shift: str = "running"
    output_norm: str = "layernorm"
    needs_module = True  # attend() receives the layer (class attribute, not a field)

    def __post_init__(self):
        if self.key_shift not in KEY_SHIFTS:
            raise ValueError(f"ReGLASpec.key_shift must be one of {KEY_SHIFTS}, got {self.key_shift!r}")
        if self.output_norm not in NORMS:
            raise ValueError(f"ReGLASpec.output_norm must be one of {NORMS}, got {self.output_norm!r}")

    def attach_to(self, layer: torch.nn.Module, hidden_size: int, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> None:
        """Gives ``layer`` ReGLA's gates (``layer.regla``, new parameters on its q projection's device and dtype)
        and keeps its input hidden states for them (a forward pre-hook); a layer that has them keeps them."""
        if hasattr(layer, "regla"):
            return
        weight = next(layer.parameters())
        layer.regla = ReGLAGates(hidden_size, num_heads, head_dim, self.output_norm, device=weight.device,
                                 dtype=weight.dtype)
        layer._attnops_hidden = None
        layer.register_forward_pre_hook(_keep_hidden_states, with_kwargs=True)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, module: Optional[torch.nn.Module] = None,
               **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`, with the layer; no block map."""
        _no_block_map("ReGLASpec", options)
        if not causal:
            raise NotImplementedError("attnops.nn.ReGLASpec: ReGLA is causal (its gates order the sequence); the "
                                      "layer asks for bidirectional attention")
        _whole_sequence("ReGLASpec", q, k, causal)
        _no_scale("ReGLASpec", softmax_scale, q.shape[-1])
        gates, hidden = getattr(module, "regla", None), getattr(module, "_attnops_hidden", None)
        if gates is None or hidden is None:
            raise RuntimeError("attnops.nn.ReGLASpec: this layer has no ReGLA gates; call "
                               "attnops.integrations.transformers.linearize(model) first (the gates are parameters "
                               "a pretrained model does not have), or use attnops.nn.ReGLA")
        module._attnops_hidden = None  # the graph keeps what it needs
        gate, refine = gates(hidden)
        if gate.shape != q.shape:
            raise ValueError(f"attnops.nn.ReGLASpec: the layer's gates are {tuple(gate.shape)}, q is {tuple(q.shape)}")
        return gates.norm(regla_attention(q, k, v, gate, refine, key_shift=self.key_shift))


def _keep_hidden_states(layer, args, kwargs):
    """The layer's input, for its ReGLA gates (transformers passes it as ``hidden_states``)."""
    layer._attnops_hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@dataclass(frozen=True)
class RoutingSpec:
    """The Routing Transformer's attention (:func:`attnops.routing_attention`) in a layer that owns its centroids:
    a Hugging Face layer after :func:`attnops.integrations.transformers.attach` (``routing_centroids``, a buffer
    ``(Hkv, num_clusters, D)`` of random unit vectors, saved with the model), moved by online k-means
    (``decay``, the paper's 0.999) from each training call's queries and keys, as ``attnops.nn.RoutingAttention``
    does. Each query attends the keys of its own cluster, causal or not, the model's softmax scale; a cached
    decoding step attends the cached keys of its cluster (exact)."""

    num_clusters: int = 16
    decay: float = 0.999
    needs_module = True

    def __post_init__(self):
        check_routing_args(self.num_clusters, self.decay)

    def attach_to(self, layer: torch.nn.Module, hidden_size: int, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> None:
        """Gives ``layer`` its centroids (a layer that has them keeps them)."""
        if hasattr(layer, "routing_centroids"):
            return
        weight = next(layer.parameters())
        centroids = torch.nn.functional.normalize(torch.randn(num_kv_heads, self.num_clusters, head_dim), dim=-1)
        layer.register_buffer("routing_centroids", centroids.to(weight.device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: Optional[float] = None, module: Optional[torch.nn.Module] = None,
               **options) -> torch.Tensor:
        """As :meth:`SoftmaxSpec.attend`, with the layer; no block map. In training the centroids then move."""
        _no_block_map("RoutingSpec", options)
        centroids = getattr(module, "routing_centroids", None)
        if centroids is None:
            raise RuntimeError("attnops.nn.RoutingSpec: this layer has no centroids; call "
                               "attnops.integrations.transformers.attach(model, RoutingSpec(...)) first, or use "
                               "attnops.nn.RoutingAttention")
        if centroids.shape[0] != k.shape[2] or centroids.shape[2] != q.shape[-1]:
            raise ValueError(f"attnops.nn.RoutingSpec: the layer's centroids are {tuple(centroids.shape)}, for "
                             f"{k.shape[2]} kv heads of dim {q.shape[-1]}")
        out = routing_attention(q, k, v, centroids.to(q.dtype), causal=causal, softmax_scale=softmax_scale)
        if module.training:
            update_centroids(centroids, q.detach(), k.detach(), self.decay)
        return out


def _no_scale(spec: str, softmax_scale: Optional[float], head_dim: int) -> None:
    """The kernelised specs have no softmax scale: the default one (None, or ``D ** -0.5`` that models pass as
    ``scaling``) is the absence of a choice; any other value would be silently dropped, so it is refused."""
    if softmax_scale is not None and abs(softmax_scale - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        raise NotImplementedError(f"attnops.nn.{spec}: softmax_scale={softmax_scale} (not the default "
                                  f"{head_dim ** -0.5:.6g}) has no meaning in this attention")


# The specs whose op takes packed sequences (cu_seqlens) but no mask: padding runs as sequences (attend_unpadded).
VARLEN_SPECS = (MoBASpec, LinearAttentionSpec)


def attend_unpadded(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
                    documents: Optional[torch.Tensor], causal: bool, softmax_scale: Optional[float],
                    **mods) -> torch.Tensor:
    """Self-attention of a padded (``keep (B, S)``, True = a token) and / or packed (``documents (B, S)``) batch
    on a :data:`VARLEN_SPECS` spec, as flash-attention's unpadded path runs it: the kept tokens of every (row,
    document) become one sequence, in order, through the op's ``cu_seqlens`` form; padded positions of the
    output are zeros. ``q (B, S, H, D)``, ``k, v (B, S, Hkv, D)`` -> ``(B, S, H, Dv)``."""
    B, S = q.shape[:2]
    flat = [t.reshape(B * S, *t.shape[2:]) for t in (q, k, v)]
    keep = torch.ones(B, S, dtype=torch.bool, device=q.device) if keep is None else keep.to(q.device)
    doc = torch.zeros(B, S, dtype=torch.int64, device=q.device) if documents is None else \
        documents.to(q.device).expand(B, S)
    seq = (torch.arange(B, device=q.device)[:, None] * (S + 1) + doc).flatten()
    idx = keep.flatten().nonzero().flatten()
    _, counts = torch.unique_consecutive(seq[idx], return_counts=True)
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    qs, ks, vs = (t[idx] for t in flat)
    if isinstance(spec, MoBASpec):
        out = moba_attention(qs, ks, vs, block_size=spec.block_size, topk=spec.topk, causal=spec.causal or causal,
                             routing=spec.routing, softmax_scale=softmax_scale, cu_seqlens=cu,
                             max_seqlen=int(counts.max()) if idx.numel() else 0, **mods)
    elif isinstance(spec, LinearAttentionSpec):
        if mods:
            raise NotImplementedError(f"{' and '.join(sorted(mods))}: the LinearAttentionSpec cannot apply it")
        out = linear_attention(qs[None], ks[None], vs[None], feature_map=spec.feature_map, normalize=spec.normalize,
                               decay=spec.decay, causal=spec.causal or causal, softmax_scale=softmax_scale,
                               cu_seqlens=cu)[0]
    else:
        raise TypeError(f"attend_unpadded takes a MoBASpec or LinearAttentionSpec, got {type(spec).__name__}")
    full = out.new_zeros(B * S, *out.shape[1:])
    full[idx] = out
    return full.view(B, S, *out.shape[1:])


AttentionSpec = Union[SoftmaxSpec, BlockSparseSpec, MoBASpec, LinearAttentionSpec, LowRankKeySpec, MoHSpec, AgentSpec,
                      FlowSpec, LLNSpec, SEASpec, HyperSpec, ReGLASpec, RoutingSpec]
# The specs whose attention is a softmax over scores, which take softcap / alibi_slopes / sinks.
SCORE_MOD_SPECS = (SoftmaxSpec, BlockSparseSpec, MoBASpec)
SPECS = (SoftmaxSpec, BlockSparseSpec, MoBASpec, LinearAttentionSpec, LowRankKeySpec, MoHSpec, AgentSpec, FlowSpec, LLNSpec,
         SEASpec, HyperSpec, ReGLASpec, RoutingSpec)


def resolve_spec(spec: Optional[AttentionSpec], default: AttentionSpec, name: str = "attention") -> AttentionSpec:
    """``spec``, or ``default`` when None; anything but a spec instance is a TypeError naming ``name``."""
    if spec is None:
        return default
    if not isinstance(spec, SPECS):
        raise TypeError(f"{name} must be one of {[s.__name__ for s in SPECS]}, got {type(spec).__name__}")
    return spec
