# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Make a patch that adds ``TraceMarkovKL_ELBO`` to Pyro, and optionally apply and test it.

The patch is generated from this repository's package and tests against a Pyro source
tree: by default the sdist of the installed pyro-ppl version, fetched from PyPI with
``pip download --no-deps --no-binary :all: pyro-ppl==<version>`` into a temporary
directory and unpacked. It adds

* ``pyro/infer/markov_kl/`` with the analysis modules (imports rewritten from
  ``pyro_markov_kl`` to ``pyro.infer.markov_kl``, Pyro's license header);
* ``pyro/infer/trace_markov_kl_elbo.py`` with the two ELBO classes;
* the ``pyro.infer`` import and ``__all__`` entries;
* an entry in ``docs/source/inference_algos.rst``;
* our tests that need only pyro and torch: ``tests/infer/test_trace_markov_kl_elbo.py``
  and ``tests/infer/markov_kl/`` (with the linear-Gaussian reference harness).

New files are formatted with ruff using the Pyro tree's own ruff configuration.

Usage::

    python scripts/make_upstream_patch.py                  # writes the patch to dist/
    python scripts/make_upstream_patch.py --apply --check  # and applies it to the sdist, tests it
    python scripts/make_upstream_patch.py --pyro-source ~/src/pyro --apply --check

See docs/upstreaming.rst.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "pyro_markov_kl"
TESTS_DIR = REPO / "tests"
DEFAULT_OUTPUT = REPO / "dist" / "pyro-markov-kl-upstream.patch"

OUR_PACKAGE = "pyro_markov_kl"
SUBPACKAGE = "pyro.infer.markov_kl"
SUBPACKAGE_DIR = "pyro/infer/markov_kl"

#: Analysis modules, copied to ``pyro/infer/markov_kl/<name>.py``.
MODULES = (
    "provenance",
    "dependencies",
    "guide_messenger",
    "batched_kl",
    "kl_rule",
    "kl_pairs",
    "kl",
    "sites",
    "terms",
    "records",
    "plan_cache",
    "score_function",
    "plan",
)
#: The ELBO module, copied to ``pyro/infer/trace_markov_kl_elbo.py`` (Pyro keeps every
#: ELBO class in a module of ``pyro.infer``).
ELBO_MODULE = "trace_markov_kl_elbo"
ELBO_PATH = "pyro/infer/trace_markov_kl_elbo.py"
ELBO_CLASSES = ("JitTraceMarkovKL_ELBO", "TraceMarkovKL_ELBO")
#: Other names of the ELBO module that the package exports (imported from the module in Pyro).
ELBO_MODULE_NAMES = ("GuideOrderWarning",)
#: Package modules that stay in pyro-markov-kl, with the reason.
LEFT_OUT_MODULES = {
    "trace_enum_markov_kl_elbo": (
        "TraceEnumMarkovKL_ELBO, a sibling of TraceEnum_ELBO: proposed as a follow-up patch"
    ),
    "enum_plan": "the plan of TraceEnumMarkovKL_ELBO: proposed with it as a follow-up patch",
    "compare": "the ELBO comparison tool (a pyro-markov-kl utility)",
    "examples": "the examples (DMM, switching state-space model, comparison scripts)",
    "data": "the bundled JSB Chorales data and its loaders",
}

TESTS_SUBDIR = "tests/infer/markov_kl"
#: Our test modules -> their path in Pyro: the ELBO's own tests next to Pyro's other ELBO
#: tests, the rest in tests/infer/markov_kl/ (mirroring pyro/infer/markov_kl/).
TEST_FILES = {
    "test_elbo": "tests/infer/test_trace_markov_kl_elbo.py",
    "test_overrides_and_errors": f"{TESTS_SUBDIR}/test_overrides_and_errors.py",
    "test_bad_input": f"{TESTS_SUBDIR}/test_bad_input.py",
    "test_jit": f"{TESTS_SUBDIR}/test_jit.py",
    "test_dependencies": f"{TESTS_SUBDIR}/test_dependencies.py",
    "test_score_function": f"{TESTS_SUBDIR}/test_score_function.py",
    "test_batched_kl": f"{TESTS_SUBDIR}/test_batched_kl.py",
    "test_kl": f"{TESTS_SUBDIR}/test_kl.py",
    "test_closed_form": f"{TESTS_SUBDIR}/test_closed_form.py",
    "test_baselines": f"{TESTS_SUBDIR}/test_baselines.py",
    "test_property_plates": f"{TESTS_SUBDIR}/test_property_plates.py",
    "test_drop_in": f"{TESTS_SUBDIR}/test_drop_in.py",
    "test_escapes": f"{TESTS_SUBDIR}/test_escapes.py",
    "test_guide_messenger": f"{TESTS_SUBDIR}/test_guide_messenger.py",
    "test_no_side_effects": f"{TESTS_SUBDIR}/test_no_side_effects.py",
    "test_plan_staleness": f"{TESTS_SUBDIR}/test_plan_staleness.py",
    "test_recorded_values": f"{TESTS_SUBDIR}/test_recorded_values.py",
    "test_property_recorded": f"{TESTS_SUBDIR}/test_property_recorded.py",
}
#: Test helper modules (imported by the tests as top-level modules) -> (Pyro module, path).
TEST_HELPERS = {
    "lg": ("tests.infer.markov_kl.linear_gaussian", f"{TESTS_SUBDIR}/linear_gaussian.py"),
    "helpers": ("tests.infer.markov_kl.helpers", f"{TESTS_SUBDIR}/helpers.py"),
    "programs": ("tests.infer.markov_kl.programs", f"{TESTS_SUBDIR}/programs.py"),
    "recorded": ("tests.infer.markov_kl.recorded", f"{TESTS_SUBDIR}/recorded.py"),
}
#: Test modules left out entirely, with the reason.
LEFT_OUT_TESTS = {
    "test_enum": "tests TraceEnumMarkovKL_ELBO, which is proposed as a follow-up patch",
    "test_jit_enum": "tests JitTraceEnumMarkovKL_ELBO, which is proposed as a follow-up patch",
    "test_dmm_options": "tests the options of the bundled DMM example",
    "test_real_programs": "imports TraceEnumMarkovKL_ELBO (proposed as a follow-up patch)",
    "test_data": "tests the bundled JSB Chorales data (pyro_markov_kl.data)",
    "test_example_dmm": "runs the bundled DMM example on the bundled data",
    "test_compare": "tests pyro_markov_kl.compare and the DMM comparison example",
    "test_layout": "checks this repository's import graph (scripts/import_graph.py)",
    "test_distributed": "trains the bundled DMM on the bundled data with torch.distributed",
    "test_property": "needs hypothesis, which is not one of Pyro's test dependencies",
    "test_property_discrete": "needs hypothesis, which is not one of Pyro's test dependencies",
}
#: Imports from these modules make a test depend on something the patch leaves out:
#: such tests are dropped from the copied module (and listed in the report).
EXCLUDED_IMPORTS = (
    "pyro_markov_kl.examples",
    "pyro_markov_kl.data",
    "pyro_markov_kl.compare",
    "hypothesis",
)
#: Tests whose source mentions one of these need funsor: marked ``requires_funsor``.
FUNSOR_WORDS = ("funsor",)

DOCS_PATH = "docs/source/inference_algos.rst"
DOCS_ENTRY = """\
.. automodule:: pyro.infer.trace_markov_kl_elbo
    :members:
    :undoc-members:
    :show-inheritance:
    :member-order: bysource

.. automodule:: pyro.infer.markov_kl
    :members:
    :undoc-members:
    :show-inheritance:
    :member-order: bysource

"""
#: The docs entry goes before this line (the ELBO section: trace_elbo, tracegraph_elbo,
#: traceenum_elbo, trace_mean_field_elbo, then trace_tail_adaptive_elbo).
DOCS_ANCHOR = ".. automodule:: pyro.infer.trace_tail_adaptive_elbo\n"
#: Context of the docs hunk when the Pyro tree has no docs/ (sdists do not ship them):
#: the lines around DOCS_ANCHOR in Pyro's docs/source/inference_algos.rst, where the
#: anchor is line 42. ``git apply`` finds the hunk at another line number too.
DOCS_CONTEXT_BEFORE = ("    :show-inheritance:\n", "    :member-order: bysource\n", "\n")
DOCS_CONTEXT_AFTER = (DOCS_ANCHOR, "    :members:\n", "    :undoc-members:\n")
DOCS_ANCHOR_LINE = 42

OUR_HEADER = re.compile(
    r"\A# SPDX-FileCopyrightText: [^\n]*\n# SPDX-License-Identifier: Apache-2.0\n"
)
PYRO_HEADER = (
    "# Copyright Contributors to the Pyro project.\n# SPDX-License-Identifier: Apache-2.0\n"
)

#: Text rewrites applied after the imports are rewritten: (pattern, replacement).
TEXT_REWRITES = (
    (
        r"\bpyro_markov_kl\.(JitTraceMarkovKL_ELBO|TraceMarkovKL_ELBO)\b",
        r"pyro.infer.trace_markov_kl_elbo.\1",
    ),
    (r"\bpyro_markov_kl\.trace_markov_kl_elbo\b", "pyro.infer.trace_markov_kl_elbo"),
    (r"\bpyro_markov_kl\b", SUBPACKAGE),
    (r"\btests/lg\.py\b", TEST_HELPERS["lg"][1]),
    (r"`lg\.", "`" + TEST_HELPERS["lg"][0] + "."),
)

#: What ``--check`` skips unless ``--full``: whole modules and the slowest tests.
QUICK_SKIP_FILES = ("test_closed_form",)
QUICK_SKIP_TESTS = (
    "test_compiles_once_and_matches_eager",
    "test_forward_guide_has_lower_variance_than_trace_elbo",
    "test_svi_trains",
)
#: Copied tests known to fail in Pyro's test configuration, deselected by ``--check``
#: (and reported) until fixed here: our test id -> why.
KNOWN_FAILURES: dict[str, str] = {}


class UpstreamError(RuntimeError):
    """A problem the user must fix; printed without a traceback."""


def log(message: str) -> None:
    """Print a progress message to stderr."""
    print(f"[upstream] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Import and text rewriting
# ----------------------------------------------------------------------------------------


def absolute_module(module: str | None, level: int, package: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    if package is None:
        raise UpstreamError(f"relative import {'.' * level}{module or ''} outside the package")
    parts = package.split(".")
    if level > 1:
        parts = parts[: -(level - 1)]
    return ".".join(parts + ([module] if module else []))


def is_excluded(module: str) -> bool:
    """Whether imports from ``module`` make a test depend on something left out."""
    return any(module == m or module.startswith(m + ".") for m in EXCLUDED_IMPORTS)


def map_module(module: str, names: Sequence[str]) -> list[tuple[str, list[str]]] | None:
    """
    Where the names imported from one of our modules live in Pyro.

    :param module: absolute module name
    :param names: imported names (``"name"`` or ``"name as alias"``)
    :returns: ``[(pyro_module, names), ...]``, or ``None`` for modules not ours
    :raises UpstreamError: for a module the patch does not contain
    """
    if module in TEST_HELPERS:
        return [(TEST_HELPERS[module][0], list(names))]
    if module in TEST_FILES:  # a test module importing another's helpers
        return [(TEST_FILES[module].removesuffix(".py").replace("/", "."), list(names))]
    if module == OUR_PACKAGE:
        elbo = [n for n in names if n.split(" ")[0] in ELBO_CLASSES]
        module_names = [n for n in names if n.split(" ")[0] in ELBO_MODULE_NAMES]
        rest = [n for n in names if n not in elbo and n not in module_names]
        return [
            (m, ns)
            for m, ns in (
                ("pyro.infer", elbo),
                (ELBO_PATH.removesuffix(".py").replace("/", "."), module_names),
                (SUBPACKAGE, rest),
            )
            if ns
        ]
    if not module.startswith(OUR_PACKAGE + "."):
        return None
    sub = module[len(OUR_PACKAGE) + 1 :]
    first = sub.split(".")[0]
    if first == ELBO_MODULE:
        return [("pyro.infer." + sub, list(names))]
    if first in MODULES:
        return [(f"{SUBPACKAGE}.{sub}", list(names))]
    raise UpstreamError(
        f"import from {module}, which the patch does not contain; add it to MODULES in "
        f"{Path(__file__).name} or remove the import"
    )


def alias_text(alias: ast.alias) -> str:
    """``name`` or ``name as asname``."""
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def rewrite_imports(text: str, package: str | None) -> str:
    """
    Rewrite every import of our package (also lazy imports inside functions) to its
    place in Pyro, one ``from ... import ...`` statement per target module.

    :param package: the package the module belongs to, for relative imports
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in (OUR_PACKAGE, *TEST_HELPERS):
                    raise UpstreamError(
                        f"'import {alias.name}' (line {node.lineno}) is not supported; "
                        "use 'from ... import ...'"
                    )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        module = absolute_module(node.module, node.level, package)
        mapped = map_module(module, [alias_text(a) for a in node.names])
        if mapped is None:
            continue
        for lineno in range(node.lineno, node.end_lineno + 1):
            if not lines[lineno - 1].isascii():
                raise UpstreamError(f"non-ASCII import statement at line {lineno}")
        indent = " " * node.col_offset
        new = ("\n" + indent).join(f"from {m} import {', '.join(ns)}" for m, ns in mapped)
        begin = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        edits.append((begin, end, new))
    for begin, end, new in sorted(edits, reverse=True):
        text = text[:begin] + new + text[end:]
    return text


def rewrite_text(text: str) -> str:
    """Apply :data:`TEXT_REWRITES`."""
    for pattern, replacement in TEXT_REWRITES:
        text = re.sub(pattern, replacement, text)
    return text


def pyro_header(text: str, what: str) -> str:
    """Replace our SPDX header by Pyro's."""
    if not OUR_HEADER.match(text):
        raise UpstreamError(f"{what} does not start with the SPDX header")
    return OUR_HEADER.sub(PYRO_HEADER, text, count=1)


def convert_module(path: Path, package: str | None) -> str:
    """A module of ours, as it goes into Pyro."""
    text = path.read_text(encoding="utf-8")
    text = pyro_header(text, str(path.relative_to(REPO)))
    return rewrite_text(rewrite_imports(text, package))


# ----------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------


def subpackage_init() -> str:
    """
    ``pyro/infer/markov_kl/__init__.py``: our ``__init__`` restricted to what the
    analysis modules export (the ELBO classes are exported by ``pyro.infer``).
    """
    path = PACKAGE_DIR / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree, clean=False) or "pyro-markov-kl"
    exported: dict[str, list[str]] = {}
    all_names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in MODULES:
            exported.setdefault(node.module, []).extend(alias_text(a) for a in node.names)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            all_names = list(ast.literal_eval(node.value))
    names = {n.split(" ")[-1] for ns in exported.values() for n in ns}
    lines = [PYRO_HEADER, "\n", f'"""\n{doc.strip()}\n\n{SUBPACKAGE_DOC}\n"""\n', "\n"]
    for module, ns in exported.items():
        lines.append(f"from {SUBPACKAGE}.{module} import {', '.join(ns)}\n")
    lines.append("\n__all__ = [\n")
    lines += [f'    "{n}",\n' for n in all_names if n in names]
    lines.append("]\n")
    return "".join(lines)


SUBPACKAGE_DOC = """\
This subpackage holds the dependency analysis, the estimator plan and the KL rules of
:class:`~pyro.infer.trace_markov_kl_elbo.TraceMarkovKL_ELBO`, which is exported by
:mod:`pyro.infer`."""


def package_files() -> dict[str, str]:
    """Pyro path -> content, for the new package files."""
    files = {f"{SUBPACKAGE_DIR}/__init__.py": subpackage_init()}
    for name in MODULES:
        files[f"{SUBPACKAGE_DIR}/{name}.py"] = convert_module(
            PACKAGE_DIR / f"{name}.py", OUR_PACKAGE
        )
    files[ELBO_PATH] = convert_module(PACKAGE_DIR / f"{ELBO_MODULE}.py", OUR_PACKAGE)
    return files


def unlisted_package_modules() -> list[str]:
    """Our package modules neither copied nor listed as left out."""
    known = set(MODULES) | {ELBO_MODULE, "__init__", "__main__"} | set(LEFT_OUT_MODULES)
    found = [p.stem for p in PACKAGE_DIR.glob("*.py")]
    found += [p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").exists()]
    return sorted(set(found) - known)


# ----------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------


@dataclass
class CopiedTests:
    """The copied test modules and what was left out of them."""

    files: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    funsor_tests: list[str] = field(default_factory=list)


def referenced_names(node: ast.AST) -> set[str]:
    """Names a statement reads, and ``module:<name>`` for the modules it imports."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
            names.add("module:" + sub.module)
        elif isinstance(sub, ast.Import):
            names.update("module:" + a.name for a in sub.names)
    return names


def statement_span(node: ast.stmt) -> tuple[int, int]:
    """First line (with decorators) and last line of a top-level statement, 1-based."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno or node.lineno


def excluded_bindings(tree: ast.Module) -> set[str]:
    """Names bound by top-level imports of excluded modules."""
    tainted: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_excluded(alias.name):
                    tainted.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if is_excluded(node.module):
                tainted.update(a.asname or a.name for a in node.names)
    return tainted


def is_excluded_import(node: ast.stmt) -> bool:
    """Whether a top-level statement imports from an excluded module."""
    if isinstance(node, ast.Import):
        return any(is_excluded(a.name) for a in node.names)
    return isinstance(node, ast.ImportFrom) and node.level == 0 and is_excluded(node.module or "")


def drop_excluded(source: str, name: str) -> tuple[str, list[str]]:
    """
    Remove the imports of excluded modules and the top-level functions and classes
    that use them.

    :raises UpstreamError: if any other top-level statement uses them
    """
    tree = ast.parse(source)
    tainted = excluded_bindings(tree)
    spans: list[tuple[int, int]] = []
    dropped: list[str] = []
    for node in tree.body:
        if is_excluded_import(node):
            spans.append(statement_span(node))
            continue
        refs = referenced_names(node)
        bad = refs & tainted | {r for r in refs if r.startswith("module:") and is_excluded(r[7:])}
        if not bad:
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            raise UpstreamError(
                f"{name}:{node.lineno}: a top-level statement uses "
                f"{', '.join(sorted(bad))}, which the patch leaves out"
            )
        spans.append(statement_span(node))
        uses = ", ".join(sorted(b.removeprefix("module:") for b in bad))
        dropped.append(f"{name}::{node.name} (uses {uses})")
    lines = source.splitlines(keepends=True)
    kept = [s for i, s in enumerate(lines, 1) if not any(a <= i <= b for a, b in spans)]
    text = re.sub(r"\n{4,}", "\n\n\n", "".join(kept))  # no gaps wider than PEP 8's
    return text, dropped


REQUIRES_FUNSOR = """
requires_funsor = pytest.mark.skipif(
    importlib.util.find_spec("funsor") is None, reason="requires funsor"
)
"""


def mark_funsor_tests(text: str) -> tuple[str, list[str]]:
    """
    Add ``@requires_funsor`` to the top-level tests that mention funsor, and define
    it after the imports.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    marked = []
    last_import = 0
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            last_import = node.end_lineno or node.lineno
    for node in reversed(tree.body):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
            continue
        first, last = statement_span(node)
        segment = "".join(lines[first - 1 : last])
        if any(word in segment for word in FUNSOR_WORDS):
            lines.insert(first - 1, "@requires_funsor\n")
            marked.append(node.name)
    if marked:
        lines.insert(last_import, "import importlib.util\n\nimport pytest\n" + REQUIRES_FUNSOR)
    return "".join(lines), sorted(marked)


def drop_slow_marks(text: str) -> str:
    """
    Remove ``@pytest.mark.slow`` decorators: Pyro registers no ``slow`` marker (its pytest
    configuration turns warnings into errors) and runs every test; ``--check`` has its own
    quick selection (:data:`QUICK_SKIP_TESTS`).
    """
    return re.sub(r"(?m)^[ \t]*@pytest\.mark\.slow[ \t]*\n", "", text)


def copy_tests() -> CopiedTests:
    """Our test modules and helpers, as they go into Pyro."""
    result = CopiedTests()
    for stem, target in TEST_FILES.items():
        path = TESTS_DIR / f"{stem}.py"
        source = pyro_header(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
        source, dropped = drop_excluded(source, path.name)
        result.dropped += dropped
        text = drop_slow_marks(rewrite_text(rewrite_imports(source, None)))
        text, marked = mark_funsor_tests(text)
        result.funsor_tests += [f"{path.name}::{n}" for n in marked]
        result.files[target] = text
    for name, (_, target) in TEST_HELPERS.items():
        result.files[target] = convert_module(TESTS_DIR / f"{name}.py", None)
    result.files[f"{TESTS_SUBDIR}/__init__.py"] = PYRO_HEADER
    return result


def unlisted_tests() -> list[str]:
    """Our test modules neither copied nor listed as left out."""
    known = set(TEST_FILES) | set(LEFT_OUT_TESTS)
    return sorted(p.stem for p in TESTS_DIR.glob("test_*.py") if p.stem not in known)


# ----------------------------------------------------------------------------------------
# Changes to existing Pyro files
# ----------------------------------------------------------------------------------------


def insert_before(lines: list[str], predicate: Callable[[str], bool], new: str) -> bool:
    """Insert ``new`` before the first line matching ``predicate``."""
    for i, line in enumerate(lines):
        if predicate(line):
            lines.insert(i, new)
            return True
    return False


def patch_infer_init(text: str) -> str:
    """``pyro/infer/__init__.py`` with the import and the ``__all__`` entries."""
    if "TraceMarkovKL_ELBO" in text:
        raise UpstreamError("pyro/infer/__init__.py already mentions TraceMarkovKL_ELBO")
    lines = text.splitlines(keepends=True)
    statement = f"from pyro.infer.trace_markov_kl_elbo import {', '.join(ELBO_CLASSES)}\n"
    if not insert_before(
        lines, lambda s: s.startswith("from pyro.infer.trace_mean_field_elbo "), statement
    ):
        last = max(i for i, s in enumerate(lines) if s.startswith("from pyro.infer."))
        lines.insert(last + 1, statement)
    if not any(s.startswith("__all__ = [") for s in lines):
        raise UpstreamError("pyro/infer/__init__.py has no __all__ = [...] list")
    for name, successor in (
        ("JitTraceMarkovKL_ELBO", '"JitTraceMeanField_ELBO",'),
        ("TraceMarkovKL_ELBO", '"TraceMeanField_ELBO",'),
    ):
        entry = f'    "{name}",\n'
        if not insert_before(lines, lambda s, nxt=successor: s.strip() == nxt, entry):
            begin = next(i for i, s in enumerate(lines) if s.startswith("__all__ = ["))
            end = next(i for i in range(begin, len(lines)) if lines[i].startswith("]"))
            lines.insert(end, entry)
    return "".join(lines)


def patch_docs(text: str) -> str:
    """``docs/source/inference_algos.rst`` with the entry in the ELBO section."""
    if "trace_markov_kl_elbo" in text:
        raise UpstreamError(f"{DOCS_PATH} already mentions trace_markov_kl_elbo")
    lines = text.splitlines(keepends=True)
    if insert_before(lines, lambda s: s == DOCS_ANCHOR, DOCS_ENTRY):
        return "".join(lines)
    # no tail-adaptive entry: after the mean-field one
    for i, line in enumerate(lines):
        if line.startswith(".. automodule:: pyro.infer.trace_mean_field_elbo"):
            j = i + 1
            while j < len(lines) and lines[j].startswith("    "):
                j += 1
            lines.insert(j + 1, DOCS_ENTRY)
            return "".join(lines)
    raise UpstreamError(
        f"{DOCS_PATH}: found neither {DOCS_ANCHOR.strip()} nor the mean-field entry"
    )


def synthetic_docs_hunk() -> str:
    """The docs diff without the docs file, from its known context (see DOCS_CONTEXT_*)."""
    before, after = DOCS_CONTEXT_BEFORE, DOCS_CONTEXT_AFTER
    added = DOCS_ENTRY.splitlines(keepends=True)
    start = DOCS_ANCHOR_LINE - len(before)
    old_len = len(before) + len(after)
    body = [" " + s for s in before] + ["+" + s for s in added] + [" " + s for s in after]
    return (
        f"diff --git a/{DOCS_PATH} b/{DOCS_PATH}\n"
        f"--- a/{DOCS_PATH}\n+++ b/{DOCS_PATH}\n"
        f"@@ -{start},{old_len} +{start},{old_len + len(added)} @@\n" + "".join(body)
    )


# ----------------------------------------------------------------------------------------
# Pyro source tree, ruff, diff
# ----------------------------------------------------------------------------------------


def pyro_version() -> str:
    """The installed pyro-ppl version."""
    try:
        return importlib.metadata.version("pyro-ppl")
    except importlib.metadata.PackageNotFoundError:
        raise UpstreamError(f"pyro-ppl is not installed for {sys.executable}") from None


def download_sdist(version: str, dest: Path) -> Path:
    """Fetch the pyro-ppl sdist from PyPI with pip; a clear error if that fails."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", "--timeout", "30",
        "--retries", "2", "-d", str(dest), f"pyro-ppl=={version}",
    ]  # fmt: skip
    log(f"downloading the pyro-ppl {version} sdist: {' '.join(cmd[2:])}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        failed = proc.returncode != 0
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        failed, output = True, f"timed out after {e.timeout:.0f} s"
    found = sorted(dest.glob("pyro_ppl-*.tar.gz")) + sorted(dest.glob("pyro-ppl-*.tar.gz"))
    if failed or not found:
        tail = [s for s in output.splitlines() if "WARNING: Location 'file:" not in s][-15:]
        raise UpstreamError(
            f"could not download the pyro-ppl=={version} sdist from PyPI:\n    "
            + "\n    ".join(tail)
            + "\nCheck network access to PyPI, or pass --sdist FILE (a downloaded "
            f"pyro_ppl-{version}.tar.gz) or --pyro-source DIR (a Pyro source checkout)."
        )
    return found[0]


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist into ``dest``; returns the source tree."""
    with tarfile.open(sdist) as tar:
        roots = {Path(m.name).parts[0] for m in tar.getmembers() if m.name}
        if len(roots) != 1:
            raise UpstreamError(f"{sdist}: expected one top-level directory, got {sorted(roots)}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest)  # noqa: S202 -- PyPI's pyro-ppl sdist
    tree = dest / roots.pop()
    if not (tree / "pyro" / "infer" / "__init__.py").exists():
        raise UpstreamError(f"{sdist} does not contain pyro/infer/__init__.py")
    return tree


def find_ruff() -> list[str]:
    """The ruff command: next to the Python executable, on PATH, or ``python -m ruff``."""
    local = Path(sys.executable).parent / "ruff"
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    raise UpstreamError("ruff not found (install the dev extra), or pass --no-format")


def run(cmd: Sequence[str], cwd: Path, env: dict | None = None, what: str = "") -> None:
    """Run a command; raise :class:`UpstreamError` with its output if it fails."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UpstreamError(
            f"{what or cmd[0]} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            + (proc.stdout + proc.stderr).strip()
        )


def ruff_config_files(tree: Path) -> list[str]:
    """The files holding the Pyro tree's ruff configuration."""
    return [
        n for n in ("pyproject.toml", "ruff.toml", ".ruff.toml", "setup.cfg") if (tree / n).exists()
    ]


def format_files(staging: Path, paths: Sequence[str], ruff: list[str]) -> None:
    """Sort imports, drop unused ones and format, with the Pyro tree's ruff config."""
    run(
        [*ruff, "check", "--quiet", "--fix", "--select", "I,F401", *paths],
        staging,
        what="ruff check --fix",
    )
    run([*ruff, "format", "--quiet", *paths], staging, what="ruff format")


def unified_diff(path: str, old: str | None, new: str) -> str:
    """A git-style unified diff of one file (``old`` is ``None`` for a new file)."""
    for text in (old, new):
        if text is not None and text and not text.endswith("\n"):
            raise UpstreamError(f"{path}: no newline at end of file")
    head = f"diff --git a/{path} b/{path}\n"
    if old is None:
        head += "new file mode 100644\n"
    diff = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile="/dev/null" if old is None else f"a/{path}",
        tofile=f"b/{path}",
        n=3,
    )
    return head + "".join(diff)


# ----------------------------------------------------------------------------------------
# Build, apply, check
# ----------------------------------------------------------------------------------------


@dataclass
class Patch:
    """The generated patch and what it is made of."""

    text: str
    new_files: dict[str, str]
    modified_files: dict[str, str]
    docs_synthetic: bool
    tests: CopiedTests


def our_revision() -> str:
    """``git describe`` of this repository, or the package version without git."""
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        proc = None
    if proc is not None and proc.returncode == 0:
        return proc.stdout.strip()
    match = re.search(r'^__version__ = "([^"]+)"', (PACKAGE_DIR / "__init__.py").read_text(), re.M)
    return match.group(1) if match else "unknown"


def build_patch(base: Path, source_note: str, ruff: list[str] | None) -> Patch:
    """Generate every file, format the new ones, and diff them against ``base``."""
    tests = copy_tests()
    new_files = {**package_files(), **tests.files}
    for path in new_files:
        if (base / path).exists():
            raise UpstreamError(f"{base / path} exists already: is the tree patched?")
    modified = {
        "pyro/infer/__init__.py": patch_infer_init((base / "pyro/infer/__init__.py").read_text())
    }
    docs = base / DOCS_PATH
    docs_synthetic = not docs.exists()
    if not docs_synthetic:
        modified[DOCS_PATH] = patch_docs(docs.read_text())

    if ruff is not None:
        with tempfile.TemporaryDirectory(prefix="markov-kl-ruff-") as tmp:
            staging = Path(tmp)
            # ruff tells first-party modules (pyro, tests) by the files present
            for name in ruff_config_files(base):
                shutil.copy(base / name, staging / name)
            for name in ("pyro", "tests"):
                if (base / name).is_dir():
                    shutil.copytree(
                        base / name, staging / name, ignore=shutil.ignore_patterns("__pycache__")
                    )
            for path, text in new_files.items():
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).write_text(text, encoding="utf-8")
            format_files(staging, sorted(new_files), ruff)
            new_files = {p: (staging / p).read_text(encoding="utf-8") for p in new_files}

    for path, text in new_files.items():
        if OUR_PACKAGE in text:
            raise UpstreamError(f"{path} still mentions {OUR_PACKAGE}")

    diffs = {p: unified_diff(p, None, t) for p, t in new_files.items()}
    diffs.update({p: unified_diff(p, (base / p).read_text(), t) for p, t in modified.items()})
    if docs_synthetic:
        diffs[DOCS_PATH] = synthetic_docs_hunk()
    header = patch_header(source_note, sorted(new_files), sorted(modified), docs_synthetic, tests)
    text = header + "".join(diffs[p] for p in sorted(diffs))
    return Patch(text, new_files, modified, docs_synthetic, tests)


