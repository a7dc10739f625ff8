"""Drop-in modules built on the attnops ops, attention specs, and swap / unswap.

Specs (``*Spec``: which attention a module runs, not layers) are frozen dataclasses with one method,
``attend``: ``SoftmaxSpec`` (exact softmax: full, causal, window), ``BlockSparseSpec``, ``MoBASpec``,
``LinearAttentionSpec``, ``LowRankKeySpec``, and the composed methods' ``MoHSpec``, ``AgentSpec``, ``FlowSpec``,
``LLNSpec``, ``SEASpec``, ``HyperSpec``, ``ReGLASpec`` and ``RoutingSpec`` (methods with per-layer state, for
``attnops.integrations.transformers.attach``). Modules with a method's own parameters: ``MoHAttention``,
``RoutingAttention``, ``Aaren``, ``AgentAttention`` (the authors' vision block, their parameter names),
``LandmarkAttention``, ``ReGLA``. The specs' former names (``Dense``, ``BlockSparse``, ``MoBA``, ``Linear``, ``LowRankKey``; ``Dense`` and ``Linear`` read as torch layers)
still work for one release, with a DeprecationWarning.
"""

import warnings

from attnops.nn.aaren import Aaren
from attnops.nn.agent import AgentAttention
from attnops.nn.attention import Attention
from attnops.nn.block_gate import BlockGate
from attnops.nn.landmark import LandmarkAttention
from attnops.nn.linear import LinearAttention
from attnops.nn.moh import MoHAttention
from attnops.nn.mqa import MultiQueryAttention
from attnops.nn.regla import ReGLA
from attnops.nn.multihead import MultiheadAttention, SwapReport, swap, unswap
from attnops.nn.rotary import Rotary
from attnops.nn.routing import RoutingAttention
from attnops.nn.specs import (AgentSpec, BlockSparseSpec, FlowSpec, HyperSpec, LinearAttentionSpec, LLNSpec,
                              LowRankKeySpec, MoBASpec, MoHSpec, ReGLASpec, RoutingSpec, SEASpec,
                              SoftmaxSpec)

_DEPRECATED = {"Dense": SoftmaxSpec, "BlockSparse": BlockSparseSpec, "MoBA": MoBASpec, "Linear": LinearAttentionSpec,
               "LowRankKey": LowRankKeySpec}


def __getattr__(name):
    spec = _DEPRECATED.get(name)
    if spec is None:
        raise AttributeError(f"module 'attnops.nn' has no attribute {name!r}")
    warnings.warn(f"attnops.nn.{name} is deprecated: use attnops.nn.{spec.__name__}", DeprecationWarning, stacklevel=2)
    return spec


__all__ = ["Aaren", "AgentAttention", "AgentSpec", "Attention", "BlockGate", "BlockSparseSpec", "FlowSpec",
           "HyperSpec", "LLNSpec", "LandmarkAttention", "LinearAttention", "LinearAttentionSpec", "LowRankKeySpec",
           "MoBASpec", "MoHAttention", "MoHSpec", "MultiQueryAttention", "MultiheadAttention", "ReGLA", "ReGLASpec",
           "Rotary", "RoutingAttention", "RoutingSpec", "SEASpec", "SoftmaxSpec", "SwapReport", "swap", "unswap"]
