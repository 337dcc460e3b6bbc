"""Kiln's packages import downward only: dsl <- codegen <- runtime <- entry points (the `kiln`
package: CLI, Python API). This reads every module's imports (those inside functions too) and
fails on an import that runs up the layers, on an import of another package's private name, and
on a cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dsl": "kiln.dsl", "codegen": "kiln.codegen", "runtime": "kiln.runtime", "api": "kiln"}
LAYER = {"kiln.dsl": 0, "kiln.codegen": 1, "kiln.runtime": 2, "kiln": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    for pkg in ("kiln.dsl", "kiln.codegen", "kiln.runtime"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "kiln"


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "kiln"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kiln":
                continue
            names = [a.name for a in node.names]
            # `from pkg import mod` imports a module; count it as one
            mods = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(m, [], node.lineno) for m in mods]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not mods:
                out.append((target, rest, node.lineno))
    return out


def _walk_runtime(node: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (annotations only: never imported)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            for other in child.orelse:
                yield other
                yield from _walk_runtime(other)
            continue
        yield child
        yield from _walk_runtime(child)


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_every_package_is_found():
    assert {"kiln.dsl.checker", "kiln.codegen.fuse", "kiln.runtime.engine", "kiln.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module):
    own = _package_of(module)
    for target, names, line in _imports(module, MODULES[module]):
        mod = _resolve(target)
        if mod is None:
            continue
        other = _package_of(mod)
        where = f"{MODULES[module].relative_to(ROOT)}:{line}"
        assert LAYER[other] <= LAYER[own], f"{where}: {own} imports {mod}, a higher layer"
        if other != own:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{where}: imports private name(s) {private} of {mod}"


def test_no_import_cycles():
    graph = {m: {r for t, _, _ in _imports(m, p) if (r := _resolve(t)) and r != m} for m, p in MODULES.items()}
    # A package's __init__ re-exporting its modules is not a cycle with them: leave those edges out.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_check_can_fail(tmp_path):
    """The parser sees an upward import written inside a function."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from kiln.runtime.model import load_model\n")
    assert ("kiln.runtime.model", ["load_model"], 2) in _imports("kiln.dsl.x", p)
