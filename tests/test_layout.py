# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""The package's import graph: no cycle, no import inside a function (scripts/import_graph.py)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "import_graph.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_package_imports_are_acyclic_and_at_module_level() -> None:
    run = _run()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pyro_markov_kl.plan (" in run.stdout and "lines)" in run.stdout
    assert "no import cycle" in run.stdout


def _package(tmp_path, files: dict) -> str:
    root = tmp_path / "pyro_markov_kl"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return str(root)


def test_a_cycle_fails(tmp_path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import x\n",
            "a.py": "from .b import y\nx = 1\n",
            "b.py": "import pyro_markov_kl.a\ny = 2\n",
        },
    )
    run = _run("--root", root)
    assert run.returncode == 1
    assert "import cycle among module-level imports: pyro_markov_kl.a <-> pyro_markov_kl.b" in (
        run.stderr
    )


def test_a_hidden_cycle_through_the_package_root_fails(tmp_path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import x\n",
            "a.py": "x = __import__('pyro_markov_kl')\n",
        },
    )
    run = _run("--root", root)
    assert run.returncode == 1
    assert "[dynamic]" in run.stdout and "pyro_markov_kl <-> pyro_markov_kl.a" in run.stderr


def test_an_import_inside_a_function_fails(tmp_path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "def f():\n    from . import b\n    return b\n",
            "b.py": "import os\n",
        },
    )
    run = _run("--root", root)
    assert run.returncode == 1
    assert "-> pyro_markov_kl.b  [in function f]" in run.stdout
    assert "pyro_markov_kl.a imports pyro_markov_kl.b inside function f" in run.stderr