def patch_header(
    source_note: str, new: list[str], modified: list[str], docs_synthetic: bool, tests: CopiedTests
) -> str:
    """The text before the first diff (``git apply`` skips it)."""
    lines = [
        "Add TraceMarkovKL_ELBO: per-step analytic KL for Markov guides",
        "",
        "TraceMarkovKL_ELBO replaces the Monte Carlo term log p(z_s) - log q(z_s) of a",
        "latent site by -KL(q_s || p_s) conditioned on the sampled parents wherever that is",
        "unbiased (no model parent of s is a guide descendant of s), found by tracking",
        "which sampled values flow into each distribution; elsewhere it is Trace_ELBO",
        "(with TraceGraph_ELBO-style score-function terms for non-reparameterized sites).",
        "",
        f"Generated by scripts/make_upstream_patch.py from pyro-markov-kl {our_revision()}",
        f"against {source_note}.",
        "",
        "New files:",
        *[f"    {p}" for p in new],
        "Modified files:",
        *[f"    {p}" for p in modified + ([DOCS_PATH] if docs_synthetic else [])],
    ]
    if docs_synthetic:
        lines += [
            "",
            f"The {DOCS_PATH} hunk was made without that file (the sdist has no docs/):",
            f"its context is the lines around '{DOCS_ANCHOR.strip()}'.",
        ]
    lines += ["", "Tests left out (they need what stays in pyro-markov-kl):"]
    lines += [f"    tests/{k}.py: {v}" for k, v in LEFT_OUT_TESTS.items()]
    lines += [f"    tests/{d}" for d in tests.dropped]
    lines += ["", "Tests marked requires_funsor (skipped without funsor):"]
    lines += [f"    tests/{t}" for t in tests.funsor_tests] or ["    (none)"]
    return "\n".join(lines) + "\n\n"


