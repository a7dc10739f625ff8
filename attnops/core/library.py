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
_REQUIRED = object()  # an argument without a default


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
        # parsed once: binding runs on every call, and at S = 16 a call is tens of microseconds
        self._defaults = tuple(a.value if a.default is not None else _REQUIRED for a in self.args)
        self._required = tuple(i for i, a in enumerate(self.args) if a.default is None)
        self._tensors = tuple(i for i, a in enumerate(self.args) if a.type.startswith("Tensor"))
        if any(a.type.startswith("Tensor") and "[" in a.type for a in self.args):
            raise ValueError(f"{name}: no tensor-list arguments (call_op reads requires_grad on each tensor argument)")
        if len(self._index) != len(self.names):
            raise ValueError(f"{name}: duplicate argument names")
        self._own: Optional[Callable] = None  # the callable custom_op made (a Python operator's)
        self._autograd: Optional[type] = None  # the eager autograd.Function (register_autograd)
        self._overload = None  # torch.ops.attnops.<name>.default, once defined

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
        self._own = op
        return op

    @property
    def op(self):
        if self._overload is None:  # looked up once: torch.ops' namespace walk is 0.3 us a call
            self._overload = getattr(torch.ops.attnops, self.name).default
        return self._overload

    def bind(self, args: Tuple, kwargs: Optional[dict] = None) -> dict:
        """Positional (and keyword) arguments of a call -> ``{name: value}`` in argument order, defaults
        filled in."""
        return dict(zip(self.names, self._values(args, kwargs)))

    def _values(self, args: Tuple, kwargs: Optional[dict]) -> List:
        values = list(args) + list(self._defaults[len(args):])
        if kwargs:
            for name, value in kwargs.items():
                at = self._index.get(name)
                if at is None:
                    unknown = sorted(set(kwargs) - set(self.names))
                    raise TypeError(f"{self.name}: unknown arguments {unknown}")
                values[at] = value
        for at in self._required:
            if values[at] is _REQUIRED:
                raise TypeError(f"{self.name}: missing argument {self.names[at]!r}")
        return values

    def call(self, op: Optional[Callable] = None, **kwargs):
        """Calls the operator (or ``op``, a twin with the same arguments) with arguments by name."""
        own = op is None or op is self._own
        return call_op(op or self.op, self._values((), kwargs), self._tensors, self._autograd if own else None)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """``torch.library.register_autograd(qualname, backward, setup_context=setup_context)``, and the same pair
        as an ``autograd.Function`` that :meth:`call` runs in eager mode. The registered layer completes the
        arguments from the schema on every call that needs a gradient (``torch._library.utils.fill_defaults``,
        which re-reads the schema's argument list once per argument): ~165 us a call at the block-sparse forward's
        31 arguments, eight times the kernels of a 16-token call. :meth:`call` passes every argument already.
        Direct ``torch.ops`` calls, ``torch.compile`` and ``torch.func`` keep the registered layer."""
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context)
        self._autograd = _eager_autograd(self.name, backward, setup_context)

    def grads(self, **named) -> Tuple:
        """A backward's result: the named gradients in argument order, None for every other argument."""
        out: List = [None] * len(self.args)
        for name, g in named.items():
            out[self._index[name]] = g
        return tuple(out)

    def register_fake(self, fn: Callable) -> None:
        """``fn(**arguments)`` as the fake (meta) implementation."""
        torch.library.register_fake(self.qualname)(lambda *args, **kwargs: fn(**self.bind(args, kwargs)))


def call_op(op: Callable, args: Sequence, tensors: Sequence[int], autograd: Optional[type] = None):
    """``op(*args)``, straight to the kernel when no gradient can flow: the autograd layer that
    ``torch.library.register_autograd`` installs is Python (its no-grad branch does just this redispatch), about 5 us
    of a 25 us call at S = 16. When one can, through ``autograd`` (:meth:`OpDef.register_autograd`'s eager
    Function) where given. Not while dynamo traces (the op stays one node of the graph) nor inside a torch.func
    transform (whose wrapped tensors need their own dispatch). ``tensors``: the positions of the schema's tensor
    arguments (each a tensor or None), the only ones that can carry a gradient."""
    traced = torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
    if torch.is_grad_enabled():
        for i in tensors:  # a loop, not any(<generator>): 0.4 us against 1.7 (isinstance on Tensor is slow too)
            if args[i] is not None and args[i].requires_grad:
                return op(*args) if autograd is None or traced else autograd.apply(op, *args)
    if traced:
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _eager_autograd(name: str, backward: Callable, setup_context: Callable) -> type:
    """An ``autograd.Function`` whose ``apply(op, *args)`` runs ``op`` below autograd with every argument given and
    ``setup_context`` / ``backward`` around it as the registered autograd layer does (``ctx.needs_input_grad``
    lists the operator's arguments, not ``op``)."""

    def forward(ctx, op, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    def backward_op_args(ctx, *grads):
        wanted = ctx.needs_input_grad
        ctx.needs_input_grad = wanted[1:]
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = wanted
        return (None, *grads_in) if isinstance(grads_in, tuple) else (None, grads_in)

    return type(f"{name}_autograd", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_op_args)})


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's dtype for inputs of ``dtype``: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_forward_only(opdef: OpDef, public_name: str) -> None:
    """Backward through a forward-only operator is a clear error, not silently wrong."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"attnops.{public_name} is forward-only (inference); "
                                  "train with attnops.attention / block_sparse_attention")

    opdef.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
