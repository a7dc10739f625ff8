"""Suite-wide test conventions (see DESIGN.md):

- every kernel test runs per implementation (the `impl` fixture): the C++ kernels in both backward
  algorithms, and the Triton kernels, on CUDA tensors when a GPU is present, else on CPU tensors
  under TRITON_INTERPRET=1 (set here, before attnops is imported, on machines without a GPU);
- every test is seeded;
- every output a kernel allocates is poisoned with NaN first, so an element it forgets to write
  fails the comparison with the reference: C++ kernels through attnops._C's debug switch, Python
  launchers (Triton) by NaN-filling torch.empty* calls made from attnops code (as fla does);
- `impl` runs the C++ backward in both of its algorithms (fused / two-pass); the fused one with each (batch, kv
  head)'s key tiles split into three tasks (the form it takes when B * Hkv cannot fill the threads: one task is its
  special case, which the size-based choice runs);
- `impl` and `fwd_impl` also run the pure-PyTorch fallback (`composite`, id `composite`) where the family has
  one (low-rank keys have none: those items are deselected);
- `impl` and `fwd_impl` run the C++ kernels at every ISA level this CPU can execute (csrc/cpu/isa.h):
  the default (best) level under the plain ids `cpu-*`, the others as `cpu-*-<level>`; levels the
  CPU lacks are skipped with the reason. `cpu_impl` runs those levels alone, for shapes too long for
  the Triton interpreter;
- under the interpreter, a `@triton.jit` helper called inside a launch does not re-patch the language modules the
  launch patched (`_patch_language_once_per_launch`: the same kernels, a quarter less suite time).
"""

import contextlib
import os
import sys
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("ATTNOPS_TRITON_AUTOTUNE", "0")  # one config per kernel: see kernels/triton
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription

from attnops.core import backends, dispatch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = dispatch.is_available("triton")


def _patch_language_once_per_launch():
    """Test time only: Triton's interpreter patches the language modules a kernel's globals name when it launches
    (undone when it returns), and again at every call of a ``@triton.jit`` function inside it (``tl.zeros`` is one):
    ~2 ms a call, a third of an interpreted test's time, as each program of a launch calls its helpers afresh. Inside
    a launch a helper whose language modules the launch (or an earlier helper) patched already skips the re-patch,
    which would change nothing. A call is a launch's or a helper's by its caller (the interpreter's launch or helper
    ``__call__``); any other caller patches as before. Applied only where the interpreter has the shape this was
    written against (triton 3.x: a module-level ``_patch_lang`` whose scope the launch restores and helper calls
    discard)."""
    import inspect

    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    helper = getattr(getattr(interpreter, "InterpretedFunction", None), "__call__", None)
    if patch is None or launch is None or helper is None:
        return
    if "patch_scope.restore()" not in inspect.getsource(launch) or "_patch_lang(self.fn)" not in inspect.getsource(
            helper):
        return
    import triton.language as tl

    launch_code, helper_code = launch.__code__, helper.__code__
    # The language modules patched since the running launch began; never empty inside a launch (the interpreter
    # asserts a kernel names one), empty outside any, and launches do not nest.
    state = {"patched": frozenset()}
    langs_of = {}

    def langs(fn):
        if fn not in langs_of:
            langs_of[fn] = frozenset(v.__name__ for v in fn.__globals__.values()
                                     if inspect.ismodule(v) and v in (tl, tl.core))
        return langs_of[fn]

    class _Unpatched:
        def restore(self):
            pass

    def patch_lang(fn):
        caller = sys._getframe(1).f_code
        if caller is helper_code and state["patched"]:
            if langs(fn) <= state["patched"]:
                return _Unpatched()
            state["patched"] |= langs(fn)  # patched as the interpreter does (the helper discards the scope)
            return patch(fn)
        scope = patch(fn)
        if caller is not launch_code:
            return scope
        state["patched"] = langs(fn)
        restore = scope.restore

        def restore_and_leave():
            state["patched"] = frozenset()
            restore()

        scope.restore = restore_and_leave
        return scope

    interpreter._patch_lang = patch_lang


if INTERPRET and TRITON:
    _patch_language_once_per_launch()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _called_from_attnops() -> bool:
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "").startswith("attnops.")


