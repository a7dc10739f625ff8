"""Registers attnops's Hugging Face names (``attn_implementation="attnops"`` and the family names of
:data:`attnops.integrations.transformers.DEFAULTS`) as soon as transformers' ``modeling_utils`` exists.

transformers checks ``attn_implementation`` against its registry when a model is built, before any
attnops code could run, so a name registered only by an explicit ``register()`` call fails there
with transformers' generic "not supported" message. Importing ``transformers`` from ``import attnops``
would cost seconds for every user of the kernels; instead a post-import hook registers the default
specs when (and if) ``transformers.modeling_utils`` is imported, or at once when it already is. An
explicit ``register(name, spec)`` afterwards replaces a default as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

TARGET = "transformers.modeling_utils"


def _register_defaults() -> None:
    try:
        from attnops.integrations import transformers as hf_attnops

        for name in hf_attnops.DEFAULTS:
            if name not in hf_attnops.registered():
                hf_attnops.register(name)
    except Exception as exc:  # never break the user's transformers import; say what failed instead
        warnings.warn(f"attnops could not register its attn_implementation names with transformers ({exc!r}); "
                      "call attnops.integrations.transformers.register() yourself", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.modeling_utils`` with the regular path finder and runs the registration
    right after the module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        inner = loader.exec_module

        def exec_module(module):
            inner(module)
            uninstall()
            _register_defaults()

        loader.exec_module = exec_module
        return spec


_FINDER = _AfterImport()


def install() -> None:
    """Registers now if transformers' modeling code is loaded, else when it is."""
    if TARGET in sys.modules:
        _register_defaults()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
