"""Compiled Triton reads a module global inside a kernel only when it is a constexpr (or a module, another
kernel, a Triton builtin or dtype); the interpreter these tests run the kernels under does not check, so a
plain float in a kernel passes every interpreted test and fails to compile on a GPU (it did: ALiBi's and the
sinks' LOG2E). This test applies the compiler's rule to every global name each attnops kernel reads.
It runs in a subprocess without TRITON_INTERPRET, where ``triton.jit`` gives the compiled JITFunction."""

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
import types

import pytest

pytest.importorskip("triton")


def _jit_functions():
    """(module, name) -> JITFunction of every kernel and helper defined in attnops (autotuned or not)."""
    from triton.runtime.jit import JITFunction

    import attnops

    found = {}
    for info in pkgutil.walk_packages(attnops.__path__, "attnops."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # Autotuner, Heuristics
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[(module.__name__, obj.fn.__qualname__)] = obj
    return found


def _allowed(value) -> bool:
    """triton/compiler/code_generator.py's global_lookup rule (3.6 - 3.9)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    callable_type = getattr(importlib.import_module("triton.runtime.jit"), "JITCallable", JITFunction)
    return (type(value) is types.ModuleType or isinstance(value, (callable_type, tl.dtype, tl.constexpr))
            or getattr(value, "__triton_builtin__", False) or getattr(value, "__triton_aggregate__", False)
            or getattr(value, "__module__", "").startswith("triton.language")
            or (isinstance(value, tuple) and hasattr(value, "_fields")))


def _violations():
    found = _jit_functions()
    bad = []
    for (module, name), fn in found.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn))).body[0]
        local = {a.arg for a in tree.args.args + tree.args.kwonlyargs}
        local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
                scope = fn.fn.__globals__
                if node.id in scope and not _allowed(scope[node.id]):
                    bad.append(f"{module}.{name} line {node.lineno}: {node.id} is a {type(scope[node.id]).__name__}")
    return len(found), bad


def test_kernels_read_only_constexpr_globals():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-W", "ignore", __file__], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    count = int(run.stdout.split()[0])
    assert count >= 40, run.stdout  # every family's kernels were found (48 when written)


if __name__ == "__main__":
    count, bad = _violations()
    print(count, "kernels and helpers")
    if bad:
        sys.exit("globals a compiled kernel cannot read (make them tl.constexpr):\n" + "\n".join(bad))
