"""The C++ backend of the MoBA router: csrc/cpu/kernels/moba_route.cpp."""

from attnops.core import backends, dispatch
from attnops.ops.routed import library as lib

dispatch.expect("moba_route", "cpu")  # without the extension: the fallback (or a clear error), never silence
if backends.EXTENSION:
    dispatch.register("moba_route", "cpu", lib.backend(lib.FWD))
    # token routing's per-row selection (ops/routed/token.py: torch.topk where this leaves a row ambiguous)
    dispatch.register("moba_token_select", "cpu", lambda gate, **kw: lib.TOKEN_SELECT.call(gate=gate, **kw))
    dispatch.register("moba_token_pairs", "cpu", lambda chosen, **kw: lib.TOKEN_PAIRS.call(chosen=chosen, **kw))
    dispatch.register("moba_token_merge", "cpu", lambda out, **kw: lib.TOKEN_MERGE.call(out=out, **kw))
