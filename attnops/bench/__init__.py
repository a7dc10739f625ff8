"""The benchmark harness: every attnops op beside FlashAttention (or SDPA) for speed and accuracy.

Library: ``registry`` (cases, suites), ``timer``, ``accuracy`` (the correctness gate), ``baselines``,
``runner``, ``report`` (table, JSON/CSV, plots); ``cases/<family>.py`` register each family's cases.
CLI: ``python -m attnops.bench --suite quick`` (``make bench``); ``--list`` shows suites and ops.
"""

from attnops.bench.registry import OPS, CaseSpec, Prepared, Provider, expand_cases, load_suite, register_op
from attnops.bench.runner import CaseResult, run_case, run_cases
from attnops.bench import cases  # noqa: E402,F401  (every family registers its cases)

__all__ = ["OPS", "CaseResult", "CaseSpec", "Prepared", "Provider", "expand_cases", "load_suite", "register_op",
           "run_case", "run_cases"]
