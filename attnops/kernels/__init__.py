"""Kernel backends: ``reference`` (the oracle), ``cpu`` (C++), ``triton``, ``cuda``. Chosen by attnops.dispatch."""