def git_env(tree: Path) -> dict:
    """Environment for ``git apply`` in ``tree`` as a plain directory (not a repository)."""
    env = dict(os.environ)
    if not (tree / ".git").exists():
        # do not discover a repository above the tree (e.g. --workdir inside this one)
        env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    return env


def without_file(patch_text: str, path: str) -> str:
    """The patch without the diff of one file."""
    parts = re.split(r"(?m)^(?=diff --git )", patch_text)
    return "".join(p for p in parts if not p.startswith(f"diff --git a/{path} "))


def apply_patch(tree: Path, patch_file: Path, patch: Patch) -> None:
    """
    Apply the patch with ``git apply`` (``patch -p1`` without git) and check that the
    result is what was generated.
    """
    text = patch_file.read_text(encoding="utf-8")
    if patch.docs_synthetic:
        text = without_file(text, DOCS_PATH)
        log(f"not applying the {DOCS_PATH} hunk: this tree has no docs/")
    with tempfile.NamedTemporaryFile("w", suffix=".patch", delete=False) as f:
        f.write(text)
    if shutil.which("git"):
        cmd, check = ["git", "apply", "--whitespace=nowarn", f.name], "--check"
    elif shutil.which("patch"):
        cmd, check = ["patch", "-p1", "--batch", "--forward", "--quiet", "-i", f.name], "--dry-run"
    else:
        raise UpstreamError("neither git nor patch is installed: cannot apply the patch")
    try:
        env = git_env(tree)
        run([*cmd, check], tree, env, f"{cmd[0]} {check}")
        run(cmd, tree, env, cmd[0])
    finally:
        os.unlink(f.name)
    for path, content in {**patch.new_files, **patch.modified_files}.items():
        if (tree / path).read_text(encoding="utf-8") != content:
            raise UpstreamError(f"{path}: applying the patch did not give the generated file")
    log(f"applied to {tree} with {cmd[0]}")