def _poisoning(fn):
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: fake tensors, nothing to poison, and no frame inspection (a
            return fn(*args, **kwargs)     # graph break when dynamo was initialised before this wrapper existed)
        out = fn(*args, **kwargs)
        if (
            isinstance(out, torch.Tensor)
            and (out.is_floating_point() or out.dtype in (torch.int32, torch.int64))
            and not isinstance(out, torch._subclasses.FakeTensor)
            and out.device.type != "meta"
            and _called_from_attnops()
        ):
            out.fill_(float("nan") if out.is_floating_point() else -1)  # -1: no valid LUT entry
        return out

    return wrapper


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    previous = backends.set_poison_outputs(True)
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    torch.empty = _poisoning(torch.empty)
    torch.empty_like = _poisoning(torch.empty_like)
    torch.Tensor.new_empty = _poisoning(torch.Tensor.new_empty)
    yield
    torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
    backends.set_poison_outputs(previous)


class Impl(NamedTuple):
    backend: str
    device: str
    cpu_backward: int = 0  # C++ backward algorithm: 3 fused in 3 key-tile tasks, 2 two-pass (0: the size-based choice)
    cpu_isa: str = ""  # C++ kernels' ISA level ("": the default one)

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"


_NO_TRITON = f"triton backend unavailable: {dispatch.unavailable_reason('triton')}" if not TRITON else ""
_TRITON_IMPLS = [
    pytest.param(Impl("triton", "cpu"), id="triton-interpret",
                 marks=pytest.mark.skipif(not (TRITON and INTERPRET),
                                          reason=_NO_TRITON or "a GPU is present: the kernels run compiled (triton-cuda)")),
    pytest.param(Impl("triton", "cuda"), id="triton-cuda",
                 marks=pytest.mark.skipif(not (TRITON and torch.cuda.is_available() and not INTERPRET),
                                          reason="no CUDA device: the kernels run under the interpreter (triton-interpret)")),
]


# Every level a build can have, most portable first; the C++ extension reports which run here.
_CPU_ISA_LEVELS = ("generic", "avx2", "avx512", "amx")
_CPU_ISA = backends.cpu_isa() if backends.EXTENSION else {"kernels": None, "levels": []}


def _cpu_params(backwards):
    params = []
    for level in (_CPU_ISA["kernels"], *[lv for lv in reversed(_CPU_ISA_LEVELS) if lv != _CPU_ISA["kernels"]]):
        if level is None:
            continue
        for name, mode in backwards:
            suffix = "" if level == _CPU_ISA["kernels"] else f"-{level}"
            params.append(pytest.param(
                Impl("cpu", "cpu", mode, level), id=f"cpu{name}{suffix}",
                marks=pytest.mark.skipif(level not in _CPU_ISA["levels"],
                                         reason=f"this CPU or build cannot run ISA level {level} "
                                                f"(runnable: {', '.join(_CPU_ISA['levels'])})")))
    return params


@contextlib.contextmanager
def _cpu_level(param):
    """Runs the C++ kernels at param's ISA level and backward algorithm for the duration."""
    if param.backend != "cpu":  # (a GPU machine may test the Triton kernels without the C++ extension)
        yield param
        return
    from attnops import _C

    previous_mode = _C._set_backward_mode(param.cpu_backward)
    previous_isa = _C._set_cpu_isa(param.cpu_isa) if param.cpu_isa else None
    try:
        yield param
    finally:
        _C._set_backward_mode(previous_mode)
        if previous_isa:
            _C._set_cpu_isa(previous_isa)


# The pure-PyTorch fallback (the backend that runs where the extension is not built): the families that have one.
_COMPOSITE = [pytest.param(Impl("composite", "cpu"), id="composite")]


@pytest.fixture(params=[*_cpu_params([("-fused", 3), ("-two_pass", 2)]), *_TRITON_IMPLS, *_COMPOSITE])
def impl(request):
    """A kernel implementation to test, forward and backward: the C++ kernels with each backward
    algorithm at each ISA level, the Triton kernels."""
    with _cpu_level(request.param) as param:
        yield param


@pytest.fixture(params=[*_cpu_params([("", 0)]), *_TRITON_IMPLS, *_COMPOSITE])
def fwd_impl(request):
    """One entry per backend and C++ ISA level (for tests where the CPU backward algorithm does not matter)."""
    with _cpu_level(request.param) as param:
        yield param


@pytest.fixture(params=_cpu_params([("", 0)]))
def cpu_impl(request):
    """The C++ kernels at each ISA level this CPU can execute, alone (shapes too long for the Triton interpreter)."""
    with _cpu_level(request.param) as param:
        yield param


# Families without a pure-PyTorch fallback: their `composite` items are deselected (not skipped one by one).
_NO_FALLBACK = ("lowrank",)


def pytest_collection_modifyitems(config, items):
    dropped = [item for item in items if _without_fallback(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _without_fallback(item)]


def _without_fallback(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    uses = any(isinstance(params.get(name), Impl) and params[name].backend == "composite" for name in ("impl", "fwd_impl"))
    return uses and any(part in _NO_FALLBACK for part in item.path.parts)
