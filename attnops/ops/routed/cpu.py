"""The C++ backend of the MoBA router: csrc/cpu/kernels/moba_route.cpp."""

from attnops.core import backends, dispatch
from attnops.ops.routed import library as lib

if backends.EXTENSION:
    dispatch.register("moba_route", "cpu", lib.backend(lib.FWD))
