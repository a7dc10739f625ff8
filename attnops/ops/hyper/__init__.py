"""HyperAttention (Han et al. 2023, "HyperAttention: Long-context Attention in Near-Linear Time"): sortLSH finds
the large entries (queries and keys sorted by an angular LSH code, attention on the diagonal blocks of the sorted
order), uniformly sampled key columns estimate the rest, and the two combine by their log-sum-exp; the causal form
by the authors' recursive halving. Approximate by design; on the exact softmax core.

    lsh.py        the angular LSH code (Gray-ordered sign bits) and the seeded draws (projections, samples)
    op.py         hyper_attention
    reference.py  the float64 oracle (a dense weight matrix W: out = sum_j W_ij e^s_ij v_j / sum_j W_ij e^s_ij)
"""

from attnops.ops.hyper.lsh import lsh_codes
from attnops.ops.hyper.op import hyper_attention

__all__ = ["hyper_attention", "lsh_codes"]
