"""The one dispatcher: picks the backend that runs an op for the tensors of one call.

Backends are modules that expose one function per op (same name, same signature as the oracle in
``attnops.kernels.reference``) plus ``AVAILABLE`` and ``UNAVAILABLE_REASON``:

=============  ==========================================  ==========================
backend        module                                      runs
=============  ==========================================  ==========================
``cpu``        ``attnops.kernels.cpu`` (C++, csrc/cpu)     CPU tensors
``triton``     ``attnops.kernels.triton``                  CUDA tensors (CPU tensors
                                                           under ``TRITON_INTERPRET=1``)
``cuda``       ``attnops.kernels.cuda`` (csrc/cuda)        CUDA tensors
``composite``  ``attnops.kernels.composite`` (vectorised   anything; ops with no
               PyTorch: linear attention's chunk form)     kernel of the device's own
``reference``  ``attnops.kernels.reference``               anything; builds N x N
=============  ==========================================  ==========================

Automatic choice: CPU tensors -> ``cpu``; CUDA tensors -> ``triton``, else ``cuda`` where the op
has a CUDA kernel; then ``composite`` where the op has one there. ``backend=`` on an op, or the
``ATTNOPS_BACKEND`` environment variable, forces one. A backend that cannot run the call is a
clear error, never a silent slow path: in particular the N x N reference runs only when asked for
by name.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional

import torch

BACKENDS = ("cpu", "triton", "cuda", "composite", "reference")

_MODULES = {
    "cpu": "attnops.kernels.cpu",
    "triton": "attnops.kernels.triton",
    "cuda": "attnops.kernels.cuda",
    "composite": "attnops.kernels.composite",
    "reference": "attnops.kernels.reference",
}

# Preference order per device type when no backend is forced. Meta tensors go to the registered
# C++ operators, whose fake implementations infer output shapes (models built on "meta").
_AUTO = {"cpu": ("cpu", "composite"), "cuda": ("triton", "cuda", "composite"), "meta": ("cpu", "composite")}


class BackendUnavailableError(RuntimeError):
    """The requested (or the only suitable) backend cannot run this call."""


# Backend modules by name, imported when this module loads (see _preload) so that resolve() is a
# dict lookup that torch.compile traces; importlib inside a compiled region is a graph break.
_LOADED: dict = {}


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def is_available(name: str) -> bool:
    try:
        return bool(backend_module(name).AVAILABLE)
    except ImportError:
        return False


def _runs_on(name: str, device: torch.device) -> bool:
    if name in ("reference", "composite"):
        return True
    if name == "cpu":
        return device.type in ("cpu", "meta")
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    if name == "cuda":
        return device.type == "cuda"
    return False


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The implementation of ``op`` for tensors on ``device``.

    ``backend`` (or ``ATTNOPS_BACKEND``) forces a backend; otherwise the first suitable one for
    the device type is taken.
    """
    forced = backend or os.environ.get("ATTNOPS_BACKEND") or None
    if forced is not None:
        return _load(op, forced, device)
    candidates = _AUTO.get(device.type, ())
    reasons = []
    for name in candidates:
        try:
            return _load(op, name, device)
        except BackendUnavailableError as e:
            reasons.append(str(e))
    detail = "; ".join(reasons) if reasons else f"no backend runs on device type {device.type!r}"
    raise BackendUnavailableError(f"attnops.{op}: no backend for {device} tensors ({detail})")


def _load(op: str, name: str, device: torch.device) -> Callable:
    try:
        module = backend_module(name)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} failed to import: {e}") from e
    if not getattr(module, "AVAILABLE", False):
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {getattr(module, 'UNAVAILABLE_REASON', '')}")
    if not _runs_on(name, device):
        raise BackendUnavailableError(f"backend {name!r} cannot run tensors on {device}")
    fn = getattr(module, op, None)
    if fn is None:
        raise BackendUnavailableError(f"backend {name!r} has no kernel for {op}")
    return fn


def _preload() -> None:
    names = ["cpu", "composite", "reference"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        names += ["triton", "cuda"]
    for name in names:
        try:
            backend_module(name)
        except ImportError:
            pass  # reported as unavailable when asked for


_preload()
