"""One module per op family; importing it registers the family's case builders."""

from attnops.bench.cases import attention, composed, decode, linear, lowrank, routed, varlen  # noqa: F401
