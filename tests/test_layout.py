"""The package's shape: the library never imports the applications, its modules import each
other without cycles (none at module level, none inside a function), no module reaches for
another module's private names, and ``bptt_jax/__init__.py`` exports exactly its ``__all__``.

Read from the source with ``ast``: nothing is imported, so these hold for every code path,
including the lazy imports inside functions that a run would only meet on some inputs.
"""

import ast
import importlib.metadata
import pathlib

import pytest

import bptt_jax

ROOT = pathlib.Path(bptt_jax.__file__).resolve().parent
APPS = "bptt_jax.cli"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from ... import`` in module ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` of every import in module ``name``, at
    any depth (inside functions too). ``from M import x`` where ``M.x`` is a module counts
    as an import of ``M.x``."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                is_module = sub in MODULES
                out.append((sub, None, node.lineno) if is_module else (mod, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m == "bptt_jax" or m.startswith("bptt_jax.")]


def _library(name: str) -> bool:
    return not (name == APPS or name.startswith(APPS + ".") or name == "bptt_jax.__main__")


def test_the_library_never_imports_the_applications():
    found = [
        f"{name}:{line} imports {mod}"
        for name in MODULES
        if _library(name)
        for mod, _, line in _imports(name)
        if not _library(mod)
    ]
    assert not found, "\n".join(found)


def _graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (a package's ``__init__`` is where its
    names come from, so ``from bptt_jax import x`` of a name is an edge to ``bptt_jax``,
    which the public ``__init__`` is the top of and nothing inside imports)."""
    graph = {}
    for name in MODULES:
        edges = set()
        for mod, _, _ in _imports(name):
            if mod in MODULES and mod != name:
                edges.add(mod)
        graph[name] = edges
    return graph


def test_no_module_imports_the_public_init_or_one_above_it():
    graph = _graph()
    inside = [f"{n} imports bptt_jax" for n, e in graph.items() if "bptt_jax" in e and _library(n)]
    assert not inside, "\n".join(inside)
    # a cycle would make "above" meaningless: find one by depth-first search
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if m == "bptt_jax" and not _library(n):
                continue  # the applications may use the public names
            if state.get(m) == "open":
                cycle = stack[stack.index(m) :] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_module_imports_another_modules_private_names():
    found = []
    for name in MODULES:
        for mod, imported, line in _imports(name):
            if imported and imported.startswith("_") and not imported.startswith("__"):
                if mod != name:
                    found.append(f"{name}:{line} imports {imported} from {mod}")
        tree = ast.parse(MODULES[name].read_text())
        aliases = {
            (a.asname or a.name): f"{_resolve(name, node)}.{a.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for a in node.names
            if f"{_resolve(name, node)}.{a.name}" in MODULES
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES
            ):
                found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


def test_init_exports_exactly_its_all_and_the_installed_version():
    tree = ast.parse(MODULES["bptt_jax"].read_text())
    imported = {
        a.asname or a.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    assert set(bptt_jax.__all__) == imported | {"__version__"}
    assert len(bptt_jax.__all__) == len(set(bptt_jax.__all__))
    assert tree.body[1].targets[0].id == "__version__"  # first, after the docstring
    assert bptt_jax.__version__ == importlib.metadata.version("bptt-jax")
