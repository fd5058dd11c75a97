# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
The import graph of the ``pyro_markov_kl`` package, read from the source with :mod:`ast`.

Prints each module of the package (its subpackages included) with its size in lines and the
modules of the package it imports: at module level, and inside a function (marked
``[in function f]``). Imports by ``__import__("...")`` or ``importlib.import_module("...")``
with a constant name count too (marked ``[dynamic]``), as does an ``import`` under
``if TYPE_CHECKING:`` (at module level: a cycle hidden that way is still a cycle).

Exits with status 1 if the module-level imports form a cycle (each cycle is printed), or if a
function imports a module of the package (a lazy import, usually there to dodge a cycle) that
the documented allow-list :data:`ALLOWED_IN_FUNCTION` does not name. Only the edges a module
states are counted, not the implicit import of each parent package (which Python has already
started importing when a submodule runs).

Usage::

    python scripts/import_graph.py [--root pyro_markov_kl]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

#: ``(importing module, imported module)`` pairs allowed inside a function: none. An entry
#: no longer needed is reported, so that it is removed.
ALLOWED_IN_FUNCTION: Set[Tuple[str, str]] = set()

PACKAGE = "pyro_markov_kl"


class Import(NamedTuple):
    """One intra-package import: the module imported, and where (``None``: module level)."""

    target: str
    function: Optional[str]
    dynamic: bool
    line: int


def find_modules(root: str, package: str) -> Dict[str, str]:
    """Module name -> file path, for every ``.py`` file under ``root`` (the package directory)."""
    modules = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            stem = name[: -len(".py")]
            modules[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(
                folder, name
            )
    return modules


def _resolve(name: str, modules: Dict[str, str]) -> Optional[str]:
    """The module of the package that ``name`` (a module, or a name in one) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _dynamic_name(node: ast.Call) -> Optional[str]:
    """The constant module name of ``__import__("x")`` or ``importlib.import_module("x")``."""
    func = node.func
    called = (
        func.id
        if isinstance(func, ast.Name)
        else func.attr
        if isinstance(func, ast.Attribute)
        else None
    )
    if called not in ("__import__", "import_module") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def module_imports(module: str, path: str, modules: Dict[str, str]) -> List[Import]:
    """The intra-package imports of one module, in source order."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    found: List[Import] = []

    def add(name: str, function: Optional[str], dynamic: bool, line: int) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            found.append(Import(target, function, dynamic, line))

    def visit(node: ast.AST, function: Optional[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            name = getattr(node, "name", "<lambda>")
            function = name if function is None else f"{function}.{name}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, function, False, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                # ``from pkg import sub`` imports the module pkg.sub if there is one
                sub = f"{base}.{alias.name}" if base else alias.name
                add(sub if sub in modules else base, function, False, node.lineno)
        elif isinstance(node, ast.Call):
            name = _dynamic_name(node)
            if name is not None:
                add(name, function, True, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module, or with a self-loop."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def _lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def report(root: str, package: str = PACKAGE) -> Tuple[List[str], List[str]]:
    """The printed report, and the problems found (empty: the layout is acyclic and eager)."""
    modules = find_modules(root, package)
    out: List[str] = []
    problems: List[str] = []
    graph: Dict[str, Set[str]] = {}
    used_in_function: Set[Tuple[str, str]] = set()
    for module, path in modules.items():
        imports = module_imports(module, path, modules)
        graph[module] = {i.target for i in imports if i.function is None}
        out.append(f"{module} ({_lines(path)} lines)")
        for imp in _unique(imports):
            marks = []
            if imp.function is not None:
                marks.append(f"in function {imp.function}")
            if imp.dynamic:
                marks.append("dynamic")
            if imp.function is not None and (module, imp.target) in ALLOWED_IN_FUNCTION:
                used_in_function.add((module, imp.target))
                marks.append("allowed")
            elif imp.function is not None:
                problems.append(
                    f"{os.path.relpath(path)}:{imp.line}: {module} imports {imp.target} inside "
                    f"function {imp.function}"
                )
            out.append(f"    -> {imp.target}" + (f"  [{', '.join(marks)}]" if marks else ""))
    for module, target in sorted(ALLOWED_IN_FUNCTION - used_in_function):
        out.append(
            f"note: {module} no longer imports {target} in a function: remove it from "
            "ALLOWED_IN_FUNCTION"
        )
    for cycle in find_cycles(graph):
        problems.append("import cycle among module-level imports: " + " <-> ".join(cycle))
    return out, problems


def _unique(imports: List[Import]) -> Iterator[Import]:
    seen = set()
    for imp in imports:
        key = (imp.target, imp.function, imp.dynamic)
        if key not in seen:
            seen.add(key)
            yield imp


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--root", default=os.path.join(here, PACKAGE), help="the package directory")
    args = parser.parse_args(argv)
    out, problems = report(args.root)
    print("\n".join(out))
    if problems:
        print("\nproblems:", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1
    print("\nno import cycle; no import inside a function outside ALLOWED_IN_FUNCTION")
    return 0


if __name__ == "__main__":
    sys.exit(main())