def check_env(tree: Path) -> dict:
    """Environment for running the patched tree: its pyro first, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


IMPORT_CHECK = """
import sys
sys.modules["funsor"] = None  # the patched pyro must import without funsor
tree = sys.argv[1]
import pyro
import pyro.infer
from pyro.infer import JitTraceMarkovKL_ELBO, TraceMarkovKL_ELBO
from pyro.infer.markov_kl import find_kl_rule
assert pyro.__file__.startswith(tree), f"imported {pyro.__file__}, not the patched tree"
assert TraceMarkovKL_ELBO.__module__ == "pyro.infer.trace_markov_kl_elbo"
assert "pyro_markov_kl" not in sys.modules, "the patched pyro imports pyro_markov_kl"
mods = sorted(m for m in sys.modules if m.startswith("pyro.infer.markov_kl"))
print(f"pyro {pyro.__version__} from {pyro.__file__}: TraceMarkovKL_ELBO imports without "
      f"funsor ({len(mods)} pyro.infer.markov_kl modules)")
"""

PYTEST_WITHOUT_FUNSOR = """
import sys
sys.modules["funsor"] = None
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def check_tree(
    tree: Path, patch: Patch, ruff: list[str] | None, quick: bool, without_funsor: bool
) -> None:
    """Import ``pyro.infer.TraceMarkovKL_ELBO`` from the patched tree, lint, run the tests."""
    env = check_env(tree)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(tree)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise UpstreamError("import check failed:\n" + (proc.stdout + proc.stderr).strip())
    log(proc.stdout.strip() + f" [{time.monotonic() - t0:.1f} s]")

    touched = sorted(set(patch.new_files) | set(patch.modified_files))
    touched_py = [p for p in touched if p.endswith(".py")]
    if ruff is not None:
        run([*ruff, "check", "--quiet", *touched_py], tree, what="ruff check (Pyro's config)")
        run(
            [*ruff, "format", "--check", "--quiet", *touched_py],
            tree,
            what="ruff format --check (Pyro's config)",
        )
        log("ruff check and ruff format --check pass with the tree's configuration")

    # Pyro's tests are packages (tests/__init__.py, tests/infer/__init__.py); the sdist
    # ships neither, and the copied tests import tests.infer.markov_kl.linear_gaussian.
    for init in ("tests/__init__.py", "tests/infer/__init__.py"):
        if not (tree / init).exists():
            (tree / init).write_text(PYRO_HEADER)
            log(f"created {init}, as a Pyro checkout has it")
    targets = {f"{stem}.py": target for stem, target in TEST_FILES.items()}
    test_files = [
        target
        for stem, target in sorted(TEST_FILES.items(), key=lambda kv: kv[1])
        if not (quick and stem in QUICK_SKIP_FILES)
    ]
    args = ["-q", "-x", "-p", "no:cacheprovider", *test_files]
    if quick:
        args += ["-k", " and ".join(f"not {t}" for t in QUICK_SKIP_TESTS)]
    for test_id, why in KNOWN_FAILURES.items():
        file_name, _, test = test_id.partition("::")
        args.append(f"--deselect={targets[file_name]}::{test}")
        log(f"deselected known failure {test_id}: {why}")
    if without_funsor:
        cmd = [sys.executable, "-c", PYTEST_WITHOUT_FUNSOR, *args]
    else:
        cmd = [sys.executable, "-m", "pytest", *args]
    log(
        f"running the copied tests{' without funsor' if without_funsor else ''}: "
        f"{' '.join(['pytest', *args])}"
    )
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    summary = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise UpstreamError(
            "the copied tests failed in the patched tree:\n" + "\n".join(summary[-60:])
        )
    log(f"{summary[-1] if summary else 'tests passed'} [{time.monotonic() - t0:.1f} s]")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Make the patch that adds TraceMarkovKL_ELBO to Pyro "
        f"({DEFAULT_OUTPUT.relative_to(REPO)}), optionally apply and test it.",
        epilog="See docs/upstreaming.rst.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--pyro-source",
        type=Path,
        metavar="DIR",
        help="patch this Pyro source tree (e.g. a git checkout) instead of the sdist; "
        "--apply modifies it",
    )
    source.add_argument(
        "--sdist",
        type=Path,
        metavar="FILE",
        help="use this pyro-ppl sdist instead of downloading one",
    )
    parser.add_argument(
        "--pyro-version",
        default=None,
        help="pyro-ppl version of the sdist (default: the installed one)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the patch (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="unpack the sdist here and keep it (default: a temporary directory, removed at exit)",
    )
    parser.add_argument("--apply", action="store_true", help="apply the patch to the source tree")
    parser.add_argument(
        "--check",
        action="store_true",
        help="(implies --apply) import TraceMarkovKL_ELBO from the patched tree, lint the "
        "patched files, run the copied tests",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="with --check: run every copied test (default: skip the slowest)",
    )
    parser.add_argument(
        "--without-funsor",
        action="store_true",
        help="with --check: run the tests with funsor made unimportable",
    )
    parser.add_argument("--no-format", action="store_true", help="do not run ruff on the new files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    args.apply = args.apply or args.check
    t_start = time.monotonic()
    for name in unlisted_package_modules():
        log(f"note: pyro_markov_kl/{name} is neither in MODULES nor in LEFT_OUT_MODULES")
    for name in unlisted_tests():
        log(f"note: tests/{name}.py is neither in TEST_FILES nor in LEFT_OUT_TESTS")
    ruff = None if args.no_format else find_ruff()

    with tempfile.TemporaryDirectory(prefix="pyro-markov-kl-upstream-") as tmp:
        if args.pyro_source is not None:
            tree = args.pyro_source.resolve()
            if not (tree / "pyro" / "infer" / "__init__.py").exists():
                raise UpstreamError(f"{tree} is not a Pyro source tree (no pyro/infer/__init__.py)")
            source_note = f"the Pyro source tree {tree}"
        else:
            version = args.pyro_version or pyro_version()
            work = args.workdir.resolve() if args.workdir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            stale = work / f"pyro_ppl-{version}"
            if stale.exists():
                shutil.rmtree(stale)
            if args.sdist is not None:
                sdist = args.sdist.resolve()
            else:
                download = work / "download"
                shutil.rmtree(download, ignore_errors=True)
                t0 = time.monotonic()
                sdist = download_sdist(version, download)
                log(f"downloaded {sdist.name} [{time.monotonic() - t0:.1f} s]")
            tree = unpack_sdist(sdist, work)
            source_note = f"the pyro-ppl {version} sdist from PyPI ({sdist.name})"

        patch = build_patch(tree, source_note, ruff)
        output = args.output.resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(patch.text, encoding="utf-8")
        n_lines = sum(t.count("\n") for t in patch.new_files.values())
        log(
            f"wrote {output} ({len(patch.new_files)} new files, {n_lines} lines; "
            f"{len(patch.modified_files) + patch.docs_synthetic} modified files)"
        )
        for dropped in patch.tests.dropped:
            log(f"test left out: tests/{dropped}")

        if args.apply:
            apply_patch(tree, output, patch)
        if args.check:
            check_tree(tree, patch, ruff, quick=not args.full, without_funsor=args.without_funsor)
        if args.workdir and args.pyro_source is None:
            log(f"kept the {'patched ' if args.apply else ''}tree in {tree}")
    log(f"done [{time.monotonic() - t_start:.1f} s]")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UpstreamError as error:
        print(f"make_upstream_patch: error: {error}", file=sys.stderr)
        sys.exit(1)
