"""The randomness of HyperAttention, in one place so that the op and its oracle draw alike.

sortLSH (the authors' ``AngularLSH``): ``r`` Gaussian directions; a vector's code is the Gray code of its sign
bits (``b ^ (b >> 1)``, the authors' unit-Hamming-distance ordering), so neighbouring codes differ in one hyperplane
and sorting by code puts similar directions next to each other. A token's code depends on its vector only, so the
op hashes every token once and the causal recursion slices the codes. Projections and samples come from one CPU
generator seeded by the call's ``seed``: the same call gives the same result on every device.
"""

from __future__ import annotations

import torch


def lsh_projections(generator: torch.Generator, head_dim: int, num_projections: int) -> torch.Tensor:
    """``(D, r)`` float64 Gaussian directions, the first draw of ``generator``."""
    return torch.randn(head_dim, num_projections, generator=generator, dtype=torch.float64)


def lsh_codes(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """``x (B, S, Hx, D)``, ``projections (D, r)`` -> ``(B, S, Hx)`` int64 codes in ``[0, 2^r)``. Hashed in float32
    (float64 for float64 inputs); a NaN component counts as a negative projection."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        signs = (x.to(work) @ projections.to(x.device, work)) > 0  # (B, S, Hx, r)
        bits = 1 << torch.arange(projections.shape[1], device=x.device)
        b = (signs.long() * bits).sum(-1)
        return b ^ (b >> 1)


def draw_samples(generator: torch.Generator, n_key: int, batch: int, heads: int, m: int,
                 device: torch.device) -> torch.Tensor:
    """``(batch, heads, m)`` int64, uniform in ``[0, n_key)`` with replacement (the authors' ``torch.randint``):
    positions in each head's sorted key order."""
    return torch.randint(n_key, (batch, heads, m), generator=generator).to(device)
