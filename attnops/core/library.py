"""Operators from one argument list each.

Every attnops operator (C++ or Triton) is an :class:`OpDef`: a name and a list of :class:`Arg`. From
that one list come the schema (defined here, in Python, for the C++ operators too: csrc registers
kernels only, and a C++ signature that does not fit the schema fails when the extension loads), the
argument binding that the fake implementations and the autograd glue read by name, and the calls the
backend wrappers make by name. Adding an argument is one edit of a list, plus the kernels that read
it; the glue in between needs none.

    >>> FWD = OpDef("my_fwd", [Arg("q", "Tensor"), Arg("scale", "float"), Arg("flag", "bool", "False")],
    ...             "(Tensor, Tensor)")
    >>> FWD.define()
    >>> FWD.bind((q, 0.5))          # {"q": q, "scale": 0.5, "flag": False}
    >>> FWD.call(q=q, scale=0.5)    # torch.ops.attnops.my_fwd(q, 0.5, False)
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

NAMESPACE = "attnops"
# Every operator schema of the package, C++ and Triton alike.
_LIB = torch.library.Library(NAMESPACE, "DEF")
# All operators, by name: the registered-operator test opchecks each of them.
OPS: Dict[str, "OpDef"] = {}

_DEFAULTS = {"False": False, "True": True, "None": None}


class Arg(NamedTuple):
    """One operator argument: its schema type (``Tensor``, ``Tensor?``, ``int``, ``float``, ``bool``)
    and, for trailing arguments, the schema's default."""

    name: str
    type: str
    default: Optional[str] = None

    @property
    def value(self):
        """The default as a Python value."""
        if self.default in _DEFAULTS:
            return _DEFAULTS[self.default]
        return float(self.default) if "." in self.default else int(self.default)


class OpDef:
    """An operator: ``name``, its arguments and its return type (schema syntax)."""

    def __init__(self, name: str, args: Sequence[Arg], returns: str):
        self.name, self.args, self.returns = name, tuple(args), returns
        self.names = tuple(a.name for a in self.args)
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError(f"{name}: duplicate argument names")

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def signature(self) -> str:
        """``(Tensor q, ..., bool map_max=False) -> (Tensor, Tensor)``."""
        args = ", ".join(f"{a.type} {a.name}" + (f"={a.default}" if a.default is not None else "") for a in self.args)
        return f"({args}) -> {self.returns}"

    def variant(self, name: str) -> "OpDef":
        """The same arguments under another name (a backend's twin operator)."""
        return OpDef(name, self.args, self.returns)

    def define(self) -> "OpDef":
        """Defines the schema in the ``attnops`` namespace (for operators whose kernels register
        themselves: the C++ ones)."""
        _LIB.define(f"{self.name}{self.signature}")
        OPS[self.name] = self
        return self

    def custom_op(self, fn: Callable) -> Callable:
        """A Python operator (the Triton kernels' launchers) with this schema; ``fn`` takes the
        arguments by name."""
        op = torch.library.custom_op(self.qualname, lambda *args: fn(**self.bind(args)), mutates_args=(),
                                     schema=self.signature)
        OPS[self.name] = self
        return op

    @property
    def op(self):
        return getattr(torch.ops.attnops, self.name).default

    def bind(self, args: Tuple, kwargs: Optional[dict] = None) -> dict:
        """Positional (and keyword) arguments of a call -> ``{name: value}`` in argument order, defaults
        filled in."""
        given = dict(zip(self.names, args))
        if kwargs:
            unknown = set(kwargs) - set(self.names)
            if unknown:
                raise TypeError(f"{self.name}: unknown arguments {sorted(unknown)}")
            given.update(kwargs)
        bound = {}
        for a in self.args:
            if a.name in given:
                bound[a.name] = given[a.name]
            elif a.default is not None:
                bound[a.name] = a.value
            else:
                raise TypeError(f"{self.name}: missing argument {a.name!r}")
        return bound

    def call(self, op: Optional[Callable] = None, **kwargs):
        """Calls the operator (or ``op``, a twin with the same arguments) with arguments by name."""
        return (op or self.op)(*self.bind((), kwargs).values())

    def grads(self, **named) -> Tuple:
        """A backward's result: the named gradients in argument order, None for every other argument."""
        out: List = [None] * len(self.args)
        for name, g in named.items():
            out[self._index[name]] = g
        return tuple(out)

    def register_fake(self, fn: Callable) -> None:
        """``fn(**arguments)`` as the fake (meta) implementation."""
        torch.library.register_fake(self.qualname)(lambda *args, **kwargs: fn(**self.bind(args, kwargs)))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's dtype for inputs of ``dtype``: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_forward_only(opdef: OpDef, public_name: str) -> None:
    """Backward through a forward-only operator is a clear error, not silently wrong."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"attnops.{public_name} is forward-only (inference); "
                                  "train with attnops.attention / block_sparse_attention")

    torch.library.register_autograd(opdef.qualname, backward, setup_context=lambda ctx, inputs, output: None)
