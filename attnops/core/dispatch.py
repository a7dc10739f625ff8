"""The one dispatcher: picks the backend that runs an op for the tensors of one call.

Each attention family registers, per backend, the function the dispatcher calls for an op
(``register(op, backend, fn)``, from its own ``cpu.py`` / ``triton.py`` / ``reference.py`` ...); all
implementations of one op share the signature of the family's float64 reference.

=============  ==========================================  ==========================
backend        implementations                             runs
=============  ==========================================  ==========================
``cpu``        the C++ kernels (csrc/cpu, ``attnops._C``)  CPU (and meta) tensors
``triton``     the families' ``triton.py``                 CUDA tensors (CPU tensors
                                                           under ``TRITON_INTERPRET=1``)
``cuda``       csrc/cuda kernels (``attnops._C``)          CUDA tensors
``composite``  vectorised PyTorch: linear attention's      anything; ops with no
               chunk form, and the fallback of the core,   kernel of the device's own
               decoding and the MoBA router (query         (or a build without the
               chunks, never N x N)                        extension: one warning)
``reference``  the families' ``reference.py`` (float64    anything; builds N x N
               oracles)
=============  ==========================================  ==========================

Automatic choice: CPU tensors -> ``cpu``; CUDA tensors -> ``triton``, else ``cuda`` where the op
has a CUDA kernel; then ``composite`` where the op has one there. ``backend=`` on an op, or the
``ATTNOPS_BACKEND`` environment variable, forces one. A backend that cannot run the call is a
clear error, never a silent slow path: in particular the N x N reference runs only when asked for
by name. The families register when ``attnops`` is imported, so under torch.compile ``resolve`` is a
dict lookup (no import inside a compiled region).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Set

import torch

from attnops.core import backends

BACKENDS = ("cpu", "triton", "cuda", "composite", "reference")

# Preference order per device type when no backend is forced. Meta tensors go to the registered
# C++ operators, whose fake implementations infer output shapes (models built on "meta").
_AUTO = {"cpu": ("cpu", "composite"), "cuda": ("triton", "cuda", "composite"), "meta": ("cpu", "composite")}

_IMPLS: Dict[str, Dict[str, Callable]] = {}
# The backends an op is built to have (a family's cpu.py expects "cpu" even where the extension is missing): when
# automatic choice has to pass one over, the fallback it lands on warns once, with the remedy.
_EXPECTED: Dict[str, Set[str]] = {}
_WARNED: Set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested (or the only suitable) backend cannot run this call."""


def register(op: str, backend: str, fn: Callable) -> Callable:
    """Makes ``fn`` the ``backend`` implementation of ``op`` (a family's backend module calls this
    when it loads). Returns ``fn``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn
    return fn


def expect(op: str, backend: str) -> None:
    """Declares that ``op`` has a ``backend`` implementation in a full build (registered or not here)."""
    _EXPECTED.setdefault(op, set()).add(backend)


def unavailable_reason(backend: str) -> str:
    """Why ``backend`` cannot run here ("" when it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cpu":
        return backends.EXTENSION_REASON
    if backend == "triton":
        return backends.TRITON_REASON
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not any("cuda" in impls for impls in _IMPLS.values()):
            return "attnops._C was built without CUDA (torch without CUDA or no nvcc)"
    return ""


def name_of(op: str, fn: Callable) -> Optional[str]:
    """The backend under which ``fn`` (a :func:`resolve` result) is registered for ``op``, or None."""
    return next((name for name, impl in _IMPLS.get(op, {}).items() if impl is fn), None)


def is_available(backend: str) -> bool:
    return not unavailable_reason(backend)


# torch.device.type builds its string on every read (~0.5 us, more than the rest of a dispatch); the devices a
# process meets are few.
_DEVICE_TYPES: Dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type``, remembered per device."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def _runs_on(name: str, device: torch.device) -> bool:
    if name in ("reference", "composite"):
        return True
    kind = device_type(device)
    if name == "cpu":
        return kind in ("cpu", "meta")
    if name == "triton":
        return kind == "cuda" or (kind == "cpu" and backends.INTERPRET)
    if name == "cuda":
        return kind == "cuda"
    return False


def resolve(op: str, device: torch.device, backend: Optional[str] = None, api: Optional[str] = None) -> Callable:
    """The implementation of ``op`` for tensors on ``device``; ``api``: the public function the caller
    called (named in errors and warnings; default ``op``).

    ``backend`` (or ``ATTNOPS_BACKEND``) forces a backend; otherwise the first suitable one for
    the device type is taken. When that passes over a backend the op is built to have (the C++ kernels
    of a build without the extension) and lands on ``composite``, a warning says so once per process.
    """
    api = api or op
    forced = backend or env_backend()
    if forced is not None:
        try:
            return _load(op, forced, device)
        except BackendUnavailableError as e:
            raise BackendUnavailableError(f"attnops.{api}: {e}") from None
    candidates = _AUTO.get(device_type(device), ())
    reasons, missing = [], []
    for name in candidates:
        try:
            fn = _load(op, name, device)
        except BackendUnavailableError as e:
            reasons.append(str(e))
            if name in _EXPECTED.get(op, ()) and unavailable_reason(name):
                missing.append(name)
            continue
        if missing and name == "composite":
            _warn_fallback(api, missing)
        return fn
    detail = "; ".join(reasons) if reasons else f"no backend runs on device type {device_type(device)!r}"
    raise BackendUnavailableError(f"attnops.{api}: no backend for {device} tensors ({detail})")


# os.environ.get("ATTNOPS_BACKEND") takes ~1 us when the variable is unset (os._Environ raises and catches a
# KeyError inside), once per op call; its backing dict answers in ~30 ns and holds every change made through
# os.environ (monkeypatch.setenv included).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("ATTNOPS_BACKEND") if _ENV_DATA is not None else None


def env_backend() -> Optional[str]:
    """The backend that ``ATTNOPS_BACKEND`` forces, or None (unset or empty)."""
    if _ENV_DATA is None:
        return os.environ.get("ATTNOPS_BACKEND") or None
    raw = _ENV_DATA.get(_ENV_KEY)
    if raw is None:
        return None
    return os.environ.decodevalue(raw) or None


def _warn_fallback(api: str, missing) -> None:
    if "fallback" in _WARNED:
        return
    _WARNED.add("fallback")
    reasons = "; ".join(f"{name}: {unavailable_reason(name)}" for name in missing)
    warnings.warn(f"attnops.{api} runs on the pure-PyTorch fallback (exact, several times slower than the "
                  f"kernels), because {reasons}. This warning is shown once.", RuntimeWarning, stacklevel=4)


def _load(op: str, name: str, device: torch.device) -> Callable:
    reason = unavailable_reason(name)  # raises on an unknown name
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    if not _runs_on(name, device):
        raise BackendUnavailableError(f"backend {name!r} cannot run tensors on {device}")
    fn = _IMPLS.get(op, {}).get(name)
    if fn is None:
        raise BackendUnavailableError(f"backend {name!r} has no kernel for {op}")
    return fn
