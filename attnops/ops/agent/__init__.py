"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear
Attention"): a few agent tokens pooled from the queries gather the keys and values with softmax
attention, then every query attends the agents. Two calls of the exact softmax core, O(N n D).

    op.py         agent_attention, agent_tokens (the pooled agents)
    reference.py  the float64 oracle from the paper's equations
"""

from attnops.ops.agent.op import agent_attention, agent_tokens

__all__ = ["agent_attention", "agent_tokens"]
