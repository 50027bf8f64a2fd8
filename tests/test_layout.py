"""The architecture as the folders show it: layers one way (import-linter), no import cycles,
modules and functions of a size one can read."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "clipray"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_the_layer_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


VIOLATIONS = {
    "library imports ray lazily": (
        "core/metrics.py",
        "\n\ndef _sneaky() -> None:\n    import ray  # noqa: F401\n",
    ),
    "pure scoring imports mlflow": ("scoring/plan.py", "\nimport mlflow  # noqa: E402,F401\n"),
    "core imports the sweep layer": (
        "core/encode.py",
        "\nimport clipray.sweep.trial  # noqa: E402,F401\n",
    ),
    "the driver talks to mlflow itself": (
        "sweep/driver.py",
        "\nfrom mlflow import MlflowClient  # noqa: E402,F401\n",
    ),
    "the report's statistics import mlflow": (
        "analysis/stats.py",
        "\nimport mlflow  # noqa: E402,F401\n",
    ),
    "config imports core": ("config/schema.py", "\nimport clipray.core.model  # noqa: E402,F401\n"),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_a_violation_breaks_the_contracts(case, tmp_path):
    """The contracts are not vacuous: each kind of forbidden import makes lint-imports fail."""
    shutil.copytree(PACKAGE, tmp_path / "clipray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    module, text = VIOLATIONS[case]
    with open(tmp_path / "clipray" / module, "a") as f:
        f.write(text)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout.upper(), result.stdout


def test_no_import_cycles_between_clipray_modules():
    graph = grimp.build_graph("clipray")
    modules = sorted(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) & set(modules) for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [module, nxt] if nxt in path else [module, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [])


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_are_small_enough_to_read(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_every_layer_says_what_it_is_and_every_module_has_a_docstring():
    for path in _sources():
        if path.name != "__main__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), path
