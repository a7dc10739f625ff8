"""The package's import graph: no cycles (lazy imports inside functions included), and no private name
imported across packages. Read from the source with ``ast``; nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "attnops"


def _modules():
    """{module name: path} for every attnops module."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in PACKAGE.rglob("*.so"):  # the C++ extension: a leaf of the graph
        parts = list(path.relative_to(PACKAGE.parent).parts)
        parts[-1] = parts[-1].split(".")[0]
        out[".".join(parts)] = None
    return out


MODULES = _modules()


def _imports(name, path):
    """(imported module, imported names) per import statement of a module, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnops"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("attnops"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from attnops.core import dispatch` names the module attnops.core.dispatch
                yield (sub, []) if sub in MODULES else (base, [alias.name])


def _graph():
    graph = {}
    for name, path in MODULES.items():
        graph[name] = set() if path is None else {
            target for target, _ in _imports(name, path) if target in MODULES and target != name}
    return graph


def _family(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:3] if len(parts) > 2 and parts[1] == "ops" else parts[:2])


def test_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_packages():
    bad = []
    for name, path in MODULES.items():
        for target, names in _imports(name, path) if path is not None else ():
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _family(target) != _family(name):
                bad.append(f"{name} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_the_package():
    assert "attnops.core.dispatch" in MODULES and "attnops.ops.softmax.op" in MODULES
    assert "attnops.core.dispatch" in _graph()["attnops.ops.softmax.op"]
