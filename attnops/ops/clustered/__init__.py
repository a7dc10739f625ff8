"""Routing Transformer attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing
Transformers"): queries and keys are assigned to the nearest of a few centroids (shared by q and k), and each
query attends the keys of its own cluster. Runs on the exact softmax core with per-row key bounds in cluster order.

    op.py         routing_attention, cluster_assignment, update_centroids
    reference.py  the float64 oracle (a dense cluster mask)
"""

from attnops.ops.clustered.op import cluster_assignment, routing_attention, update_centroids

__all__ = ["cluster_assignment", "routing_attention", "update_centroids"]
