"""Architecture checks: no import cycle between the package's modules, and functions short enough to read.

Imports are read from the source (``ast``), function-level ones included; imports under
``if TYPE_CHECKING:`` are for annotations only and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

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


CORE_MODULES = ("jumplora.build", "jumplora.run.trainer", "jumplora.run.directory")


def test_core_modules_do_not_import_matplotlib_at_import():
    """One fresh interpreter imports them in turn and names the first that pulls matplotlib in."""
    import subprocess
    import sys

    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n" \
           "    if 'matplotlib' in sys.modules: print(m); break"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *CORE_MODULES], capture_output=True, text=True, timeout=120,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == ""


# -- the run directory has one owner: jumplora/run/ ---------------------------------------------------------
#: The names inside a run directory (the layout in run/directory.py's docstring), as fnmatch patterns.
RUN_PATH_NAMES = (
    "config.json", "results.json", "train_log.jsonl", "checkpoint", "state.json", "plots", "predictions",
    "tracking", ".jumplora.lock", "update_*.safetensors", "support_*.safetensors", "strategy_*.safetensors",
    "adapter_*.safetensors", "partial_*.safetensors",
)  # fmt: skip
#: Calls whose string arguments are path parts (``Path(run, "x")``, ``run.joinpath("x")``, ``os.path.join``…).
PATH_CALLS = frozenset({"Path", "PurePath", "PosixPath", "joinpath", "with_name", "glob", "rglob", "join", "open"})
#: The only package that may build paths inside a run directory.
RUN_PACKAGE = "jumplora/run/"
TEMPORARILY_ALLOWED: dict[str, str] = {}


def _spelled(node: ast.AST) -> str | None:
    """The text a node spells: a str constant, or an f-string with ``*`` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "*" for part in node.values)
    return None


def _names_run_path(text: str | None) -> bool:
    import fnmatch

    return text is not None and any(fnmatch.fnmatchcase(part, pattern) for part in text.split("/")
                                    for pattern in RUN_PATH_NAMES)  # fmt: skip


def run_path_constants(trees: dict[str, ast.Module]) -> set[str]:
    """Module-level names bound to a run file's name anywhere in the package (``RESULTS_FILE = "results.json"``)."""
    found = set()
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and _names_run_path(_spelled(node.value)):
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found


def run_path_parts(tree: ast.Module, constants: set[str]) -> list[tuple[int, str]]:
    """(line, part) for each run file name used as a path part: an operand of ``/``, or an argument of a
    path-building call; the name is a literal, an f-string or one of ``constants``."""

    def part(node: ast.AST) -> str | None:
        text = _spelled(node)
        if _names_run_path(text):
            return text
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        return name if name in constants else None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            operands = [*node.args, *(k.value for k in node.keywords)] if called in PATH_CALLS else []
        else:
            continue
        found += [(node.lineno, text) for text in map(part, operands) if text]
    return found


def run_paths_outside_run_package(package: Path = PACKAGE) -> dict[str, list[str]]:
    """``{file: ["file:line 'name'", ...]}`` for every module outside jumplora/run/ that builds a run path."""
    trees = {str(p.relative_to(package.parent)): ast.parse(p.read_text(encoding="utf-8"))
             for p in sorted(package.rglob("*.py"))}  # fmt: skip
    constants = run_path_constants(trees)
    out: dict[str, list[str]] = {}
    for name, tree in trees.items():
        if not name.startswith(RUN_PACKAGE):
            hits = sorted(set(run_path_parts(tree, constants)))
            if hits:
                out[name] = [f"src/{name}:{line} {text!r}" for line, text in hits]
    return out


def test_only_the_run_package_builds_paths_inside_a_run_directory():
    """Issue 26: run/directory.py is the one owner of the run directory's layout, so that every reader
    goes through its checks; anything else asks it (``predictions_file``, ``read_run``, ``tracking_dir``…)."""
    found = run_paths_outside_run_package()
    offenders = [hit for name, hits in found.items() if name not in TEMPORARILY_ALLOWED for hit in hits]
    assert not offenders, "build paths inside a run directory outside jumplora/run/ (use " \
        "jumplora.run.directory's API instead):\n" + "\n".join(offenders)
    stale = [name for name in TEMPORARILY_ALLOWED if name not in found]
    assert not stale, f"remove {stale} from TEMPORARILY_ALLOWED in tests/test_architecture.py: no run path there now"


def test_the_run_path_check_finds_what_it_should(tmp_path):
    """The detector on a small package: each way of spelling a run path is found, other paths are not."""
    package = tmp_path / "jumplora"
    (package / "run").mkdir(parents=True)
    (package / "run" / "directory.py").write_text('CONFIG = "config.json"\ndef f(out):\n    return out / CONFIG\n')
    (package / "reader.py").write_text(
        "import os\nfrom pathlib import Path\nRESULTS = 'results.json'\n"
        "def f(out, i, model_dir):\n"
        "    a = out / 'checkpoint' / 'state.json'\n"  # line 5: two parts
        "    b = Path(out, 'plots')\n"  # 6
        "    c = out / f'update_{i:03d}.safetensors'\n"  # 7
        "    d = os.path.join(out, 'train_log.jsonl')\n"  # 8
        "    e = out / RESULTS\n"  # 9: a constant
        "    g = open(f'{out}/results.json')\n"  # 10
        "    return model_dir / 'model.safetensors', f'{out}: results.json is damaged', {'plots': []}\n"  # 11: fine
    )
    found = run_paths_outside_run_package(package)
    assert list(found) == ["jumplora/reader.py"]
    lines = [hit.split(" ")[0].rsplit(":", 1)[1] for hit in found["jumplora/reader.py"]]
    assert lines == ["5", "5", "6", "7", "8", "9", "10"], found


# -- behaviour is chosen by registry or declared capability, never by comparing a registered name -------


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
