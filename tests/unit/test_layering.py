"""The import rules, read from the source (nothing is imported): no import cycle among the project's
modules or among its packages, and every import goes down the layers (or stays in its own):

    core < config < run < components (model, data, checkpoint, metrics, ft) < training
         < launch support (preflight, flow, logs, ...) < launchers (local, slurm, ray, check) < entry points

so the library (`bigmodel_dist`) never imports the launchers (`launcher`).

An import counts for cycles when it runs: at module level or inside a function. Imports under
`if TYPE_CHECKING:` never run, so they may point back (e.g. a type of a module that imports this one);
the library-must-not-import-launcher rule counts them too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("bigmodel_dist", "launcher")

# Lowest first. A unit is a package (or a launcher's top-level module); an import may point to its own
# layer or a lower one, and the units' graph has no cycle.
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["bigmodel_dist.core"]),
    ("config", ["bigmodel_dist.config"]),
    ("run", ["bigmodel_dist.run"]),
    ("components", ["bigmodel_dist.model", "bigmodel_dist.data", "bigmodel_dist.checkpoint", "bigmodel_dist.metrics",
                    "bigmodel_dist.ft"]),
    ("training", ["bigmodel_dist.training"]),
    ("launch support", ["launcher.preflight", "launcher.flow", "launcher.logs", "launcher.user_errors",
                        "launcher.ports", "launcher.lease", "launcher.warmup"]),
    ("launchers", ["launcher.local", "launcher.slurm", "launcher.ray", "launcher.check"]),
    ("entry points", ["launcher.cli", "launcher.ray_job", "launcher", "bigmodel_dist"]),
]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module
    file: str  # the source's file, relative to the repository
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.file}:{self.line} imports {self.target}"


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, type_only: bool = False):
    """(Import/ImportFrom node, whether it is type-only), at any depth (functions included)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), type_only)
        else:
            yield from _import_nodes(child, type_only)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The project modules `module` imports: `from a.b import c` names a.b.c when that is a module, else a.b."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, type_only in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages from this one
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found += [Import(module, target, _relative(path), node.lineno, type_only) for target in dict.fromkeys(targets)
                  if target in modules and target != module]
    return found


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def import_graph() -> list[Import]:
    modules = project_modules()
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]


def find_cycle(edges: list[Import]) -> list[Import] | None:
    """One import cycle as its chain of imports, or None (depth-first search over runtime imports)."""
    outgoing: dict[str, list[Import]] = {}
    for edge in edges:
        if not edge.type_only:
            outgoing.setdefault(edge.source, []).append(edge)
    done: set[str] = set()

    def visit(module: str, chain: list[Import], on_chain: dict[str, int]) -> list[Import] | None:
        for edge in outgoing.get(module, []):
            if edge.target in on_chain:
                return chain[on_chain[edge.target]:] + [edge]
            if edge.target not in done:
                on_chain[edge.target] = len(chain) + 1
                cycle = visit(edge.target, [*chain, edge], on_chain)
                if cycle:
                    return cycle
                del on_chain[edge.target]
        done.add(module)
        return None

    for start in sorted(outgoing):
        if start not in done:
            cycle = visit(start, [], {start: 0})
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph()


def test_no_import_cycle_among_project_modules(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n  " + "\n  ".join(edge.where() for edge in cycle)


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a project module: the longest unit name it is or lies under."""
    found = [(index, unit) for index, (_, units) in enumerate(LAYERS) for unit in units
             if module == unit or module.startswith(unit + ".")]
    if not found:
        raise AssertionError(f"{module} is in no layer of tests/unit/test_layering.py: add its package to LAYERS")
    return max(found, key=lambda item: len(item[1]))


def unit_edges(edges: list[Import]) -> list[Import]:
    """The runtime imports between units, as edges from unit to unit (the first import that makes each)."""
    found: dict[tuple[str, str], Import] = {}
    for edge in edges:
        source, target = unit_of(edge.source)[1], unit_of(edge.target)[1]
        if not edge.type_only and source != target:
            found.setdefault((source, target), Import(source, target, edge.file, edge.line, False))
    return list(found.values())


def test_every_module_has_a_layer(graph):
    for module in project_modules():
        unit_of(module)


def test_imports_go_down_the_layers(graph):
    """Function-level imports included: a lazy import is still a dependency."""
    upward = [f"{edge.where()} ({LAYERS[unit_of(edge.source)[0]][0]} -> {LAYERS[unit_of(edge.target)[0]][0]})"
              for edge in graph if not edge.type_only and unit_of(edge.target)[0] > unit_of(edge.source)[0]]
    assert not upward, "imports up the layers:\n  " + "\n  ".join(upward)


def test_no_import_cycle_among_packages(graph):
    cycle = find_cycle(unit_edges(graph))
    assert cycle is None, "package import cycle:\n  " + "\n  ".join(edge.where() for edge in cycle)


def test_library_never_imports_the_launchers(graph):
    offending = [edge.where() for edge in graph
                 if edge.source.startswith("bigmodel_dist") and edge.target.startswith("launcher")]
    assert not offending, "bigmodel_dist must not depend on launcher:\n  " + "\n  ".join(offending)


def test_the_checker_sees_cycles_and_type_only_imports(tmp_path):
    """The rules above would pass on a checker that sees nothing: it finds a function-level cycle, and
    ignores one closed only by a TYPE_CHECKING import."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import f\n"
                                  "def g():\n    import pkg.a\n")
    modules = {name: package / f"{name.split('.')[-1]}.py" for name in ("pkg.a", "pkg.b", "pkg.c")}
    modules["pkg"] = package / "__init__.py"
    edges = [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]
    cycle = find_cycle(edges)
    assert cycle is not None and [edge.source for edge in cycle] == ["pkg.a", "pkg.b", "pkg.c"]
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    edges = [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]
    assert find_cycle(edges) is None
    assert [edge.type_only for edge in edges if edge.source == "pkg.c"] == [True]


def test_the_package_checker_sees_a_cycle_through_lazy_imports():
    """Two packages whose modules import each other only inside functions still form a package cycle."""
    edges = [Import("bigmodel_dist.data.a", "bigmodel_dist.ft.b", "a.py", 3, False),
             Import("bigmodel_dist.ft.c", "bigmodel_dist.data.d", "c.py", 9, False)]
    cycle = find_cycle(unit_edges(edges))
    assert cycle is not None and {edge.source for edge in cycle} == {"bigmodel_dist.data", "bigmodel_dist.ft"}
    assert find_cycle(unit_edges(edges[:1])) is None
