"""Architecture checks: no import cycle between the package's modules, and functions short enough to read.

Imports are read from the source (``ast``), function-level ones included; imports under
``if TYPE_CHECKING:`` are for annotations only and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "jumplora"
#: Functions allowed past the length limit, each with the reason its docstring gives.
LONG_FUNCTION_LIMIT = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports (the most specific existing module of each import)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, ignoring edges from a package to its own submodules' parents."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a submodule importing its own package's __init__ helpers
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def long_functions() -> list[str]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > LONG_FUNCTION_LIMIT and "long because" not in doc.lower():
                    out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_fit_on_one_screen():
    """Over ~60 lines only where the docstring says why ("long because …")."""
    assert long_functions() == []


@pytest.mark.parametrize("module", ["jumplora.build", "jumplora.run.trainer", "jumplora.checkpoint"])
def test_core_modules_do_not_import_matplotlib_at_import(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# -- behaviour is chosen by registry or declared capability, never by comparing a registered name -------
#: Comparisons left in modules other engineers own this round (issue 26: record owns drift.py, the report
#: and export are being split/migrated); each must go once those land — the test names any other one.
NAME_COMPARISONS_OWNED_ELSEWHERE = {
    "jumplora/metrics/drift.py": "results.get('runner', 'continual') != 'continual'",
    "jumplora/export.py": "kind in ('multitask', 'independent')",
    "jumplora/metrics/report.py": "config.get('runner') in ('multitask', 'independent')",
}


def registered_names() -> set[str]:
    """Every model family, runner and strategy name (a comparison against one of them picks behaviour)."""
    from jumplora.cl import strategy_names
    from jumplora.config import RUNNERS
    from jumplora.models.loading import MODEL_FAMILIES

    return {*MODEL_FAMILIES, *RUNNERS, *strategy_names()}


def _named(node: ast.AST, names: set[str]) -> bool:
    """A str constant that is a registered name, or a literal tuple/list/set holding one."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(item, ast.Constant) and item.value in names for item in items)


def name_comparisons(names: set[str], root: Path = PACKAGE) -> list[str]:
    """``x == "encoder"``, ``runner != "continual"``, ``name in ("multitask", …)`` anywhere under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(_named(side, names) for side in (node.left, *node.comparators)):
                where = str(path.relative_to(root.parent))
                if NAME_COMPARISONS_OWNED_ELSEWHERE.get(where) != ast.unparse(node):
                    out.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    return out


def test_no_registered_name_comparison_chooses_behaviour():
    """Families declare their metrics (``metric_modes``), runners their capabilities (``shard_refusal``)."""
    assert name_comparisons(registered_names()) == []


def test_the_name_comparison_check_finds_one(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text('if family == "encoder" or x in ("a", "multitask") or y != "other":\n    pass\n')
    found = name_comparisons({"encoder", "multitask"}, package)
    assert found == ["pkg/a.py:1 family == 'encoder'", "pkg/a.py:1 x in ('a', 'multitask')"]
    assert name_comparisons({"inclora"}, package) == []


def test_every_runner_choice_has_one_runner():
    from jumplora.config import RUNNERS
    from jumplora.run.trainer import RUNNER_TYPES

    assert tuple(RUNNER_TYPES) == RUNNERS
